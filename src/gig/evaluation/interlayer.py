"""Inter-layer insertion / deletion: do the concepts GIG ranks first drive a later concept?

For a transition ``a → b`` between consecutive run layers and one image:

1. targets: the image's top-``T`` concepts of layer ``b`` by concept → class GIG at ``b`` (the
   run's target class; ``T = 5``);
2. each target ``r`` is read as ``g_r = max_p ⟨x^b_p, v_r⟩ / ‖v_r‖``
   (:func:`~gig.attribution.concept_readout`) on the output of the real network from ``a`` to
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
"""

from __future__ import annotations

import numpy as np
import torch

from ..readouts import ConceptReadout, concept_readout

ORDERINGS = ("gig", "random", "grad_x_coef", "magnitude")


def concept_value_readout(targets: torch.Tensor, read_vectors: torch.Tensor):
    """A readout for :func:`~gig.evaluation.extraction.deletion_insertion` over a read grid:
    every row's values of its image's targets, ``(M, T)``."""
    concept = ConceptReadout(None, read_vectors)

    def readout(grid: torch.Tensor, rows_image: torch.Tensor) -> torch.Tensor:
        return concept.values(grid.float(), targets.to(grid.device)[rows_image])

    return readout


def grad_x_coef(handle, layer: str, read_layer: str, pixels: torch.Tensor, codes: torch.Tensor,
                V: torch.Tensor, read_vectors: torch.Tensor, targets: torch.Tensor,
                grid_shape: tuple[int, int], batch_rows: int = 64) -> torch.Tensor:
    """One-step attribution ``Σ_p U[p,q] ⟨∇_{X̃_p} g_t(X̃), V_q⟩`` at the full reconstruction:
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
        recon = (u @ V).transpose(1, 2).reshape(u.shape[0], -1, h, w)
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
