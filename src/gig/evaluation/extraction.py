"""Deletion / insertion of concepts through the real network, batched, and the extraction protocol.

For one image with codes ``U (P, K)``, dictionary ``V (K, C)`` and an order of the concepts, the
``S`` steps (21 by default) remove or insert ``m_0 = 0 < m_1 < … < m_{S−1} = K`` concepts in that
order. With the concepts split into the ``S − 1`` blocks ``order[m_j : m_{j+1}]`` and
``B_j = U[:, block_j] V[block_j]`` (each concept's contribution counted once, ``P·K·C`` flops per
order), the step-``i`` layer outputs are

* deletion:  ``Σ_{j ≥ i} B_j`` (step 0 = the full reconstruction, the last step = exactly 0),
* insertion: ``Σ_{j < i} B_j`` (step 0 = exactly 0, the last step = the full reconstruction).

All ``2·S`` replacements of an image (times its orders) go through one
:meth:`~gig.hooks.ModelHandle.run_from` call with the image-major wide batch, so the network
before the layer runs once per image and several images share a forward pass.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..attribution import GIG
from ..readouts import ClassProbability
from .curves import step_counts

DELETION, INSERTION = 0, 1


def ordered_blocks(codes: torch.Tensor, V: torch.Tensor, order: torch.Tensor, counts: np.ndarray) -> torch.Tensor:
    """``(S − 1, P, C)``: the contribution of each block of concepts taken in ``order``."""
    blocks = []
    for j in range(len(counts) - 1):
        idx = order[int(counts[j]) : int(counts[j + 1])]
        if idx.numel() == 0:
            blocks.append(codes.new_zeros(codes.shape[0], V.shape[1]))
        else:
            blocks.append(codes[:, idx] @ V[idx])
    return torch.stack(blocks)


def step_outputs(codes: torch.Tensor, V: torch.Tensor, order: torch.Tensor, counts: np.ndarray) -> torch.Tensor:
    """Layer outputs of every deletion and insertion step: ``(2, S, P, C)`` (0 = deletion)."""
    blocks = ordered_blocks(codes, V, order, counts)
    zero = blocks.new_zeros(1, *blocks.shape[1:])
    inserted = torch.cat([zero, blocks.cumsum(0)])  # Σ_{j<i} B_j
    deleted = torch.cat([blocks.flip(0).cumsum(0).flip(0), zero])  # Σ_{j≥i} B_j
    return torch.stack([deleted, inserted])


def _groups(n_images: int, n_orders: int, per_order: int, batch_rows: int):
    """Yield ``(image indices, order indices)`` so that each forward holds about ``batch_rows``
    replacements: whole images while they fit, else one image with a slice of its orders."""
    per_image = n_orders * per_order
    if per_image <= batch_rows:
        step = max(1, batch_rows // per_image)
        for s in range(0, n_images, step):
            yield list(range(s, min(s + step, n_images))), list(range(n_orders))
    else:
        chunk = max(1, batch_rows // per_order)
        for i in range(n_images):
            for s in range(0, n_orders, chunk):
                yield [i], list(range(s, min(s + chunk, n_orders)))


@torch.no_grad()
def deletion_insertion(handle, layer: str, pixels: torch.Tensor, codes: torch.Tensor, V: torch.Tensor,
                       orders: torch.Tensor, readout: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       read: str | None = None, n_points: int = 21, batch_rows: int = 126,
                       grid_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Run every deletion and insertion step of every order through the real network.

    ``pixels (N, 3, S, S)``, ``codes (N, P, K)``, ``V (K, C)``, ``orders (N, O, K)`` (a
    permutation of the concepts per image and order). ``readout(out, image_index)`` turns the
    network's output rows (logits, or the grid of layer ``read``) and the image each row belongs
    to into values ``(M, T)``. Returns ``(N, O, 2, n_points, T)``; index 0 of the third axis is
    deletion, 1 insertion.
    """
    device = handle.device
    n, p, k = codes.shape
    if orders.shape[0] != n or orders.shape[2] != k:
        raise ValueError(f"orders {tuple(orders.shape)} do not fit codes {tuple(codes.shape)}")
    if grid_shape is None:
        _, grids = handle.capture(pixels[:1], [layer])
        grid_shape = tuple(grids[layer].shape[2:])
    h, w = grid_shape
    if h * w != p:
        raise ValueError(f"{p} positions per image do not fit the {h}×{w} grid of {layer}")
    counts = step_counts(k, n_points)
    V = V.float().to(device)
    codes = codes.float().to(device)
    orders = orders.to(device)
    n_orders = orders.shape[1]
    per_order = 2 * n_points
    result: torch.Tensor | None = None
    for img_idx, ord_idx in _groups(n, n_orders, per_order, batch_rows):
        outs = [step_outputs(codes[i], V, orders[i, o], counts) for i in img_idx for o in ord_idx]
        grid = torch.stack(outs)  # (n_i·o_i, 2, S, P, C)
        grid = grid.reshape(-1, h, w, V.shape[1]).permute(0, 3, 1, 2).contiguous()
        out = handle.run_from(pixels[img_idx].to(device), layer, grid, read=read)
        rows_image = torch.tensor(img_idx, device=device).repeat_interleave(len(ord_idx) * per_order)
        values = readout(out, rows_image).float()  # (M, T)
        values = values.view(len(img_idx), len(ord_idx), 2, n_points, -1).cpu()
        if result is None:
            result = torch.full((n, n_orders, 2, n_points, values.shape[-1]), float("nan"))
        for a, i in enumerate(img_idx):
            result[i, ord_idx] = values[a]
    return result


def rank_by_gig(gig: GIG, pixels: torch.Tensor, codes: torch.Tensor, target: torch.Tensor, **kwargs):
    """Concept orders by decreasing GIG to ``target`` (class indices, or concept indices with
    ``read_layer``/``read_vectors``): ``(orders (N, T, K), GIGResult)``; ties keep index order."""
    res = gig.attribute(pixels, codes, target, **kwargs)
    orders = torch.argsort(-res.attributions, dim=-1, stable=True)
    return orders, res


def class_probability(targets: torch.Tensor, predictions: torch.Tensor):
    """A readout for :func:`deletion_insertion` over logits: columns ``[p(target), argmax == pred]``."""

    probability = ClassProbability()

    def readout(logits: torch.Tensor, rows_image: torch.Tensor) -> torch.Tensor:
        t = targets.to(logits.device)[rows_image]
        p = probability.values(logits.float(), t[:, None])[:, 0]
        agree = (logits.argmax(1) == predictions.to(logits.device)[rows_image]).float()
        return torch.stack([p, agree], 1)

    return readout
