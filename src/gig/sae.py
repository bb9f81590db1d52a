"""A TopK sparse autoencoder written out in torch (Gao et al. 2024), trained on sampled PFVs:
a layer's concept basis in a run (``bases: {LAYER: sae}``, :mod:`gig.basis`) and a baseline of
the evaluation (``sae-torch``, :mod:`gig.evaluation.methods.sae`).

``z = TopK_k(ReLU((x/s − b) W_e + c))·s``, ``x̂ = z W_d`` with unit-norm decoder rows and no
decoder bias (so the zero code is the zero layer output); ``s`` is the mean PFV norm.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


class TopKSAE(nn.Module):
    """``z = TopK_k(ReLU((x/s − b) W_e + c))·s``, ``x̂ = z W_d`` (unit-norm rows of ``W_d (K, C)``)."""

    def __init__(self, channels: int, n_latents: int, k: int, scale: float):
        super().__init__()
        self.k = int(k)
        self.scale = float(scale)
        self.W_dec = nn.Parameter(torch.empty(n_latents, channels))
        self.W_enc = nn.Parameter(torch.empty(channels, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_pre = nn.Parameter(torch.zeros(channels))

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x / self.scale - self.b_pre) @ self.W_enc + self.b_enc)

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        """Codes ``(N, K)`` in the scaled units (before the factor ``s``)."""
        a = self.pre(x)
        if self.k < a.shape[1]:
            top = a.topk(self.k, dim=1)
            a = torch.zeros_like(a).scatter_(1, top.indices, top.values)
        return a

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes ``(N, K)`` of ``x (N, C)`` in the data's units (chunks of 8192 rows)."""
        with torch.no_grad():
            return (
                torch.cat([self.encode_scaled(x[s : s + 8192].float()) for s in range(0, x.shape[0], 8192)])
                * self.scale
                if x.shape[0]
                else x.new_zeros(0, self.W_dec.shape[0])
            )

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


def _initialised(X: torch.Tensor, K: int, k: int, g: torch.Generator) -> TopKSAE:
    """Decoder from random data rows (plus 1 % noise), unit-norm; encoder as its transpose."""
    scale = float(X.norm(dim=1).mean().clamp_min(1e-12))
    sae = TopKSAE(X.shape[1], K, max(1, min(k, K)), scale)
    with torch.no_grad():
        init = X[torch.randint(0, X.shape[0], (K,), generator=g)] / scale
        init = init + 0.01 * torch.randn(init.shape, generator=g)
        sae.W_dec.copy_(init)
        sae.normalise_decoder()
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


def code_figures(Z: torch.Tensor, V: torch.Tensor, X: torch.Tensor) -> dict[str, Any]:
    """Relative error of ``Z (N, K) @ V (K, C)`` against ``X (N, C)``, the share of dead latents
    and the number of always-on (dense) ones: an SAE's training figures."""
    active = (Z != 0).float().mean(0)
    return {
        "train_rel_error": float((Z @ V - X).norm() / X.norm()),
        "dead_fraction": float((active == 0).float().mean()),
        # always-on latents: a dense basis inside the sparse code
        "dense_latents": int((active > 0.5).sum()),
    }


def train_sae(
    X: torch.Tensor, K: int, k: int, seed: int = 0, steps: int = 1500, batch_size: int = 256, lr: float = 2e-3
) -> tuple[TopKSAE, dict]:
    """Train a TopK SAE with ``K`` latents, ``k`` active, on ``X (N, C)`` (seeded, CPU, seconds).
    Decoder rows renormalised after every step, and the gradient component along them removed
    (as in Gao et al. 2024). Returns the SAE and its training figures."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    X = X.float()
    sae = _initialised(X, K, k, g)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    Xs = X / sae.scale
    losses = []
    for step in range(steps):
        idx = torch.randint(0, X.shape[0], (min(batch_size, X.shape[0]),), generator=g)
        xb = Xs[idx]
        z = sae.encode_scaled(xb * sae.scale)
        loss = ((z @ sae.W_dec - xb) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():  # keep the decoder on the unit sphere
            W, G = sae.W_dec, sae.W_dec.grad
            G.sub_((G * W).sum(1, keepdim=True) * W)
        opt.step()
        sae.normalise_decoder()
        if step % 100 == 0 or step == steps - 1:
            losses.append(float(loss.detach()))
    with torch.no_grad():
        figures = code_figures(sae.encode(X), sae.W_dec, X)
    return sae, {
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "k": sae.k,
        "scale": sae.scale,
        "final_loss": losses[-1],
        **figures,
        "fit_seconds": round(time.perf_counter() - t0, 2),
    }
