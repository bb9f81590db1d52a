"""Concept bases compared by the extraction protocol: the run's own and three baselines.

Every basis is a dictionary ``V (K, C)`` with an encoder ``X (P, C) → U (P, K)``; a layer output is
rebuilt as ``U V`` (no bias term, so the all-zero code is the all-zero layer output, the GIG
baseline, for every method alike). All baselines are fitted on the run's sampled PFVs (the
collect stage's samples, the same PFVs the run's dictionary came from) with the run's ``K``.

* ``ours``       — the run's bisecting k-means centroids with its sparse codes (stored by the
  decompose stage; the same encoder, :func:`gig.decompose.encoder_for`).
* ``dictionary`` — scikit-learn ``MiniBatchDictionaryLearning`` atoms (unit norm); codes by the
  run's encoder on those atoms (same solver and debiasing), with λ calibrated so that the codes
  are as sparse as the run's own on the same calibration PFVs (equal l0): the two dictionaries
  are compared at the same sparsity. NMF is not used: EfficientNet block
  outputs are signed (no activation after the projection convolution), and NMF needs
  non-negative data.
* ``sae``        — a TopK sparse autoencoder in torch: ``z = TopK_k(ReLU((x/s − b) W_e + c))·s``,
  ``x̂ = z W_d`` with unit-norm decoder rows and no decoder bias; ``k`` defaults to the run's own
  mean number of active concepts per PFV (same sparsity as ours), ``s`` is the mean PFV norm.
* ``kmeans``     — scikit-learn ``KMeans`` centroids; hard code: each position uses only its
  nearest centroid (Euclidean), with the least-squares coefficient ``⟨x, v⟩ / ‖v‖²``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..decompose import FidelityMeter, alpha_for_l0
from ..lasso import LassoEncoder

METHODS = ("ours", "dictionary", "sae", "kmeans")


@dataclass
class ConceptBasis:
    """A method's dictionary ``V (K, C)`` and its encoder ``X (P, C) → U (P, K)``."""

    name: str
    V: torch.Tensor
    encode: Callable[[torch.Tensor], torch.Tensor]
    info: dict = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # what rebuilds it (see from_state)

    @property
    def K(self) -> int:
        return int(self.V.shape[0])


def reconstruction_figures(X: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> dict:
    """Relative error ``‖X − UV‖/‖X‖``, R² against the mean PFV, l0 ratio and active concepts
    per position, over the rows of ``X (P, C)``: the decompose stage's :class:`FidelityMeter`."""
    meter = FidelityMeter(X.shape[1])
    meter.add(X.double(), U.double() @ V.double(), U)
    figures = meter.result()
    figures.pop("top1_agreement")  # no model run here
    return {**figures, "active_per_position": figures["l0_ratio"] * U.shape[1]}


# ---------------------------------------------------------------------------- ours
def ours_basis(encoder: LassoEncoder) -> ConceptBasis:
    """The run's dictionary with its encoder (the evaluation reads the stored codes)."""
    return ConceptBasis("ours", encoder.V.float().cpu(), encoder.encode,
                        {"kind": "bisecting k-means + Lasso", "alpha": encoder.alpha, "debias": encoder.debias})


# ---------------------------------------------------------------------------- dictionary learning
def dictionary_basis(X: torch.Tensor, K: int, target_l0: float, make_encoder: Callable[[torch.Tensor, float], LassoEncoder],
                     seed: int = 0, nonnegative: bool = False, calibration_size: int = 2000, n_iter: int = 5,
                     batch_size: int = 256, fit_alpha: float | None = None) -> ConceptBasis:
    """``MiniBatchDictionaryLearning`` atoms; codes by ``make_encoder(V, λ)`` (the run's encoder)
    with λ calibrated so that the l0 ratio of the codes is ``target_l0`` (the run's own).

    ``fit_alpha`` is the sparsity penalty while learning the atoms (the run passes its own λ
    rescaled to unit-norm atoms, ``λ / median ‖v_q‖``); the final codes use the calibrated λ.
    """
    from sklearn.decomposition import MiniBatchDictionaryLearning
    from sklearn.exceptions import ConvergenceWarning

    t0 = time.perf_counter()
    Xn = X.double().numpy()
    if fit_alpha is None:  # in the data's units: a small share of the typical PFV norm
        fit_alpha = 0.05 * float(np.linalg.norm(Xn, axis=1).mean())
    dl = MiniBatchDictionaryLearning(n_components=K, alpha=fit_alpha, batch_size=min(batch_size, X.shape[0]),
                                     max_iter=n_iter, random_state=seed, fit_algorithm="cd",
                                     positive_code=nonnegative)
    with warnings.catch_warnings():  # coordinate descent inside the fit warns at every batch
        warnings.simplefilter("ignore", ConvergenceWarning)
        dl.fit(Xn)
    V = torch.from_numpy(dl.components_).float()
    V = V / V.norm(dim=1, keepdim=True).clamp_min(1e-12)
    g = torch.Generator().manual_seed(seed)
    calib = X[torch.randperm(X.shape[0], generator=g)[:calibration_size]].float()
    alpha, l0 = alpha_for_l0(calib, V, target_l0, make_encoder)
    enc = make_encoder(V, alpha)
    return ConceptBasis("dictionary", V, enc.encode, {
        "kind": "sklearn MiniBatchDictionaryLearning + the run's encoder", "fit_alpha": fit_alpha,
        "fit_iter": n_iter, "alpha": alpha, "nonnegative": nonnegative, "calibration_l0_ratio": l0,
        "target_l0_ratio": target_l0, "fit_seconds": round(time.perf_counter() - t0, 2)}, {"V": V})


# ---------------------------------------------------------------------------- sparse autoencoder
class TopKSAE(nn.Module):
    """``z = TopK_k(ReLU((x/s − b) W_e + c))·s``, ``x̂ = z W_d`` (unit-norm rows of ``W_d``)."""

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
        a = self.pre(x)
        if self.k < a.shape[1]:
            top = a.topk(self.k, dim=1)
            a = torch.zeros_like(a).scatter_(1, top.indices, top.values)
        return a

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.encode_scaled(x[s : s + 8192].float()) for s in range(0, x.shape[0], 8192)]) \
                * self.scale if x.shape[0] else x.new_zeros(0, self.W_dec.shape[0])

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


def train_sae(X: torch.Tensor, K: int, k: int, seed: int = 0, steps: int = 1500, batch_size: int = 256,
              lr: float = 2e-3) -> tuple[TopKSAE, dict]:
    """Train a TopK SAE on ``X (N, C)`` (seeded, CPU, seconds). Decoder initialised from random
    data rows, encoder as its transpose; decoder rows renormalised after every step, and the
    gradient component along them removed (as in Gao et al. 2024)."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    X = X.float()
    scale = float(X.norm(dim=1).mean().clamp_min(1e-12))
    sae = TopKSAE(X.shape[1], K, max(1, min(k, K)), scale)
    with torch.no_grad():
        init = X[torch.randint(0, X.shape[0], (K,), generator=g)] / scale
        init = init + 0.01 * torch.randn(init.shape, generator=g)
        sae.W_dec.copy_(init)
        sae.normalise_decoder()
        sae.W_enc.copy_(sae.W_dec.T)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    Xs = X / scale
    losses = []
    for step in range(steps):
        idx = torch.randint(0, X.shape[0], (min(batch_size, X.shape[0]),), generator=g)
        xb = Xs[idx]
        z = sae.encode_scaled(xb * scale)
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
        Z = sae.encode(X)
        active = (Z != 0).float().mean(0)
        dead = float((active == 0).float().mean())
        dense = int((active > 0.5).sum())  # always-on latents: a dense basis inside the sparse code
        rel = float((Z @ sae.W_dec - X).norm() / X.norm())
    return sae, {"steps": steps, "lr": lr, "batch_size": batch_size, "k": sae.k, "scale": scale,
                 "final_loss": losses[-1], "train_rel_error": rel, "dead_fraction": dead, "dense_latents": dense,
                 "fit_seconds": round(time.perf_counter() - t0, 2)}


def sae_basis(X: torch.Tensor, K: int, k: int, seed: int = 0, steps: int = 1500) -> ConceptBasis:
    sae, info = train_sae(X, K, k, seed, steps)
    state = {name: p.detach().clone() for name, p in sae.named_parameters()}
    return ConceptBasis("sae", sae.W_dec.detach().clone(), sae.encode, {"kind": "TopK SAE (torch)", **info}, state)


# ---------------------------------------------------------------------------- k-means
def hard_codes(X: torch.Tensor, V: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Each row of ``X`` coded by its nearest row of ``V`` (Euclidean) with coefficient
    ``⟨x, v⟩ / ‖v‖²``; all other coefficients 0."""
    X = X.float()
    V = V.float()
    U = X.new_zeros(X.shape[0], V.shape[0])
    sq = (V * V).sum(1).clamp_min(1e-12)
    for s in range(0, X.shape[0], chunk):
        x = X[s : s + chunk]
        nearest = torch.cdist(x, V).argmin(1)
        coef = (x * V[nearest]).sum(1) / sq[nearest]
        U[s : s + chunk].scatter_(1, nearest[:, None], coef[:, None])
    return U


def kmeans_basis(X: torch.Tensor, K: int, seed: int = 0) -> ConceptBasis:
    from sklearn.cluster import KMeans

    t0 = time.perf_counter()
    km = KMeans(n_clusters=K, n_init=1, random_state=seed).fit(X.double().numpy())
    V = torch.from_numpy(km.cluster_centers_).float()
    return ConceptBasis("kmeans", V, lambda x: hard_codes(x, V), {
        "kind": "sklearn KMeans, hard nearest-centroid code with projection coefficient",
        "inertia": float(km.inertia_), "fit_seconds": round(time.perf_counter() - t0, 2)}, {"V": V})


def from_state(name: str, state: dict[str, torch.Tensor], info: dict,
               make_encoder: Callable[[torch.Tensor, float], LassoEncoder]) -> ConceptBasis:
    """Rebuild a fitted baseline from its saved ``state`` tensors and ``info``; ``make_encoder``
    is the run's encoder factory (for the dictionary baseline's codes)."""
    if name == "dictionary":
        V = state["V"].float()
        enc = make_encoder(V, info["alpha"])
        return ConceptBasis(name, V, enc.encode, info, state)
    if name == "sae":
        W_dec = state["W_dec"].float()
        sae = TopKSAE(W_dec.shape[1], W_dec.shape[0], info["k"], info["scale"])
        sae.load_state_dict(state)
        return ConceptBasis(name, W_dec, sae.encode, info, state)
    if name == "kmeans":
        V = state["V"].float()
        return ConceptBasis(name, V, lambda x: hard_codes(x, V), info, state)
    raise ValueError(f"no saved form for method {name!r}")
