"""A run's machine-readable summary (``gig inspect RUN --json``)."""

from __future__ import annotations

from pathlib import Path

from .artefacts import (
    evaluate_dir,
    graph_index,
    graph_index_path,
    graph_path,
    load_evaluation_summary,
    load_front,
    load_graph,
)
from .config import STAGE_ORDER
from .store import RunStore, as_store

#: Above this share of concepts active per position, codes are called dense (:func:`missed_targets`).
MAX_L0_RATIO = 0.25


def summarize(run_dir: "str | Path | RunStore") -> dict:
    """Keys: ``layers`` (per-layer figures), ``completeness``, ``gig`` (per path kind: gradient
    evaluations and error estimates of the attributions), ``images``, ``graph``, ``stages``,
    ``missed`` (a sentence per missed target or unfinished stage), and ``evaluation`` once
    ``gig evaluate`` has run. Missing stages give ``None`` values."""
    store = as_store(run_dir)  # a run directory, or a run opened already
    manifest = store.manifest()
    stages = manifest["stages"]
    collect = stages.get("collect", {}).get("summary", {})
    concepts = stages.get("concepts", {}).get("summary", {})
    fidelity = stages.get("decompose", {}).get("summary", {}).get("fidelity", {})
    fronts = load_front(store) if store.stage_state("decompose") == "done" else {}
    layers = [
        _layer_summary(layer, collect, concepts, fidelity.get(layer, {}), fronts.get(layer, {}))
        for layer in store.config.layers
    ]
    attribute = stages.get("attribute", {}).get("summary", {})
    completeness = attribute.get("completeness", {})
    out = {
        "run": str(store.root),
        "model": store.config.model,
        "layers": layers,
        "completeness": {"median": completeness.get("median"), "p95": completeness.get("p95")},
        "gig": attribute.get("accuracy"),
        "images": {"used": collect.get("images_used"), "skipped": collect.get("images_skipped")},
        "graph": _graph_path(store),
        "edge_tests": _edge_tests(store),
        "stages": {
            name: {k: entry.get(k) for k in ("status", "seconds", "peak_rss_mb")} for name, entry in stages.items()
        },
    }
    out["missed"] = missed_targets(store, out)
    out["notes"] = [note for layer in layers for note in _notes_for_layer(layer)]
    evaluation = load_evaluation_summary(evaluate_dir(store))
    if evaluation is not None:
        out["evaluation"] = evaluation
    return out


def _layer_summary(layer: str, collect: dict, concepts: dict, fig: dict, front: dict) -> dict:
    """One layer's entry of :func:`summarize`'s ``layers``: from the collect and concepts stage
    summaries (every layer's), the layer's decompose fidelity ``fig`` and its λ front ``front``."""
    return {
        "name": layer,
        "n_pfv": collect.get("pfv_per_layer", {}).get(layer),
        "n_concepts": concepts.get(layer, {}).get("K"),
        # a basis with its own encoder (gig.basis): "sae" or "file:…"; None for k-means + coder
        "basis": fig.get("basis"),
        "channels": concepts.get(layer, {}).get("C"),
        "rel_error": fig.get("rel_error"),
        "r2": fig.get("r2"),
        "l0_ratio": fig.get("l0_ratio"),
        "top1_agreement": fig.get("top1_agreement"),
        "n_images": fig.get("n_images"),
        "kl": fig.get("kl"),
        "kl_se": fig.get("kl_se"),
        "alpha": fig.get("alpha"),
        "rule_met": front.get("met"),
        "front_images": front.get("images"),
        "front_alpha": front.get("alpha"),
        "stability": front.get("stability"),
        "decided": front.get("decided"),
        "front_note": front.get("note"),
        "check": fig.get("check"),
        "front": [
            {k: p.get(k) for k in ("alpha", "rel_error", "r2", "l0_ratio", "top1_agreement", "kl", "kl_ci", "r2_ci")}
            for p in front.get("points", [])
        ],
    }


def _graph_path(store: RunStore) -> str | None:
    """The run's first class graph (else its global one), or None before the graph stage."""
    path = None
    if graph_index_path(store).is_file():
        files = graph_index(store)["files"]
        first = next(iter(files["class"].values()), None) or files.get("global")
        path = str(graph_path(store, first)) if first else None
    return path


def _edge_tests(store: RunStore) -> dict[str, dict]:
    """Per graph of the graph stage with edges tested against random directions: its images,
    shown edges, and how many are significant and stronger than random (``beats_random``)."""
    if not graph_index_path(store).is_file() or not store.is_done("graph"):
        return {}
    files = graph_index(store)["files"]
    names = [*files["class"].values(), files.get("shared"), files.get("global")]
    out = {}
    for name in filter(None, names):
        graph = load_graph(store, name)
        tested = [e for e in graph["edges"] if e.get("p_value") is not None]
        if tested:
            out[name.removesuffix(".json")] = {
                "n_images": graph["n_images"],
                "edges": len(graph["edges"]),
                "significant": sum(bool(e.get("significant")) for e in tested),
                "beats_random": sum(bool(e.get("beats_random")) for e in tested),
            }
    return out


def missed_targets(store: RunStore, info: dict) -> list[str]:
    """Every figure of ``info`` (from :func:`summarize`) that misses its target, and every stage
    that is not done, as sentences: nothing is left for the reader to notice alone."""
    config = store.config
    missed = [f"stage {stage} {state}" for stage in STAGE_ORDER if (state := store.stage_state(stage)) != "done"]
    for layer in info["layers"]:
        missed.extend(_missed_for_layer(layer, config))
    p95 = info["completeness"]["p95"]
    if p95 is not None and p95 > config.gig_tol:
        # A fixed grid has no tolerance of its own, but it can miss a path's change entirely (a
        # normalisation after the layer puts all of it near α = 0): say so rather than stay silent.
        fixed = (
            ""
            if config.n_steps is None
            else f": the fixed grid (n_steps {config.n_steps}) does not resolve these paths; leave n_steps unset "
            "for error control"
        )
        missed.append(f"GIG completeness residual p95 {p95:.4f} above the tolerance {config.gig_tol}{fixed}")
    accuracy = info.get("gig") or {}
    unconverged = accuracy.get("unconverged")
    if unconverged:
        # a count as well as a share: a handful of 12 800 is "0.0%" at one decimal
        count = round(unconverged * accuracy.get("n", 0))
        missed.append(
            f"{count:,} of {accuracy.get('n', 0):,} GIG attributions ({unconverged:.2%}) hit the step cap "
            f"({config.gig_max_steps}) before reaching the tolerance"
        )
    return missed


def _missed_for_layer(layer: dict, config) -> list[str]:
    """The targets one layer misses: its λ rule, the fidelity figures over all images, sparsity,
    and the paper's K = concepts_per_channel · C."""
    name, out = layer["name"], []
    if layer["rule_met"] is False:
        out.append(
            f"{name}: no λ on the sparsity–fidelity front meets the rule; the sparsest point not "
            "significantly worse than the densest was taken (see the front in `gig inspect --json` "
            "or the report)"
        )
    if config.target_rel_error is not None:
        if layer["rel_error"] is not None and layer["rel_error"] > 1.05 * config.target_rel_error:
            out.append(
                f"{name}: reconstruction error {layer['rel_error']:.3f} above its target {config.target_rel_error}"
            )
    elif config.max_kl is not None and layer.get("basis") and layer.get("kl") is not None:
        # a basis with its own encoder is measured against the rule but never stepped
        from .decompose import check_layer  # the sparse coders only where a layer has a basis

        miss = check_layer(layer, {"met": True, "points": []}, config)
        if miss:
            out.append(
                f"{name}: the {layer['basis']} basis misses the fidelity rule over all {layer['n_images']} images: {miss}"
            )
    elif config.max_kl is not None and layer.get("check") is not None:
        miss = layer["check"]["miss"]
        if miss:
            out.append(
                f"{name}: over all {layer['n_images']} images the codes miss the rule beyond its "
                f"interval after {layer['check']['steps']} step(s) to a denser λ: {miss}"
            )
    else:  # runs made before 0.4: the agreement rule, figures without intervals
        if layer["r2"] is not None and layer["r2"] < config.min_r2:
            out.append(f"{name}: R² {layer['r2']:.3f} over all images below min_r2 {config.min_r2}")
        if layer["top1_agreement"] is not None and layer["top1_agreement"] < config.min_top1_agreement:
            out.append(
                f"{name}: the model's top-1 on the reconstruction agrees on {layer['top1_agreement']:.1%} "
                f"of images (min_top1_agreement {config.min_top1_agreement:.0%})"
            )
    if layer["l0_ratio"] is not None and layer["l0_ratio"] > MAX_L0_RATIO:
        out.append(
            f"{name}: dense codes, {layer['l0_ratio']:.0%} of the concepts active per position "
            f"(sparse: at most {MAX_L0_RATIO:.0%})"
        )
    wanted = config.concepts_per_channel * layer["channels"] if layer["channels"] else None
    if (
        wanted
        and layer["n_concepts"] is not None
        and layer["n_concepts"] < wanted
        and config.max_concepts is None
        and name not in config.dictionaries
        and config.bases.get(name) != "nmf"  # an NMF basis has at most C concepts by design
    ):
        out.append(
            f"{name}: K = {layer['n_concepts']} concepts, below {config.concepts_per_channel}·C = {wanted}: "
            f"{layer['n_pfv']} PFVs allow at most {layer['n_pfv']} // {config.min_cluster}; "
            "more images (or samples_per_image) raise it"
        )
    return out


def _notes_for_layer(layer: dict) -> list[str]:
    """What qualifies a layer's figures without missing a target: a λ choice that the front's
    images do not decide (a bootstrap of them moves it)."""
    if layer.get("decided") is False and layer.get("rule_met"):
        return [f"{layer['name']}: {layer['front_note']}"]
    return []
