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

import numpy as np
import torch
from PIL import Image

from .artefacts import crop_paths, erf_dir, load_samples  # noqa: F401  (crop_paths, erf_dir re-exported)
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
    fields = receptive_fields(handle, layer, pixels.shape[-1])
    maps = torch.zeros(M, *pixels.shape[-2:])
    for image in index.unique().tolist():
        rows = (index == image).nonzero().flatten().tolist()
        x = pixels[image : image + 1].to(handle.device).clone().requires_grad_(True)
        grid = handle.grid_until(x, layer)[0]  # (C, H, W), graph back to x kept
        cells = {row: (int(positions[row, 0]), int(positions[row, 1])) for row in rows}
        if fields is not None and not _packing_holds(handle, layer, fields, grid, x, cells):
            fields = None  # the boxes were measured wrong for this model: one pass per PFV
        groups = _disjoint_groups(fields, cells) if fields is not None else [[row] for row in rows]
        for g, group in enumerate(groups):
            summed = _erf_sum(grid, x, [cells[r] for r in group], retain=g < len(groups) - 1)
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
    # One probe image per pixel (i, i) of one stride period, all in one forward pass: the model
    # is in eval mode, so one image's NaN cannot reach another's outputs (if it did, every probe
    # would see the whole grid, and packing would be refused below).
    probes = torch.arange(size // 2, size // 2 + stride)
    x = torch.zeros(stride, 3, size, size, device=handle.device)
    x[torch.arange(stride), :, probes, probes] = float("nan")
    with torch.no_grad():
        seen_all = torch.isnan(handle.grid_until(x, layer)).any(1).cpu()  # (stride, H, W)
    offsets: dict[str, list[int]] = {"lo_h": [], "hi_h": [], "lo_w": [], "hi_w": []}
    for i, seen in zip(probes.tolist(), seen_all):
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
    array = np.asarray(image.convert("RGB"), dtype=np.float32)[ct:cb, cl:cr]  # only the crop is shaded
    shade = np.full(array.shape[:2], dim, dtype=np.float32)
    shade[max(0, t - ct) : b - ct, max(0, l - cl) : r - cl] = 1.0
    crop = (array * shade[..., None]).clip(0, 255).astype(np.uint8)
    return Image.fromarray(crop).resize((size, size), Image.BICUBIC)


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


def _by_image(samples: list[int], image_ids) -> list[tuple[int, list[int]]]:
    """``samples`` grouped by their image (``image_ids[sample]``): ``[(image id, samples)]``."""
    groups: dict[int, list[int]] = {}
    for i in samples:
        groups.setdefault(int(image_ids[i]), []).append(i)
    return sorted(groups.items())


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
    :func:`erf_dir` as ``s{index}.png``. Only the missing ones are computed, image by image, so
    each image is read, preprocessed and run forward once however many of its PFVs are asked
    for; the pipeline's ``gig concept`` and the report share this one cache."""
    out = erf_dir(store, layer)
    paths = crop_paths(store, layer, sample_indices)
    missing = sorted({i for i, p in zip(sample_indices, paths) if not p.exists()})
    if not missing:
        return paths
    table = load_samples(store, layer)
    by_id = {r.image_id: r for r in source.records}
    # The batch-norm-folded copy (ModelHandle.measuring): the same function, about 2x faster for
    # these forward and backward passes; the crops depend on the maps only through their boxes.
    fast = handle.measuring([layer])
    for image_id, chunk in _by_image(missing, table["image_id"]):
        image = source.load(by_id[image_id])
        view, pixels = handle.bundle.display_image(image), handle.bundle.preprocess(image)
        index = torch.zeros(len(chunk), dtype=torch.long)
        maps = erf_maps(fast, pixels[None], layer, table["pos"][chunk], batch_size, image_index=index)
        for i, erf in zip(chunk, maps):
            save_png(erf_crop(view, erf.numpy(), mass, margin), out / f"s{i}.png")
    return paths
