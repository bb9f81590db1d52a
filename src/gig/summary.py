"""A run's machine-readable summary (``gig inspect RUN --json``)."""

from __future__ import annotations

from pathlib import Path

from .config import STAGE_ORDER
from .store import RunStore, load_json

#: Figures a run should reach; :func:`missed_targets` names every one it misses.
MIN_TOP1_AGREEMENT = 0.95
MAX_L0_RATIO = 0.25  # above this share of concepts active per position, codes are called dense


def summarize(run_dir: str | Path) -> dict:
    """Keys: ``layers`` (per-layer figures), ``completeness``, ``gig`` (per path kind: gradient
    evaluations and error estimates of the attributions), ``images``, ``graph``, ``stages``,
    ``missed`` (a sentence per missed target or unfinished stage), and ``evaluation`` once
    ``gig evaluate`` has run. Missing stages give ``None`` values."""
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
    out["missed"] = missed_targets(store, out)
    evaluation = store.root / "evaluate" / "summary.json"
    if evaluation.is_file():
        out["evaluation"] = load_json(evaluation)
    return out


def missed_targets(store: RunStore, info: dict) -> list[str]:
    """Every figure of ``info`` (from :func:`summarize`) that misses its target, and every stage
    that is not done, as sentences: nothing is left for the reader to notice alone."""
    config = store.config
    missed = [f"stage {stage} {state}" for stage in STAGE_ORDER
              if (state := store.stage_state(stage)) != "done"]
    for layer in info["layers"]:
        name = layer["name"]
        if layer["rel_error"] is not None and layer["rel_error"] > 1.05 * config.target_rel_error:
            missed.append(f"{name}: reconstruction error {layer['rel_error']:.3f} above its target "
                          f"{config.target_rel_error}")
        if layer["l0_ratio"] is not None and layer["l0_ratio"] > MAX_L0_RATIO:
            missed.append(f"{name}: dense codes, {layer['l0_ratio']:.0%} of the concepts active per position "
                          f"(sparse: at most {MAX_L0_RATIO:.0%})")
        if layer["top1_agreement"] is not None and layer["top1_agreement"] < MIN_TOP1_AGREEMENT:
            missed.append(f"{name}: the model's top-1 on the reconstruction agrees on "
                          f"{layer['top1_agreement']:.1%} of images (target {MIN_TOP1_AGREEMENT:.0%})")
    p95 = info["completeness"]["p95"]
    tol = config.gig_tol if config.n_steps is None else None
    if p95 is not None and tol is not None and p95 > tol:
        missed.append(f"GIG completeness residual p95 {p95:.4f} above the tolerance {tol}")
    unconverged = (info.get("gig") or {}).get("unconverged")
    if unconverged:
        missed.append(f"{unconverged:.1%} of GIG attributions hit the step cap ({config.gig_max_steps}) "
                      "before reaching the tolerance")
    return missed
