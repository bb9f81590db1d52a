"""Stage 5 — the per-image GIG walk between concept layers and to classes, its shards and readers.

The method itself (quadrature, :class:`~gig.method.GIG`, its error-controlled path integrator,
the flow rule) lives in :mod:`gig.method`; this module runs it over the run's images, top layer
down (:func:`walk`), writes ``attribute/shards/*.safetensors`` and summarises them (completeness
and accuracy). Their readers (:func:`~gig.artefacts.iter_attributions`,
:func:`~gig.artefacts.load_attributions`, :func:`~gig.artefacts.load_path_records`, the completeness
residuals and error estimates) live in :mod:`gig.artefacts` and are re-exported here.
``GIG``, ``GIGResult``, ``quadrature``, ``gig_maps``, ``project``, ``random_directions`` and
``ESTIMATE_SCALE`` are re-exported here for code written against earlier versions.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from .artefacts import (  # noqa: F401  (readers re-exported: moved to gig.artefacts)
    PATHS_FILE,
    SUMMARY_FIELDS,
    completeness_residuals,
    iter_attributions,
    load_attributions,
    load_error_estimates,
    load_path_records,
    path_keys,
    paths_path,
)
from .hooks import ModelHandle
from .method import (  # noqa: F401  (re-exported: see the module docstring)
    ESTIMATE_SCALE,
    GIG,
    GIGResult,
    flow,
    gig_maps,
    project,
    quadrature,
    random_directions,
    safe_denominator,
)


def gig_for(handle: ModelHandle, layer: str, dictionary: torch.Tensor, config, bias: torch.Tensor | None = None) -> GIG:
    """The GIG of ``layer`` with a run configuration's step settings (``bias``: the layer's
    decoder bias, where its basis has one)."""
    return GIG(
        handle,
        layer,
        dictionary,
        n_steps=config.n_steps,
        quadrature_rule=config.quadrature,
        internal_batch_size=config.internal_batch_size,
        tol=config.gig_tol,
        max_steps=config.gig_max_steps,
        bias=bias,
    )


def run_gig(store, handle: ModelHandle, layer: str) -> GIG:
    """The GIG of one of the run's layers: its concepts, its basis's decoder bias, the run's settings."""
    from .artefacts import decoder_bias, load_dictionary

    return gig_for(handle, layer, load_dictionary(store, layer), store.config, bias=decoder_bias(store, layer))


def attribute(store, handle: ModelHandle, source, progress: bool = True, ranks=None) -> None:
    """Stage 5 into ``store/attribute``: the per-image top-down GIG walk.

    Per image: concept → class GIG at the last layer; its ``top_k`` concepts become the targets of
    concept → concept GIG from the layer below, whose concepts are scored by the share of each
    target they explain, weighted by the target's own importance; and so on down. Saved per
    image and layer: the full score vector, the top concepts, their GIG maps, every GIG row with
    its output difference and completeness residual. Under torchrun each rank walks its share of
    the shards (:mod:`gig.distributed`); a run with fewer shards than ranks is split by images
    inside each shard instead, so that every rank works; rank 0 writes the summary.
    """

    from .collect import SHARD_IMAGES, load_images
    from .decompose import CodeReader
    from .distributed import Ranks, ShardLoop, sharded_stage

    ranks = ranks or Ranks()

    store.require("decompose")
    config = store.config
    layers = config.layers  # forward order, checked by the pipeline
    used = load_images(store)["images"]
    by_id = {r.image_id: r for r in source.records}
    records = [by_id[i["image_id"]] for i in used]
    target_of = {i["image_id"]: i["target"] for i in used}
    with sharded_stage(store, "attribute", ranks) as summary:
        readers = {layer: CodeReader(store, layer) for layer in layers}
        fast = handle.for_gradients(layers)
        # What the stored error estimates mean (0.3: per-path cells, the estimate scaled).
        summary["engine"] = {
            "cells": "per attribution",
            "estimate_scale": ESTIMATE_SCALE,
            "folded_batchnorms": fast.folded_batchnorms,
            "folded_paddings": fast.folded_paddings,
            "channels_last": fast.memory_format == torch.channels_last,
        }
        gigs = {layer: run_gig(store, fast, layer) for layer in layers}

        def walk_images(images: list, bar) -> dict[str, torch.Tensor] | None:
            return _walk_images(source, handle, images, target_of, readers, gigs, config, bar)

        if ranks.shards(records, SHARD_IMAGES)[1] < ranks.world:  # fewer shards than ranks (never in 1 process)
            _attribute_split_shards(store, ranks, records, SHARD_IMAGES, walk_images, progress)
        else:
            loop = ShardLoop(store, "attribute", ranks, records, SHARD_IMAGES, progress)
            for name, shard in loop:
                _save_shard(store, name, walk_images(shard, loop.bar))
        if ranks.is_main:
            _summarize(store, summary)


def _walk_images(source, handle, images, target_of, readers, gigs, config, bar) -> dict[str, torch.Tensor] | None:
    """:func:`walk` over ``images`` in batches, concatenated (None for no images)."""
    from .collect import iter_image_batches

    parts: list[dict[str, torch.Tensor]] = []
    for batch in iter_image_batches(source, images, handle, config.batch_size, config.loader_workers):
        ids = [r.image_id for r in batch.records]
        parts.append(
            walk(
                batch.pixels,
                ids,
                [target_of[i] for i in ids],
                config.layers,
                readers,
                gigs,
                config.top_k,
                progress=_ImageProgress(bar, len(ids)),
                null_directions=config.null_directions,
            )
        )
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else None


def _save_shard(store, name: str, tensors: dict[str, torch.Tensor]) -> None:
    from .store import save_tensors

    save_tensors(store.shard_path("attribute", name), tensors)
    store.mark_shard("attribute", name, {"n_images": int(tensors["image_id"].numel())})


def _attribute_split_shards(store, ranks, records: list, size: int, walk_images, progress: bool) -> None:
    """Every shard walked by all ranks, each taking every ``world``-th image of it; the shard's
    owner (index mod world) gathers the parts, puts them back in the shard's order and writes it.
    For runs with fewer shards than ranks (a small run would otherwise leave ranks idle)."""
    from tqdm.auto import tqdm

    from .distributed import Ranks

    every, _ = Ranks().shards(records, size)
    todo = [
        (index, name, shard) for index, (name, shard) in enumerate(every) if not store.shard_done("attribute", name)
    ]  # read by every rank before any writes
    bar = tqdm(
        total=sum(len(shard[ranks.rank :: ranks.world]) for _, _, shard in todo),
        desc="attribute",
        unit="img",
        disable=not progress or not ranks.is_main,
    )
    for index, name, shard in todo:
        parts = [p for p in ranks.gather(walk_images(shard[ranks.rank :: ranks.world], bar)) if p is not None]
        if index % ranks.world == ranks.rank:
            tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            where = {r.image_id: i for i, r in enumerate(shard)}
            order = torch.argsort(torch.tensor([where[int(i)] for i in tensors["image_id"]]))
            _save_shard(store, name, {k: v[order] for k, v in tensors.items()})
    bar.close()
    ranks.barrier()  # every shard written before rank 0 summarises


def _summarize(store, summary: dict) -> None:
    """Completeness residuals and accuracy per path kind, from the shards (not the maps: memory
    stays flat in the images); the per-path records they come from are saved beside the shards
    (:data:`PATHS_FILE`), so that readers of the finished run need no pass over them."""
    from .store import save_tensors

    data = load_attributions(store, SUMMARY_FIELDS)
    save_tensors(paths_path(store), data)
    parts = completeness_residuals(store, by_layer=True, data=data)
    summary["completeness"] = _residual_stats(torch.cat(list(parts.values())))
    summary["completeness_by_source"] = {name: _residual_stats(r) for name, r in parts.items()}
    summary["accuracy"] = accuracy_summary(store, data)


class _ImageProgress:
    """Advances a bar counted in images by whole images as a batch's attributions finish (the bar
    then moves every few refinement rounds, not once per batch)."""

    def __init__(self, bar, n_images: int):
        self.bar, self.n_images, self.done, self.shown = bar, n_images, 0.0, 0

    def __call__(self, share: float) -> None:
        self.done += share * self.n_images
        whole = min(self.n_images, int(self.done + 1e-6))
        if whole > self.shown:
            self.bar.update(whole - self.shown)
            self.shown = whole


def walk(
    pixels: torch.Tensor,
    ids: list[int],
    class_targets: list[int],
    layers: list[str],
    readers: dict,
    gigs: dict,
    top_k: int,
    progress: Callable[[float], None] | None = None,
    null_directions: int = 0,
) -> dict[str, torch.Tensor]:
    """One batch of images, top layer down.

    With ``null_directions`` ``M > 0``, every GIG call also attributes ``M`` random directions
    per image (:func:`random_directions`) along the same paths; their mean is saved as
    ``LAYER/class_null (N,)`` and ``LOWER/null (N, k)``, next to ``class_gig`` and ``gig``: the
    reference of the graphs' significance test (:func:`gig.graph.edge_tests`).

    ``progress(share)`` is called as attributions finish; the shares add up to 1 for the batch
    (each of the ``len(layers)`` GIG calls counts ``1 / len(layers)``).

    Importances are fractions of the image's class-logit change ``Δz``: at the top layer
    ``I[q] = GIG_class[q] / Δz``; one layer down, the part of each upper target's importance
    that flows through lower concept ``q``, ``I[q] = Σ_t I[t] · GIG_t[q] / Δg_t`` over the
    upper layer's top-``k`` targets ``t`` (``Δg_t``: the change of ``t``'s readout). These flows
    are the graph's edge weights (:func:`gig.graph.edge_weights`), so they compose along paths.
    """
    out: dict[str, torch.Tensor] = {"image_id": torch.tensor(ids, dtype=torch.int64)}
    step = None if progress is None else (lambda share: progress(share / len(layers)))
    attribute = partial(_attribute_layer, pixels, ids, readers, gigs, step, null_directions)
    top_layer = layers[-1]
    codes, res = attribute(top_layer, torch.tensor(class_targets))
    out.update(_class_fields(top_layer, res, null_directions))
    score = flow(res.attributions[:, 0], res.output_diff[:, 0], torch.ones(len(ids)))  # share of the logit change
    upper_importance = torch.ones(len(ids), 1)  # the class node carries the whole change
    upper_delta = res.output_diff
    for position in range(len(layers) - 1, -1, -1):
        layer = layers[position]
        top = score.topk(min(top_k, score.shape[1]), dim=1)
        out[f"{layer}/score"] = score
        out[f"{layer}/top"] = top.indices
        out[f"{layer}/importance"] = top.values
        out[f"{layer}/maps"] = _importance_maps(
            gigs[layer], pixels, codes, res.integrated_gradients, top.indices, upper_importance, upper_delta
        )
        if position == 0:
            break
        lower = layers[position - 1]
        codes, res = attribute(lower, top.indices, read_layer=layer)
        out.update(_target_fields(lower, top.indices, res, null_directions))
        upper_importance = top.values
        upper_delta = res.output_diff
        score = flow(res.attributions, res.output_diff, upper_importance).sum(1)  # the edges' flows, summed
    return out


def _attribute_layer(
    pixels: torch.Tensor,
    ids: list[int],
    readers: dict,
    gigs: dict,
    step: Callable[[float], None] | None,
    null_directions: int,
    layer: str,
    targets: torch.Tensor,
    read_layer: str | None = None,
) -> tuple[torch.Tensor, GIGResult]:
    """The batch's codes ``(N, P, K)`` at ``layer`` and their GIG (with integrated gradients, for
    the maps) to ``targets (N, T)``: classes, or with ``read_layer`` concepts of that upper layer.
    With ``null_directions`` ``M > 0``, ``M`` random directions per image ride along."""
    codes = torch.stack([readers[layer].codes(i) for i in ids])
    directions = random_directions(ids, layer, null_directions, gigs[layer].V.shape[1]) if null_directions else None
    read = {} if read_layer is None else {"read_layer": read_layer, "read_vectors": gigs[read_layer].V}
    res = gigs[layer].attribute(
        pixels, codes, targets, return_gradients=True, progress=step, directions=directions, **read
    )
    return codes, res


def _class_fields(layer: str, res: GIGResult, null_directions: int) -> dict[str, torch.Tensor]:
    """The top layer's record of its attribution to the class, each ``(N,)`` (``class_gig``
    ``(N, K)``): ``LAYER/class_gig``, ``class_null`` (with ``null_directions``), ``class_delta``,
    ``class_residual``, ``class_steps``, ``class_error``, ``class_converged``."""
    out = {f"{layer}/class_gig": res.attributions[:, 0]}
    if null_directions:
        out[f"{layer}/class_null"] = res.direction_attributions[:, 0].mean(-1)
    out[f"{layer}/class_delta"] = res.output_diff[:, 0]
    out[f"{layer}/class_residual"] = res.residual[:, 0]
    out[f"{layer}/class_steps"] = res.n_evaluations[:, 0]
    out[f"{layer}/class_error"] = res.error_estimate[:, 0]
    out[f"{layer}/class_converged"] = _converged(res)[:, 0]
    return out


def _target_fields(lower: str, targets: torch.Tensor, res: GIGResult, null_directions: int) -> dict[str, torch.Tensor]:
    """A lower layer's record of its attributions to the upper layer's top concepts
    ``targets (N, k)``: ``LOWER/targets``, ``gig (N, k, K_lower)``, ``null (N, k)`` (with
    ``null_directions``), ``delta``, ``residual``, ``steps``, ``error``, ``converged``, each ``(N, k)``."""
    out = {f"{lower}/targets": targets, f"{lower}/gig": res.attributions}
    if null_directions:
        out[f"{lower}/null"] = res.direction_attributions.mean(-1)
    out[f"{lower}/delta"] = res.output_diff
    out[f"{lower}/residual"] = res.residual
    out[f"{lower}/steps"] = res.n_evaluations
    out[f"{lower}/error"] = res.error_estimate
    out[f"{lower}/converged"] = _converged(res)
    return out


def _importance_maps(
    gig: GIG,
    pixels: torch.Tensor,
    codes: torch.Tensor,
    integrated_gradients: torch.Tensor,
    top: torch.Tensor,
    upper_importance: torch.Tensor,
    upper_delta: torch.Tensor,
) -> torch.Tensor:
    """Where each of the layer's ``top (N, k)`` concepts carries importance: its GIG maps to the
    upper targets (:func:`gig_maps`, ``(N, T, k, P)``) weighted by each target's importance per
    unit of its output change, ``upper_importance / upper_delta`` ``(N, T)``, summed over the
    targets → ``(N, k, H, W)``."""
    h, w = gig.grid_shape(pixels)
    maps = gig_maps(codes, integrated_gradients, gig.V.cpu(), top)  # (N, T, k, P)
    weight = (upper_importance / safe_denominator(upper_delta))[:, :, None, None]
    return (maps * weight).sum(1).reshape(len(codes), top.shape[1], h, w)


def _converged(res: GIGResult) -> torch.Tensor:
    """``(N, T)`` uint8: both stopping criteria met (all 0 on a fixed grid)."""
    if res.converged is None:
        return torch.zeros_like(res.n_evaluations, dtype=torch.uint8)
    return res.converged.to(torch.uint8)


def _residual_stats(residuals: torch.Tensor) -> dict[str, float]:
    return {
        "median": float(residuals.median()),
        "p95": float(residuals.quantile(0.95)),
        "max": float(residuals.max()),
        "n": int(residuals.numel()),
    }


def accuracy_summary(store, data: dict[str, torch.Tensor] | None = None) -> dict:
    """Per path kind: gradient evaluations (mean, median, max, total), the error estimate
    (median, p95, max) and the share of attributions that did not converge (estimate above the
    tolerance, or completeness residual above half of it, at the step cap) of every stored
    attribution."""
    data = load_path_records(store) if data is None else data
    config = store.config
    tol = None if config.n_steps else config.gig_tol
    out: dict = {"tol": tol, "by_source": {}}
    every: list[tuple[torch.Tensor, ...]] = []
    for name, (steps_key, error_key, done_key) in path_keys(config.layers).items():
        if steps_key not in data:  # a run attributed before error control: nothing recorded
            continue
        columns = (
            data[steps_key].flatten().double(),
            data[error_key].flatten().double(),
            data[done_key].flatten().bool() if done_key in data else None,
        )
        every.append(columns)
        out["by_source"][name] = _accuracy_stats(*columns, tol)
    if every:
        done = None if any(c[2] is None for c in every) else torch.cat([c[2] for c in every])
        out.update(_accuracy_stats(torch.cat([c[0] for c in every]), torch.cat([c[1] for c in every]), done, tol))
    return out


def _accuracy_stats(
    steps: torch.Tensor, error: torch.Tensor, converged: torch.Tensor | None, tol: float | None
) -> dict:
    stats = {
        "n": int(steps.numel()),
        "evaluations_total": int(steps.sum()),
        "evaluations_mean": float(steps.mean()),
        "evaluations_median": float(steps.median()),
        "evaluations_max": int(steps.max()),
    }
    known = error[~error.isnan()]
    if known.numel():
        stats.update(
            {
                "error_median": float(known.median()),
                "error_p95": float(known.quantile(0.95)),
                "error_max": float(known.max()),
            }
        )
        if tol is not None:
            flags = ~converged if converged is not None else (error > tol)
            stats["unconverged"] = float(flags.double().mean())
    return stats
