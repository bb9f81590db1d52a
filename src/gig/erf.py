"""Stage 2 — effective receptive fields (ERFs) of PFVs, computed on demand and cached.

The ERF of the PFV ``x_p`` of one image is the absolute input gradient of ``⟨x_p, x_p/‖x_p‖⟩``
(the PFV's norm, with the unit direction held fixed), summed over colour channels: a map over the
model's input pixels. For display, the ERF region is the smallest centred-on-the-peak box holding
``mass`` (90 %) of the map, widened by a context margin; the crop shows the ERF bright and the
context dimmed.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .artefacts import crop_paths, erf_dir, load_samples
from .hooks import ModelHandle


def erf_maps(
    handle: ModelHandle,
    pixels: torch.Tensor,
    layer: str,
    positions: torch.Tensor,
    batch_size: int = 16,
    image_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """ERFs of ``M`` PFVs: ``pixels (n, 3, S, S)``, ``positions (M, 2)`` as (h, w) on ``layer``'s
    grid, ``image_index (M,)`` the image of each PFV (default ``arange(M)``, one image per PFV)
    → ``(M, S, S)``. The forward pass stops at ``layer`` (:meth:`ModelHandle.grid_until`): the
    ERF only needs the network below it.

    On the CPU each image runs forward once and each of its PFVs backward alone through the kept
    graph: on one thread this measured 2.4× (Lite0 ``_blocks.15``) to 5× (``_blocks.4``) faster
    than replicating the image once per PFV in batches of 16 (one forward and backward per PFV
    over large batch tensors), and the maps agree to float rounding. PFVs of one image that read
    disjoint pixels (:func:`receptive_fields`: early layers, whose positions see a small part of
    the image) share one backward pass: the gradient of their sum is their maps side by side, each
    inside its own box. On an accelerator, where batches pay and single small kernels do not, rows
    are replicated in batches of ``batch_size`` as before."""
    M = positions.shape[0]
    index = torch.arange(M) if image_index is None else image_index.long()
    if index.shape != (M,):
        raise ValueError(f"image_index has shape {tuple(index.shape)}, want ({M},): one image per position")
    if handle.device.type != "cpu":
        return _erf_maps_batched(handle, pixels[index], layer, positions, batch_size)
    maps = torch.zeros(M, *pixels.shape[-2:])
    for image in index.unique().tolist():
        rows = (index == image).nonzero().flatten()
        x = pixels[image : image + 1].to(handle.device).clone().requires_grad_(True)
        grid = handle.grid_until(x, layer)[0]  # (C, H, W), graph back to x kept
        maps[rows] = _maps_of_image(handle, layer, x, grid, positions[rows])
    return maps


def image_erf_maps(
    handle: ModelHandle, pixels: torch.Tensor, positions: dict[str, torch.Tensor], batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """:func:`erf_maps` of PFVs of several layers of one image, ``pixels (3, S, S)``,
    ``positions {layer: (m, 2)}`` → ``{layer: (m, S, S)}``. On the CPU the image runs forward
    once for all of them (:meth:`ModelHandle.grids_until`), stopped after the last layer; the maps
    are the ones :func:`erf_maps` gives, bit for bit (the same forward operations, and a
    copy's backward is exact)."""
    if not positions:
        return {}
    if handle.device.type != "cpu":
        return {
            layer: erf_maps(handle, pixels[None], layer, pos, batch_size, torch.zeros(len(pos), dtype=torch.long))
            for layer, pos in positions.items()
        }
    x = pixels[None].to(handle.device).clone().requires_grad_(True)
    grids, last = handle.grids_until(x, list(positions)), len(positions) - 1
    return {
        layer: _maps_of_image(handle, layer, x, grids[layer][0], pos, free=k == last)
        for k, (layer, pos) in enumerate(positions.items())
    }


def _maps_of_image(
    handle: ModelHandle, layer: str, x: torch.Tensor, grid: torch.Tensor, positions: torch.Tensor, free: bool = True
) -> torch.Tensor:
    """The ERF maps ``(m, S, S)`` of the PFVs at ``positions (m, 2)`` of ``grid (C, H, W)``,
    ``layer``'s output for the single image ``x (1, 3, S, S)`` (graph kept): one backward pass
    per group of PFVs that read disjoint pixels (:func:`receptive_fields`), else per PFV. ``free``:
    the last pass frees the graph (False while other layers' maps still need it)."""
    fields = receptive_fields(handle, layer, x.shape[-1])
    cells = {row: (int(h), int(w)) for row, (h, w) in enumerate(positions.tolist())}
    if fields is not None and not _packing_holds(handle, layer, fields, grid, x, cells):
        fields = None  # the boxes were measured wrong for this model: one pass per PFV
    groups = _disjoint_groups(fields, cells) if fields is not None else [[row] for row in cells]
    maps = torch.zeros(len(cells), *x.shape[-2:])
    for g, group in enumerate(groups):
        summed = _erf_sum(grid, x, [cells[r] for r in group], retain=not free or g < len(groups) - 1)
        if len(group) == 1:
            maps[group[0]] = summed
            continue
        for row in group:  # disjoint supports: each box holds one map
            t, b, l, r = fields.box(*cells[row])
            maps[row, t:b, l:r] = summed[t:b, l:r]
    return maps


def _erf_sum(grid: torch.Tensor, x: torch.Tensor, cells: list[tuple[int, int]], retain: bool) -> torch.Tensor:
    """The summed ERF map ``(S, S)`` of the PFVs at ``cells`` of ``grid (C, H, W)``, computed from
    the input ``x (1, 3, S, S)`` in one backward pass (``retain``: keep the graph for more)."""
    (grad,) = torch.autograd.grad(_norm_seed(grid, cells), x, retain_graph=retain)
    return grad[0].abs().sum(0).cpu()


def _packing_holds(
    handle: ModelHandle, layer: str, fields: "ReceptiveFields", grid: torch.Tensor, x: torch.Tensor, cells: dict
) -> bool:
    """Once per model handle and layer, a check of the measured boxes against the maps
    themselves: the first group of PFVs that would share a pass is also computed one by one, and
    a difference (an operation that swallowed the probe's NaN, so that the boxes are too small)
    turns packing off for the layer. True when packing may be used."""
    checked = _CHECKED.setdefault(handle, {})
    if (layer, fields.size) in checked:
        return checked[(layer, fields.size)]
    group = next((g for g in _disjoint_groups(fields, cells) if len(g) > 1), None)
    if group is None:
        return True  # nothing to pack here; checked when there is
    summed = _erf_sum(grid, x, [cells[r] for r in group], retain=True)
    holds = True
    for row in group:  # each map lies in its box, and the boxes' sum is the group's pass
        alone = _erf_sum(grid, x, [cells[row]], retain=True)
        t, b, l, r = fields.box(*cells[row])
        outside = alone.clone()
        outside[t:b, l:r] = 0
        holds &= float(outside.abs().max()) <= 1e-6 * float(alone.abs().max())
        alone[t:b, l:r] -= summed[t:b, l:r]
        holds &= float(alone.abs().max()) <= 1e-4 * float(summed.abs().max()) + 1e-12
    checked[(layer, fields.size)] = holds
    if not holds:
        _FIELDS[handle][(layer, fields.size)] = None
    return holds


def _norm_seed(grid: torch.Tensor, cells: list[tuple[int, int]]) -> torch.Tensor:
    """``Σ_j ⟨x_pj, x_pj/‖x_pj‖⟩`` over the PFVs at ``cells`` of ``grid (C, H, W)``, the unit
    directions held fixed: its input gradient is the sum of their ERF gradients."""
    pfv = torch.stack([grid[:, h, w] for h, w in cells])  # (m, C)
    unit = (pfv / pfv.norm(dim=1, keepdim=True).clamp_min(1e-12)).detach()
    return (pfv * unit).sum()


@dataclass(frozen=True)
class ReceptiveFields:
    """The input pixels each position of a layer's grid can depend on: position ``(h, w)`` reads
    rows ``[s·h + lo_h, s·h + hi_h]`` and columns ``[s·w + lo_w, s·w + hi_w]`` of the ``size``² input
    (clipped to it), ``s`` the stride. Measured, not assumed, by :func:`receptive_fields`."""

    size: int
    stride: int
    lo_h: int
    hi_h: int
    lo_w: int
    hi_w: int

    def box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)`` (ends exclusive) of the pixels position ``(h, w)`` reads."""
        s, n = self.stride, self.size
        top, bottom = max(0, s * h + self.lo_h), min(n, s * h + self.hi_h + 1)
        left, right = max(0, s * w + self.lo_w), min(n, s * w + self.hi_w + 1)
        return top, bottom, left, right

    def disjoint(self, a: tuple[int, int], b: tuple[int, int]) -> bool:
        """Whether positions ``a`` and ``b`` read no pixel in common (apart in rows or in columns)."""
        (t1, b1, l1, r1), (t2, b2, l2, r2) = self.box(*a), self.box(*b)
        return b1 <= t2 or b2 <= t1 or r1 <= l2 or r2 <= l1


#: ``{handle: {(layer, size): ReceptiveFields | None}}``, measured once per model handle
_FIELDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: ``{handle: {(layer, size): bool}}``: whether packing was checked against the maps and holds
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def receptive_fields(handle: ModelHandle, layer: str, size: int) -> ReceptiveFields | None:
    """``layer``'s :class:`ReceptiveFields` on ``size``² inputs, or None where they cannot be
    measured as boxes (then every PFV gets a backward pass of its own).

    Measured by propagation, not from the architecture: a NaN at one pixel of a blank image turns
    every grid position that reads it into NaN (a convolution, activation or pooling of a NaN is
    NaN), so the positions reading pixel ``(i, i)`` are found exactly; probing one stride period
    of pixels in the middle gives every offset. A layer whose positions read non-rectangular or
    whole-image regions (attention, squeeze-excitation, global pooling) returns None."""
    known = _FIELDS.setdefault(handle, {})
    if (layer, size) not in known:
        known[(layer, size)] = _measure_fields(handle, layer, size)
    return known[(layer, size)]


def _measure_fields(handle: ModelHandle, layer: str, size: int) -> ReceptiveFields | None:
    x = torch.zeros(1, 3, size, size, device=handle.device)
    with torch.no_grad():
        H, W = handle.grid_until(x, layer).shape[-2:]
    stride = size // H if H == W and size % H == 0 else 0
    if stride < 1:
        return None
    # One probe image per pixel (i, i) of one stride period: the model is in eval mode, so one
    # image's NaN cannot reach another's outputs (if it did, every probe would see the whole grid,
    # and packing would be refused below). The first probe runs alone: on deep layers, whose
    # positions read the whole image, it already says None (the answer of the whole period, which
    # fails on its first probe too), for one image's forward pass instead of ``stride``.
    probes = list(range(size // 2, size // 2 + stride))
    offsets: dict[str, list[int]] = {"lo_h": [], "hi_h": [], "lo_w": [], "hi_w": []}
    for batch in (probes[:1], probes[1:]):
        if not batch:
            continue
        for i, seen in zip(batch, _nan_reach(handle, layer, size, batch)):
            rows, cols = seen.any(1).nonzero().flatten(), seen.any(0).nonzero().flatten()
            if rows.numel() == 0 or int(seen.sum()) != rows.numel() * cols.numel():
                return None  # no propagation, or a region that is not one rectangle
            if rows.numel() != int(rows[-1] - rows[0]) + 1 or rows.numel() >= H:
                return None  # not contiguous, or the whole grid: nothing to gain
            offsets["lo_h"].append(i - stride * int(rows[-1]))
            offsets["hi_h"].append(i - stride * int(rows[0]))
            offsets["lo_w"].append(i - stride * int(cols[-1]))
            offsets["hi_w"].append(i - stride * int(cols[0]))
    return ReceptiveFields(
        size, stride, min(offsets["lo_h"]), max(offsets["hi_h"]), min(offsets["lo_w"]), max(offsets["hi_w"])
    )


def _nan_reach(handle: ModelHandle, layer: str, size: int, pixels: list[int]) -> torch.Tensor:
    """``(len(pixels), H, W)``: which positions of ``layer``'s grid a NaN at input pixel ``(i, i)``
    reaches, for each ``i`` of ``pixels``, in one forward pass of one probe image per pixel."""
    n, probes = len(pixels), torch.tensor(pixels)
    x = torch.zeros(n, 3, size, size, device=handle.device)
    x[torch.arange(n), :, probes, probes] = float("nan")
    with torch.no_grad():
        return torch.isnan(handle.grid_until(x, layer)).any(1).cpu()


def _disjoint_groups(fields: ReceptiveFields, cells: dict[int, tuple[int, int]]) -> list[list[int]]:
    """``cells`` (row → grid position) in groups whose positions read pairwise disjoint pixels,
    greedily in order: each group needs one backward pass."""
    groups: list[list[int]] = []
    for row, cell in cells.items():
        for group in groups:
            if all(fields.disjoint(cell, cells[other]) for other in group):
                group.append(row)
                break
        else:
            groups.append([row])
    return groups


def _erf_maps_batched(
    handle: ModelHandle, pixels: torch.Tensor, layer: str, positions: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """:func:`erf_maps` with one image row per PFV, ``pixels (M, 3, S, S)``, in batches."""
    maps = []
    for start in range(0, pixels.shape[0], batch_size):
        x = pixels[start : start + batch_size].to(handle.device).clone().requires_grad_(True)
        pos = positions[start : start + batch_size]
        grid = handle.grid_until(x, layer)
        rows = torch.arange(x.shape[0])
        pfv = grid[rows, :, pos[:, 0], pos[:, 1]]  # (m, C)
        unit = (pfv / pfv.norm(dim=1, keepdim=True).clamp_min(1e-12)).detach()
        (grad,) = torch.autograd.grad((pfv * unit).sum(), x)
        maps.append(grad.abs().sum(1).cpu())
    return torch.cat(maps)


def erf_box(erf: np.ndarray, mass: float = 0.9) -> tuple[int, int, int, int]:
    """Smallest box (left, top, right, bottom) grown around the peak that holds ``mass`` of ``erf (S, S)``."""
    total = float(erf.sum())
    h, w = erf.shape
    if total <= 0:
        return 0, 0, w, h
    cy, cx = np.unravel_index(int(np.argmax(erf)), erf.shape)
    integral = np.pad(erf, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    # every radius at once: the boxes grow monotonically, so the first that holds the mass wins
    radius = np.arange(1, max(h, w) + 1)
    t, b = np.maximum(0, cy - radius), np.minimum(h, cy + radius + 1)
    l, r = np.maximum(0, cx - radius), np.minimum(w, cx + radius + 1)
    inside = integral[b, r] - integral[t, r] - integral[b, l] + integral[t, l]
    enough = np.flatnonzero(inside >= mass * total)
    if not enough.size:
        return 0, 0, w, h
    i = int(enough[0])
    return int(l[i]), int(t[i]), int(r[i]), int(b[i])


def erf_crop(
    image: Image.Image, erf: np.ndarray, mass: float = 0.9, margin: float = 0.5, dim: float = 0.35, size: int = 96
) -> Image.Image:
    """The ERF box widened by ``margin`` (share of its size) on the model's view of the image.

    Pixels outside the ERF box are dimmed to ``dim`` brightness, so the context stays visible.
    """
    l, t, r, b = erf_box(erf, mass)
    bw, bh = r - l, b - t
    W, H = image.size
    cl, ct = max(0, int(l - margin * bw)), max(0, int(t - margin * bh))
    cr, cb = min(W, int(r + margin * bw)), min(H, int(b + margin * bh))
    pixels = np.asarray(image.convert("RGB"))[ct:cb, cl:cr]  # only the crop is shaded
    crop = _dimmed(dim)[pixels]
    inside = (slice(max(0, t - ct), b - ct), slice(max(0, l - cl), r - cl))
    crop[inside] = pixels[inside]
    return Image.fromarray(crop).resize((size, size), Image.BICUBIC)


def _dimmed(dim: float) -> np.ndarray:
    """``(256,)`` uint8: each 8-bit value times ``dim`` as a float32 product, truncated (a table
    lookup instead of a float image per crop, the same bytes)."""
    return (np.arange(256, dtype=np.float32) * np.float32(dim)).clip(0, 255).astype(np.uint8)


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically: a crash or a full disk never leaves a truncated file that a later
    reader would take for a cached crop."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        image.save(tmp, format="PNG", compress_level=1)  # 3x faster than 6; photos barely compress
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def exemplar_crops(
    store,
    handle: ModelHandle,
    source,
    layer: str,
    sample_indices: list[int],
    mass: float = 0.9,
    margin: float = 0.5,
    batch_size: int = 16,
) -> list[Path]:
    """PNG ERF crops of sampled PFVs of ``layer`` (indices into the collect arrays), cached in
    :func:`erf_dir` as ``s{index}.png``: :func:`layer_crops` of one layer."""
    return layer_crops(store, handle, source, {layer: sample_indices}, mass, margin, batch_size)[layer]


def layer_crops(
    store,
    handle: ModelHandle,
    source,
    wanted: dict[str, list[int]],
    mass: float = 0.9,
    margin: float = 0.5,
    batch_size: int = 16,
    on_made: Callable[[Path, Image.Image], None] | None = None,
    progress: bool = False,
) -> dict[str, list[Path]]:
    """PNG ERF crops of sampled PFVs of several layers, ``wanted {layer: sample indices}`` →
    ``{layer: paths}`` in that order, cached in :func:`erf_dir` as ``s{index}.png``. Only the
    missing ones are computed, image by image: each image is read, preprocessed and run forward
    once however many of its PFVs, of whichever layers, are asked for
    (:func:`image_erf_maps`). The pipeline's ``gig concept``, the graph stage's thumbnails and the
    report share this one cache. ``on_made(path, crop)`` sees each crop made here (the report
    encodes it for the page without reading the file back); ``progress``: a bar over the images."""
    paths = {layer: crop_paths(store, layer, samples) for layer, samples in wanted.items()}
    missing = {layer: sorted({i for i, p in zip(wanted[layer], paths[layer]) if not p.exists()}) for layer in wanted}
    missing = {layer: samples for layer, samples in missing.items() if samples}
    if not missing:
        return paths
    tables = {layer: load_samples(store, layer) for layer in missing}
    by_id = {r.image_id: r for r in source.records}
    # The batch-norm-folded copy (ModelHandle.measuring), one for all the run's layers: the same
    # function, about 2x faster for these passes; the crops depend on the maps only through boxes.
    fast = handle.measuring(list(dict.fromkeys([*store.config.layers, *missing])))
    outs = {layer: erf_dir(store, layer) for layer in missing}
    jobs = _by_image(missing, tables)
    bar = tqdm(jobs.items(), desc="ERF crops", unit="img", disable=not progress, total=len(jobs))
    for image_id, samples in bar:
        image = source.load(by_id[image_id])
        view, pixels = handle.bundle.display_image(image), handle.bundle.preprocess(image)
        positions = {layer: tables[layer]["pos"][chunk] for layer, chunk in samples.items()}
        maps = image_erf_maps(fast, pixels, positions, batch_size)
        for layer, chunk in samples.items():
            for i, erf in zip(chunk, maps[layer]):
                crop, path = erf_crop(view, erf.numpy(), mass, margin), outs[layer] / f"s{i}.png"
                save_png(crop, path)
                if on_made is not None:
                    on_made(path, crop)
    return paths


def _by_image(missing: dict[str, list[int]], tables: dict[str, dict]) -> dict[int, dict[str, list[int]]]:
    """The samples of ``missing {layer: samples}`` by their image (``tables[layer]["image_id"]``),
    images in increasing id order: ``{image id: {layer: samples}}``."""
    groups: dict[int, dict[str, list[int]]] = {}
    for layer, samples in missing.items():
        ids = tables[layer]["image_id"]
        for i in samples:
            groups.setdefault(int(ids[i]), {}).setdefault(layer, []).append(i)
    return dict(sorted(groups.items()))
