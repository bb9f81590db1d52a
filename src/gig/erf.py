"""Stage 2 — effective receptive fields (ERFs) of PFVs, computed on demand and cached.

The ERF of the PFV ``x_p`` of one image is the absolute input gradient of ``⟨x_p, x_p/‖x_p‖⟩``
(the PFV's norm, with the unit direction held fixed), summed over colour channels: a map over the
model's input pixels. For display, the ERF region is the smallest centred-on-the-peak box holding
``mass`` (90 %) of the map, widened by a context margin; the crop shows the ERF bright and the
context dimmed.
"""

from __future__ import annotations

import os
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
    over large batch tensors), and the maps agree to float rounding. On an accelerator, where
    batches pay and single small kernels do not, rows are replicated in batches of
    ``batch_size`` as before."""
    M = positions.shape[0]
    index = torch.arange(M) if image_index is None else image_index.long()
    if index.shape != (M,):
        raise ValueError(f"image_index has shape {tuple(index.shape)}, want ({M},): one image per position")
    if handle.device.type != "cpu":
        return _erf_maps_batched(handle, pixels[index], layer, positions, batch_size)
    maps = torch.empty(M, *pixels.shape[-2:])
    for image in index.unique().tolist():
        rows = (index == image).nonzero().flatten()
        x = pixels[image : image + 1].to(handle.device).clone().requires_grad_(True)
        grid = handle.grid_until(x, layer)[0]  # (C, H, W), graph back to x kept
        for j, row in enumerate(rows.tolist()):
            pfv = grid[:, int(positions[row, 0]), int(positions[row, 1])]
            unit = (pfv / pfv.norm().clamp_min(1e-12)).detach()
            (grad,) = torch.autograd.grad((pfv * unit).sum(), x, retain_graph=j < len(rows) - 1)
            maps[row] = grad[0].abs().sum(0).cpu()
    return maps


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
