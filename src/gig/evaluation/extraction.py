"""Deletion / insertion of concepts through the real network, batched, and the extraction protocol.

For one image with codes ``U (P, K)``, dictionary ``V (K, C)``, the basis's decoder bias ``b (C,)``
(0 for a basis without one) and an order of the concepts, the ``S`` steps (21 by default) remove
or insert ``m_0 = 0 < m_1 < … < m_{S−1} = K`` concepts in that order. With the concepts split
into the ``S − 1`` blocks ``order[m_j : m_{j+1}]`` and ``B_j = U[:, block_j] V[block_j]`` (each
concept's contribution counted once, ``P·K·C`` flops per order), the step-``i`` layer outputs are

* deletion:  ``b + Σ_{j ≥ i} B_j`` (step 0 = the full reconstruction ``U V + b``, the last step =
  exactly ``b``, the zero code: GIG's baseline),
* insertion: ``b + Σ_{j < i} B_j`` (step 0 = exactly ``b``, the last step = the full reconstruction).

All ``2·S`` replacements of an image (times its orders) go through one
:meth:`~gig.hooks.ModelHandle.run_from` call with the image-major wide batch, so the network
before the layer runs once per image and several images share a forward pass.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..artefacts import load_reconstruction  # noqa: F401  (re-exported: moved to gig.artefacts)
from ..decompose import FidelityMeter
from ..method import GIG
from ..readouts import ClassProbability
from .curves import auc, paired_difference, spread, step_counts, step_fractions

if TYPE_CHECKING:
    from .bases import ConceptBasis
    from .view import RunView

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


def step_outputs(
    codes: torch.Tensor, V: torch.Tensor, order: torch.Tensor, counts: np.ndarray, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Layer outputs of every deletion and insertion step: ``(2, S, P, C)`` (0 = deletion), plus
    the decoder bias ``bias (C,)`` at every step where there is one (the zero code's output)."""
    blocks = ordered_blocks(codes, V, order, counts)
    zero = blocks.new_zeros(1, *blocks.shape[1:])
    inserted = torch.cat([zero, blocks.cumsum(0)])  # Σ_{j<i} B_j
    deleted = torch.cat([blocks.flip(0).cumsum(0).flip(0), zero])  # Σ_{j≥i} B_j
    out = torch.stack([deleted, inserted])
    return out if bias is None else out + bias.to(out)


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
def deletion_insertion(
    handle,
    layer: str,
    pixels: torch.Tensor,
    codes: torch.Tensor,
    V: torch.Tensor,
    orders: torch.Tensor,
    readout: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    read: str | None = None,
    n_points: int = 21,
    batch_rows: int = 126,
    grid_shape: tuple[int, int] | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run every deletion and insertion step of every order through the real network.

    ``pixels (N, 3, S, S)``, ``codes (N, P, K)``, ``V (K, C)``, ``orders (N, O, K)`` (a
    permutation of the concepts per image and order), ``bias (C,)`` the basis's decoder bias
    (None: none; every step's layer output then adds it, so that every concept removed is
    ``bias`` rather than 0). ``readout(out, image_index)`` turns the
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
    bias = None if bias is None else bias.float().to(device)
    codes = codes.float().to(device)
    orders = orders.to(device)
    n_orders = orders.shape[1]
    per_order = 2 * n_points
    result: torch.Tensor | None = None
    for img_idx, ord_idx in _groups(n, n_orders, per_order, batch_rows):
        outs = [step_outputs(codes[i], V, orders[i, o], counts, bias) for i in img_idx for o in ord_idx]
        grid = torch.stack(outs)  # (n_i·o_i, 2, S, P, C)
        # the layout the handle's convolutions run fastest in (channels-last on the gradient copy:
        # no copy of this permuted view, and 2.5-3x faster deletion passes on the CPU)
        grid = grid.reshape(-1, h, w, V.shape[1]).permute(0, 3, 1, 2).contiguous(memory_format=handle.memory_format)
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


# ---------------------------------------------------------------------------- the protocol on a run
def extraction_chunk(view: "RunView", infos: list[dict], bases: dict[str, dict[str, "ConceptBasis"]], bar) -> dict:
    """One chunk of images (run records with ``image_id``, ``target``, ``pred``) through every
    layer and method: per-image curves, AUCs, GIG residuals and reconstruction totals."""
    ids = [i["image_id"] for i in infos]
    targets = torch.tensor([i["target"] for i in infos])
    preds = torch.tensor([i["pred"] for i in infos])
    pixels = view.pixels(infos)
    with torch.no_grad():
        logits, grids = view.handle.capture(pixels, view.plan.layers)
    readout = class_probability(targets, preds)
    rec: dict = {
        "image_id": ids,
        "target": targets.tolist(),
        "p_original": readout(logits, torch.arange(len(ids)))[:, 0].tolist(),
        "layers": {},
    }
    for layer in view.plan.layers:
        n, c, h, w = grids[layer].shape
        X = grids[layer].permute(0, 2, 3, 1).reshape(n * h * w, c)  # (n·H·W, C): every position
        rec["layers"][layer] = {}
        for label, basis in bases[layer].items():
            rec["layers"][layer][label] = method_curves(view, layer, basis, X, (n, h, w), ids, pixels, targets, readout)
            bar.update(n)
    return rec


def method_curves(
    view: "RunView",
    layer: str,
    basis: "ConceptBasis",
    X: torch.Tensor,
    shape: tuple[int, int, int],
    ids: list[int],
    pixels: torch.Tensor,
    targets: torch.Tensor,
    readout,
) -> dict:
    """One method on one layer of a chunk: its codes of ``X (n·H·W, C)``, the GIG ranking to the
    target (from the zero code's output, the basis's decoder bias where it has one), the deletion /
    insertion curves and the reconstruction totals (a meter state)."""
    t0 = time.perf_counter()
    n, h, w = shape
    V, bias = basis.components_, basis.bias_
    codes = basis.codes_for(X, ids).view(n, h * w, -1)
    flat = codes.reshape(-1, codes.shape[-1])
    meter = FidelityMeter(X.shape[1])
    meter.add(X, basis.reconstruct(flat), flat)
    orders, res = rank_by_gig(view.gig(layer, V, bias), pixels, codes, targets)
    s = view.plan.settings
    curves = deletion_insertion(
        view.fast,
        layer,
        pixels,
        codes,
        V,
        orders,
        readout,
        n_points=s.n_points,
        batch_rows=s.batch_rows,
        grid_shape=(h, w),
        bias=bias,
    )
    prob = curves[:, 0, :, :, 0].double().numpy()  # (n, 2, S): target-class probability
    meter.agree += int(curves[:, 0, DELETION, 0, 1].sum())  # full reconstruction keeps the prediction
    meter.n_images += n
    x = step_fractions(V.shape[0], s.n_points)
    return {
        "deletion": prob[:, DELETION].tolist(),
        "insertion": prob[:, INSERTION].tolist(),
        "auc_deletion": auc(prob[:, DELETION], x).tolist(),
        "auc_insertion": auc(prob[:, INSERTION], x).tolist(),
        "gig_rel_residual": res.relative_residual[:, 0].tolist(),
        "gig_delta": res.output_diff[:, 0].tolist(),
        "meter": meter.state(),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def aggregate_extraction(parts: list[dict], bases: dict[str, dict[str, "ConceptBasis"]], plan) -> dict:
    """``extraction.json``: the chunks' records merged into spreads, mean curves and paired
    differences per layer and method."""
    s = plan.settings
    result: dict = {
        "settings": {
            "n_points": s.n_points,
            "n_steps": plan.n_steps,
            "quadrature": plan.quadrature,
            "gig_tol": plan.gig_tol,
            "seed": s.seed,
            "methods": [label for label in next(iter(bases.values()))],
        },
        "layers": {},
    }
    result["settings"]["n_images"] = sum(len(p["image_id"]) for p in parts)
    result["image_id"] = [i for p in parts for i in p["image_id"]]
    result["p_original"] = spread([v for p in parts for v in p["p_original"]], s.n_boot, s.seed)
    for layer, layer_bases in bases.items():
        entries = {
            label: method_entry([p["layers"][layer][label] for p in parts], basis, s)
            for label, basis in layer_bases.items()
        }
        diffs = {label: entry.pop("_diff") for label, entry in entries.items()}
        if "ours" in diffs:  # paired over the same images: ours − method
            for label, entry in entries.items():
                if label != "ours":
                    entry["vs_ours"] = paired_difference(diffs["ours"], diffs[label], s.n_boot, s.seed)
        result["layers"][layer] = entries
    return result


def method_entry(rows: list[dict], basis: "ConceptBasis", s) -> dict:
    """One method on one layer over all chunks ``rows``: spreads over images, mean curves with
    standard errors, reconstruction figures, the fitted basis's details."""
    cat = lambda key: np.concatenate([np.asarray(r[key], dtype=np.float64) for r in rows])  # noqa: E731
    a_ins, a_del = cat("auc_insertion"), cat("auc_deletion")
    dele, ins = cat("deletion"), cat("insertion")  # (n, S)
    fig = FidelityMeter.merge([r["meter"] for r in rows]).result()
    K = basis.n_components_
    fig["active_per_position"] = fig["l0_ratio"] * K
    n = dele.shape[0]
    se = lambda a: (a.std(0, ddof=1) / np.sqrt(n)) if n > 1 else np.zeros(a.shape[1])  # noqa: E731
    return {
        "K": K,
        "auc_diff": spread(a_ins - a_del, s.n_boot, s.seed),
        "auc_insertion": spread(a_ins, s.n_boot, s.seed),
        "auc_deletion": spread(a_del, s.n_boot, s.seed),
        "prob_full": spread(dele[:, 0], s.n_boot, s.seed),
        "prob_zero": spread(dele[:, -1], s.n_boot, s.seed),
        "reconstruction": fig,
        "gig_rel_residual_median": float(np.nanmedian(cat("gig_rel_residual"))),
        "curves": {
            "x": step_fractions(K, s.n_points).tolist(),
            "deletion": dele.mean(0).tolist(),
            "deletion_se": se(dele).tolist(),
            "insertion": ins.mean(0).tolist(),
            "insertion_se": se(ins).tolist(),
        },
        "per_image": {"auc_insertion": a_ins.tolist(), "auc_deletion": a_del.tolist()},
        "basis": dict(basis.info_),
        "seconds": round(sum(r["seconds"] for r in rows), 1),
        "_diff": a_ins - a_del,  # for the paired differences; removed before saving
    }
