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

from .hooks import ModelHandle


def erf_maps(
    handle: ModelHandle, pixels: torch.Tensor, layer: str, positions: torch.Tensor, batch_size: int = 16
) -> torch.Tensor:
    """ERFs of one PFV per item: ``pixels (M, 3, S, S)``, ``positions (M, 2)`` as (h, w) → ``(M, S, S)``.
    The forward pass stops at ``layer`` (:meth:`ModelHandle.grid_until`): the ERF only needs the
    network below it."""
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

    def inside(t, b, l, r):
        return integral[b, r] - integral[t, r] - integral[b, l] + integral[t, l]

    for radius in range(1, max(h, w) + 1):
        t, b = max(0, cy - radius), min(h, cy + radius + 1)
        l, r = max(0, cx - radius), min(w, cx + radius + 1)
        if inside(t, b, l, r) >= mass * total:
            return l, t, r, b
    return 0, 0, w, h


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
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    shade = np.full(array.shape[:2], dim, dtype=np.float32)
    shade[t:b, l:r] = 1.0
    crop = (array * shade[..., None])[ct:cb, cl:cr].clip(0, 255).astype(np.uint8)
    return Image.fromarray(crop).resize((size, size), Image.BICUBIC)


def erf_dir(store, layer: str) -> Path:
    """Where new ERF crops of ``layer`` are written: ``RUN/erf/COLLECT_HASH/LAYER``. Keyed by the
    collect stage's hash (its settings and input fingerprint), so a recomputed collect, whose
    sample indices name other PFVs, never shows the crops of the old ones. A run directory that
    cannot be written (a read-only mount, another user's run) stays untouched: the crops then go
    to the user's cache (:func:`gig.store.derived_dir`)."""
    from .store import derived_dir

    return derived_dir(store, "erf", store.expected_hash("collect"), layer)


def crop_paths(store, layer: str, sample_indices: list[int]) -> list[Path]:
    """The cached ERF crops of sampled PFVs ``sample_indices`` of ``layer``: the run's own where
    it has them (also in a read-only run), else where :func:`erf_dir` writes them. The folders
    are worked out once (each asks the manifest for the collect hash), not per crop."""
    collect = store.expected_hash("collect")
    in_run, out = store.root / "erf" / collect / layer, erf_dir(store, layer)
    return [in_run / f"s{i}.png" if (in_run / f"s{i}.png").is_file() else out / f"s{i}.png" for i in sample_indices]


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically: a crash or a full disk never leaves a truncated file that a later
    reader would take for a cached crop."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        image.save(tmp, format="PNG")
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
    :func:`erf_dir` as ``s{index}.png``. Only the missing ones are computed, in batches of PFVs
    grouped by image, so each image is read and preprocessed once however many of its PFVs are
    asked for; the pipeline's ``gig concept`` and the report share this one cache."""
    from .collect import load_samples

    out = erf_dir(store, layer)
    paths = crop_paths(store, layer, sample_indices)
    missing = sorted({i for i, p in zip(sample_indices, paths) if not p.exists()})
    if not missing:
        return paths
    table = load_samples(store, layer)
    by_id = {r.image_id: r for r in source.records}
    missing.sort(key=lambda i: int(table["image_id"][i]))  # PFVs of one image together
    # The batch-norm-folded copy (ModelHandle.measuring): the same function, about 2x faster for
    # these forward and backward passes; the crops depend on the maps only through their boxes.
    fast = handle.measuring([layer])
    views: dict[int, tuple[Image.Image, torch.Tensor]] = {}
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        ids = [int(table["image_id"][i]) for i in chunk]
        for image_id in ids:
            if image_id not in views:
                image = source.load(by_id[image_id])
                views[image_id] = (handle.bundle.display_image(image), handle.bundle.preprocess(image))
        maps = erf_maps(fast, torch.stack([views[i][1] for i in ids]), layer, table["pos"][chunk], batch_size)
        for i, image_id, erf in zip(chunk, ids, maps):
            save_png(erf_crop(views[image_id][0], erf.numpy(), mass, margin), out / f"s{i}.png")
        keep = {int(table["image_id"][i]) for i in missing[start + batch_size : start + 2 * batch_size]}
        views = {k: v for k, v in views.items() if k in keep}
    return paths
