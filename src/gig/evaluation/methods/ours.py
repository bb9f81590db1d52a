"""``ours``: the run's own dictionary (bisecting k-means centroids, ``concepts/``) with its Lasso
coder, or a layer's basis with its own encoder (:mod:`gig.basis`) and its decoder bias ``b_dec``
as :attr:`~gig.evaluation.bases.ConceptBasis.bias_` (the zero code stands for ``b_dec``); the
evaluation reads the codes the decompose stage stored instead of coding again."""

from __future__ import annotations

from typing import Any

import torch

from ...errors import RunMismatchError
from ..bases import LassoCoded, LayerContext, coder_settings, register_basis


@register_basis
class RunDictionary(LassoCoded):
    """The dictionary ``V (K, C)`` of ``layer`` in the run at ``run_dir`` and its coder at the λ the
    decompose stage chose. :meth:`fit` reads them from the run (``X`` is not used: the run has
    learned them already); :meth:`codes_for` reads the stored codes of the run's images."""

    name = "ours"
    from_run = True

    def __init__(self, run_dir: str, layer: str):
        self.run_dir = str(run_dir)
        self.layer = layer

    @classmethod
    def for_layer(cls, ctx: LayerContext) -> "RunDictionary":
        return ctx.run_basis

    def fit(self, X: torch.Tensor | None = None) -> "RunDictionary":
        from ...artefacts import load_basis, load_dictionary
        from ...store import RunStore

        store = RunStore.open(self.run_dir)
        basis = load_basis(store, self.layer)
        if basis is not None:  # a layer with a basis of its own: its encoder, its decoder bias, no λ
            self.coder = coder_settings(store.config)
            self.components_ = basis.V.float()
            self.bias_ = None if basis.bias is None else basis.bias.float().cpu()
            self.alpha_ = float("nan")
            self._basis = basis
            self.info_ = {
                "kind": f"{basis.kind} basis (own encoder)",
                "k": basis.k,
                "decoder_bias": basis.bias is not None,
            }
            return self
        self._basis = None
        self.bias_ = None
        alpha = store.summary("decompose").get("alpha", {}).get(self.layer)
        if alpha is None:
            raise RunMismatchError(f"the decompose stage of {store.root} records no λ for layer {self.layer!r}")
        self.coder = coder_settings(store.config)
        self.components_ = load_dictionary(store, self.layer).float()
        self.alpha_ = float(alpha)
        self.info_ = {
            "kind": "bisecting k-means + " + ("OMP" if self.coder.get("coder") == "omp" else "Lasso"),
            "alpha": self.alpha_,
            "debias": self.coder["debias"],
        }
        return self

    @property
    def encoder_(self):
        """The layer's basis encoder where it has one, else the run's coder at its λ."""
        basis = getattr(self, "_basis", None)
        return basis if basis is not None else super().encoder_

    def stored_codes(self, image_ids: list[int]) -> torch.Tensor:
        """The decompose stage's codes ``(n, H·W, K)`` of the run's images ``image_ids``."""
        reader = getattr(self, "_reader", None)
        if reader is None:
            from ...artefacts import CodeReader
            from ...store import RunStore

            reader = self._reader = CodeReader(RunStore.open(self.run_dir), self.layer)
        return torch.stack([reader.codes(i) for i in image_ids])

    def codes_for(self, X: torch.Tensor, image_ids: list[int]) -> torch.Tensor:
        codes = self.stored_codes(image_ids)
        return codes.reshape(-1, codes.shape[-1])

    def _learned(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, values = super()._learned()
        return tensors, {**values, "coder": self.coder}

    def _restore(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        super()._restore(tensors, values)
        self.coder = values["coder"]
