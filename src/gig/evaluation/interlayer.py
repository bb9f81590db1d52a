"""Inter-layer insertion / deletion: do the concepts GIG ranks first drive a later concept?

For a transition ``a → b`` between consecutive run layers and one image:

1. targets: the image's top-``T`` concepts of layer ``b`` by concept → class GIG at ``b`` (the
   run's target class; ``T = 5``);
2. each target ``r`` is read as ``g_r = max_p ⟨x^b_p, v_r⟩ / ‖v_r‖``
   (:func:`~gig.readouts.concept_readout`) on the output of the real network from ``a`` to
   ``b``, normalised by its value with nothing removed (layer ``a`` replaced by its full
   reconstruction); targets whose value is not positive there are left out (counted);
3. layer-``a`` concepts are deleted from / inserted into the code in the order given by:

   * ``gig``          — GIG from ``a``'s concepts to ``g_r`` (one order per target);
   * ``grad_x_coef``  — one step: ``Σ_p U[p, q] ⟨∂g_r/∂X̃_p, V_q⟩`` at the full reconstruction
     (one order per target);
   * ``magnitude``    — ``Σ_p |U[p, q]|`` (one order per image, read for every target);
   * ``random``       — uniform random permutations, ``n_random`` per image (each read for every
     target), their AUCs averaged;

4. AUC(insertion) − AUC(deletion) per (image, target); an image's value is the mean over its
   targets, and the spread is over images.

A layer whose basis has a decoder bias ``b`` (:attr:`~gig.evaluation.bases.ConceptBasis.bias_`)
is rebuilt as ``U V + b`` everywhere here: every concept of ``a`` removed is ``b``, the start of
the GIG paths of both layers, and ``grad_x_coef`` is taken at ``U V + b``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..readouts import ConceptReadout, concept_readout
from .curves import auc, paired_difference, spread, step_fractions
from .extraction import DELETION, INSERTION, deletion_insertion, rank_by_gig
from .settings import ORDERINGS  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from .view import RunView


def concept_value_readout(targets: torch.Tensor, read_vectors: torch.Tensor):
    """A readout for :func:`~gig.evaluation.extraction.deletion_insertion` over a read grid:
    every row's values of its image's targets, ``(M, T)``."""
    concept = ConceptReadout(None, read_vectors)

    def readout(grid: torch.Tensor, rows_image: torch.Tensor) -> torch.Tensor:
        return concept.values(grid.float(), targets.to(grid.device)[rows_image])

    return readout


def grad_x_coef(
    handle,
    layer: str,
    read_layer: str,
    pixels: torch.Tensor,
    codes: torch.Tensor,
    V: torch.Tensor,
    read_vectors: torch.Tensor,
    targets: torch.Tensor,
    grid_shape: tuple[int, int],
    batch_rows: int = 64,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-step attribution ``Σ_p U[p,q] ⟨∇_{X̃_p} g_t(X̃), V_q⟩`` at the full reconstruction
    ``X̃ = U V + bias`` (``bias (C,)``: the decoder bias, None for none):
    ``codes (N, P, K)``, ``targets (N, T)`` → ``(N, T, K)``."""
    device = handle.device
    n, p, k = codes.shape
    t = targets.shape[1]
    h, w = grid_shape
    V = V.float().to(device)
    rv = read_vectors.float().to(device)
    out = torch.zeros(n, t, k)
    per = max(1, batch_rows // t)
    for s in range(0, n, per):
        idx = slice(s, min(s + per, n))
        u = codes[idx].float().to(device)
        x = u @ V if bias is None else u @ V + bias.float().to(device)
        recon = x.transpose(1, 2).reshape(u.shape[0], -1, h, w)
        grid = recon.repeat_interleave(t, 0).requires_grad_(True)
        read = handle.run_from(pixels[idx].to(device), layer, grid, read=read_layer)
        tg = targets[idx].to(device).flatten()
        (grad,) = torch.autograd.grad(concept_readout(read, rv[tg]).sum(), grid)
        g = grad.flatten(2).transpose(1, 2).reshape(u.shape[0], t, p, -1)  # (n, T, P, C)
        out[idx] = torch.einsum("npk,ntpk->ntk", u, g @ V.T).detach().cpu()
    return out


def magnitude_scores(codes: torch.Tensor) -> torch.Tensor:
    """``Σ_p |U[p, q]|``: ``(N, P, K)`` → ``(N, K)``."""
    return codes.abs().sum(1)


def random_orders(n_concepts: int, n_random: int, seed: int, image_id: int, salt: int = 0) -> torch.Tensor:
    """``(n_random, K)`` random permutations, seeded by ``(seed, image_id, salt)`` (independent of
    batching and of which other images are evaluated)."""
    rng = np.random.default_rng([seed, image_id, salt, 7])
    return torch.from_numpy(np.stack([rng.permutation(n_concepts) for _ in range(n_random)]).astype(np.int64))


def descending(scores: torch.Tensor) -> torch.Tensor:
    """Orders by decreasing score along the last axis (ties keep index order)."""
    return torch.argsort(-scores, dim=-1, stable=True)


# ---------------------------------------------------------------------------- the protocol on a run
#: Orderings with one order per target; the others give one or more orders per image, read for every target.
PER_TARGET = ("gig", "grad_x_coef")


def interlayer_chunk(view: "RunView", t_index: int, a: str, b: str, infos: list[dict], bar) -> dict:
    """One chunk of images on the transition ``a → b``: targets at ``b``, every ordering's
    deletion / insertion curves of the targets' readouts, normalised, with their AUCs."""
    s = view.plan.settings
    ids = [i["image_id"] for i in infos]
    pixels = view.pixels(infos)
    run_a, run_b = view.run_bases[a], view.run_bases[b]
    Va, Vb = run_a.components_, run_b.components_
    Ua, Ub = run_a.stored_codes(ids), run_b.stored_codes(ids)  # (n, P, K) the run's codes
    T = min(s.n_targets, Vb.shape[0])
    _, res_b = rank_by_gig(view.gig(b, Vb, run_b.bias_), pixels, Ub, torch.tensor([i["target"] for i in infos]))
    top = res_b.attributions[:, 0].topk(T, dim=1).indices  # (n, T): targets = top concepts → class at b
    rec: dict = {
        "image_id": ids,
        "targets": top.tolist(),
        "target_class_gig": res_b.attributions[:, 0].gather(1, top).tolist(),
    }
    grid_a = view.gig(a, Va, run_a.bias_).grid_shape(pixels)
    blocks, orders = ordering_blocks(view, t_index, a, b, pixels, Ua, top, grid_a, ids, rec)
    curves = deletion_insertion(
        view.fast,
        a,
        pixels,
        Ua,
        Va,
        orders,
        concept_value_readout(top, Vb),
        read=b,
        n_points=s.n_points,
        batch_rows=s.batch_rows,
        grid_shape=grid_a,
        bias=run_a.bias_,
    )
    rec.update(ordering_curves(curves.double(), blocks, Va.shape[0], s.n_points))
    bar.update(len(ids))
    return rec


def ordering_blocks(
    view: "RunView",
    t_index: int,
    a: str,
    b: str,
    pixels: torch.Tensor,
    Ua: torch.Tensor,
    top: torch.Tensor,
    grid_a: tuple[int, int],
    ids: list[int],
    rec: dict,
) -> tuple[dict[str, tuple[int, int]], torch.Tensor]:
    """Every chosen ordering's concept orders of layer ``a`` (codes ``Ua (n, P, K)``, grid
    ``grid_a``) for the targets ``top (n, T)`` at ``b``, stacked ``(n, O, K)``, and where each
    ordering's block starts and how many orders it has (``{name: (start, count)}``); the GIG
    residuals go into ``rec``."""
    s = view.plan.settings
    Va, Vb = view.run_bases[a].components_, view.run_bases[b].components_
    bias_a = view.run_bases[a].bias_  # the zero code of a: where the paths start, what deletion ends at
    T = top.shape[1]
    blocks: dict[str, tuple[int, int]] = {}
    orders: list[torch.Tensor] = []

    def add(name: str, block: torch.Tensor, count: int) -> None:
        blocks[name] = (sum(o.shape[1] for o in orders), count)
        orders.append(block)

    if "gig" in s.orderings:
        res = view.gig(a, Va, bias_a).attribute(pixels, Ua, top, read_layer=b, read_vectors=Vb)
        add("gig", descending(res.attributions), T)
        rec["gig_rel_residual"] = res.relative_residual.tolist()
    if "grad_x_coef" in s.orderings:
        gx = grad_x_coef(view.handle, a, b, pixels, Ua, Va, Vb, top, grid_a, view.plan.internal_batch_size, bias_a)
        add("grad_x_coef", descending(gx), T)
    if "magnitude" in s.orderings:
        add("magnitude", descending(magnitude_scores(Ua))[:, None], 1)
    if "random" in s.orderings:
        add(
            "random", torch.stack([random_orders(Va.shape[0], s.n_random, s.seed, i, t_index) for i in ids]), s.n_random
        )
    return blocks, torch.cat(orders, 1)


def ordering_curves(curves: torch.Tensor, blocks: dict[str, tuple[int, int]], K: int, n_points: int) -> dict:
    """Per ordering: curves ``(n, O, 2, S, T)`` normalised by each target's full value (nothing
    removed), their AUCs per (image, target) and mean curves over the ordering's orders."""
    T = curves.shape[-1]
    full = curves[:, :, DELETION, 0, :].mean(1)  # nothing removed: the same for every order
    valid = full > 1e-6
    norm = curves / torch.where(valid, full, torch.ones_like(full))[:, None, None, None, :]
    x = step_fractions(K, n_points)
    out: dict = {"full_value": full.tolist(), "valid": valid.tolist(), "orderings": {}}
    arange_t = torch.arange(T)
    for name, (start, count) in blocks.items():
        if name in PER_TARGET:  # order j belongs to target j
            c = norm[:, start + arange_t, :, :, arange_t].permute(1, 0, 2, 3)[:, None]  # (n, 1, T, 2, S)
        else:  # every order read for every target
            c = norm[:, start : start + count].permute(0, 1, 4, 2, 3)  # (n, R, T, 2, S)
        mean_c = c.mean(1).numpy()  # (n, T, 2, S)
        out["orderings"][name] = {
            "auc_deletion": auc(c[:, :, :, DELETION].numpy(), x).mean(1).tolist(),
            "auc_insertion": auc(c[:, :, :, INSERTION].numpy(), x).mean(1).tolist(),
            "deletion": mean_c[:, :, DELETION].tolist(),
            "insertion": mean_c[:, :, INSERTION].tolist(),
        }
    return out


def aggregate_transition(parts: list[dict], a: str, b: str, K_source: int, s) -> dict:
    """One transition of ``interlayer.json``: the chunks merged into spreads over images (an
    image's value is the mean over its valid targets), mean curves and paired GIG − ordering."""
    valid = np.concatenate([np.asarray(p["valid"], dtype=bool) for p in parts])  # (n, T)
    out: dict = {
        "source": a,
        "target_layer": b,
        "K_source": K_source,
        "n_images": int(valid.shape[0]),
        "n_targets_valid": int(valid.sum()),
        "n_targets_total": int(valid.size),
        "orderings": {},
    }
    if any("gig_rel_residual" in p for p in parts):
        r = np.concatenate([np.asarray(p["gig_rel_residual"], dtype=np.float64) for p in parts])
        out["gig_rel_residual_median"] = float(np.nanmedian(np.where(valid, r, np.nan))) if valid.any() else None
    per_image_diff = {}
    for name in s.orderings:
        out["orderings"][name], per_image_diff[name] = ordering_entry(
            [p["orderings"][name] for p in parts], valid, K_source, s
        )
    if "gig" in per_image_diff:
        for name in s.orderings:
            if name != "gig":
                out["orderings"][name]["gig_minus"] = paired_difference(
                    per_image_diff["gig"], per_image_diff[name], s.n_boot, s.seed
                )
    return out


def ordering_entry(rows: list[dict], valid: np.ndarray, K_source: int, s) -> tuple[dict, np.ndarray]:
    """One ordering of a transition over all chunks ``rows``: its entry and per-image AUC differences."""
    cat = lambda key: np.concatenate([np.asarray(r[key], dtype=np.float64) for r in rows])  # noqa: E731
    a_ins, a_del = cat("auc_insertion"), cat("auc_deletion")  # (n, T)
    dele, ins = cat("deletion"), cat("insertion")  # (n, T, S)
    mask = np.where(valid, 1.0, np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # images whose targets are all invalid: empty means
        img_ins = np.nanmean(a_ins * mask, 1)
        img_del = np.nanmean(a_del * mask, 1)
        img_dele = np.nanmean(dele * mask[..., None], 1)  # (n, S)
        img_insc = np.nanmean(ins * mask[..., None], 1)
    ok = ~np.isnan(img_dele[:, 0])
    n_ok = int(ok.sum())
    se = lambda arr: (arr[ok].std(0, ddof=1) / np.sqrt(n_ok)) if n_ok > 1 else np.zeros(arr.shape[1])  # noqa: E731
    entry = {
        "auc_diff": spread(img_ins - img_del, s.n_boot, s.seed),
        "auc_insertion": spread(img_ins, s.n_boot, s.seed),
        "auc_deletion": spread(img_del, s.n_boot, s.seed),
        "curves": {
            "x": step_fractions(K_source, s.n_points).tolist(),
            "deletion": img_dele[ok].mean(0).tolist(),
            "deletion_se": se(img_dele).tolist(),
            "insertion": img_insc[ok].mean(0).tolist(),
            "insertion_se": se(img_insc).tolist(),
        },
        "per_image": {"auc_insertion": img_ins.tolist(), "auc_deletion": img_del.tolist()},
    }
    return entry, img_ins - img_del
