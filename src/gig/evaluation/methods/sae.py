"""``sae-torch``: a TopK sparse autoencoder written out in torch (Gao et al. 2024), trained on the
run's sampled PFVs, with as many active latents as the run's codes have active concepts per PFV.

The default ``sae`` is Overcomplete's (:mod:`.overcomplete_sae`), which reconstructs better at the
same ``k``; this one needs no extra package and is the default's stand-in without it.

``z = TopK_k(ReLU((x/s − b) W_e + c))·s``, ``x̂ = z W_d`` with unit-norm decoder rows and no
decoder bias (so the zero code is the zero layer output); ``s`` is the mean PFV norm.
"""

from __future__ import annotations

from typing import Any

import torch

from ...sae import TopKSAE, code_figures, train_sae
from ..bases import ConceptBasis, LayerContext, register_basis

__all__ = ["TopKSAE", "TopKSAEBasis", "code_figures", "train_sae"]


@register_basis
class TopKSAEBasis(ConceptBasis):
    """:class:`TopKSAE` with ``n_components`` latents, ``k`` active, trained by :func:`train_sae`."""

    name = "sae-torch"
    uses = ("seed", "sae_k", "sae_steps")

    def __init__(
        self, n_components: int, k: int, seed: int = 0, steps: int = 1500, batch_size: int = 256, lr: float = 2e-3
    ):
        self.n_components = n_components
        self.k = k
        self.seed = seed
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr

    @classmethod
    def for_layer(cls, ctx: LayerContext) -> "TopKSAEBasis":
        return cls(ctx.K, ctx.sae_k, ctx.settings.seed, ctx.settings.sae_steps)

    def fit(self, X: torch.Tensor) -> "TopKSAEBasis":
        self.sae_, info = train_sae(X, self.n_components, self.k, self.seed, self.steps, self.batch_size, self.lr)
        self.components_ = self.sae_.W_dec.detach().clone()
        self.info_ = {"kind": "TopK SAE (torch)", **info}
        return self

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        return self.sae_.encode(X)

    def _learned(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return (
            {name: p.detach() for name, p in self.sae_.named_parameters()},
            {"k": self.sae_.k, "scale": self.sae_.scale},
        )

    def _restore(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        W_dec = tensors["W_dec"].float()
        self.sae_ = TopKSAE(W_dec.shape[1], W_dec.shape[0], values["k"], values["scale"])
        self.sae_.load_state_dict(tensors)
        self.components_ = W_dec
