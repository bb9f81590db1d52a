"""A run's machine-readable summary (``gig inspect RUN --json``)."""

from __future__ import annotations

from pathlib import Path

from .store import RunStore, load_json


def summarize(run_dir: str | Path) -> dict:
    """Keys: ``layers`` (per-layer figures), ``completeness``, ``gig`` (per path kind: gradient
    evaluations and error estimates of the attributions), ``images``, ``graph``, ``stages``,
    and ``evaluation`` once ``gig evaluate`` has run. Missing stages give ``None`` values."""
    store = RunStore.open(run_dir)
    manifest = store.manifest()
    stages = manifest["stages"]
    collect = stages.get("collect", {}).get("summary", {})
    concepts = stages.get("concepts", {}).get("summary", {})
    fidelity = stages.get("decompose", {}).get("summary", {}).get("fidelity", {})
    layers = []
    for layer in store.config.layers:
        fig = fidelity.get(layer, {})
        layers.append({
            "name": layer,
            "n_pfv": collect.get("pfv_per_layer", {}).get(layer),
            "n_concepts": concepts.get(layer, {}).get("K"),
            "rel_error": fig.get("rel_error"),
            "r2": fig.get("r2"),
            "l0_ratio": fig.get("l0_ratio"),
            "top1_agreement": fig.get("top1_agreement"),
        })
    attribute = stages.get("attribute", {}).get("summary", {})
    completeness = attribute.get("completeness", {})
    graph_index = store.root / "graph" / "index.json"
    graph_path = None
    if graph_index.is_file():
        files = load_json(graph_index)["files"]
        first = next(iter(files["class"].values()), None) or files.get("global")
        graph_path = str(store.root / "graph" / first) if first else None
    out = {
        "run": str(store.root),
        "model": store.config.model,
        "layers": layers,
        "completeness": {"median": completeness.get("median"), "p95": completeness.get("p95")},
        "gig": attribute.get("accuracy"),
        "images": {"used": collect.get("images_used"), "skipped": collect.get("images_skipped")},
        "graph": graph_path,
        "stages": {name: {k: entry.get(k) for k in ("status", "seconds", "peak_rss_mb")}
                   for name, entry in stages.items()},
    }
    evaluation = store.root / "evaluate" / "summary.json"
    if evaluation.is_file():
        out["evaluation"] = load_json(evaluation)
    return out
