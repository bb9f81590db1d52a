"""``nmf``: scikit-learn non-negative matrix factorisation, for layers whose outputs are
non-negative (e.g. post-ReLU ResNet blocks): ``X ≈ W H`` with ``W (N, K) ≥ 0`` the codes and
``H (K, C) ≥ 0`` the concepts. On a signed layer (EfficientNet-Lite blocks end in a linear
projection) it refuses to run; ``dictionary`` is the signed counterpart."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch

from ..bases import ConceptBasis, register_basis


def _non_negative(X: torch.Tensor) -> np.ndarray:
    """``X`` as float64 numpy; InputError when it has negative entries (NMF cannot code them)."""
    from ...basis import require_non_negative

    require_non_negative(X, "the evaluation's nmf method")
    return X.double().numpy()


@register_basis
class NMFBasis(ConceptBasis):
    """``sklearn.decomposition.NMF`` (coordinate descent, Frobenius loss, no penalty, seeded).

    ``transform`` solves for the codes with the concepts fixed: exact non-negative least squares
    per row in float64 (:func:`gig.basis.nnls_codes`, SciPy's active-set NNLS; the same coder as
    the run's ``nmf`` basis), rather than NMF's own coordinate-descent transform, whose batch-wide
    stopping rule leaves codes off by up to a few percent and dependent on the batch.
    """

    name = "nmf"

    def __init__(self, n_components: int, seed: int = 0, max_iter: int = 400, tol: float = 1e-4):
        self.n_components = n_components
        self.seed = seed
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X: torch.Tensor) -> "NMFBasis":
        from sklearn.decomposition import NMF
        from sklearn.exceptions import ConvergenceWarning

        t0 = time.perf_counter()
        model = NMF(self.n_components, random_state=self.seed, max_iter=self.max_iter, tol=self.tol)
        with warnings.catch_warnings():  # reaching max_iter is recorded in info_, not warned
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(_non_negative(X))
        self._set_H(torch.from_numpy(model.components_))
        self.info_ = {
            "kind": "sklearn NMF (cd, Frobenius)",
            "n_iter": int(model.n_iter_),
            "reconstruction_err": float(model.reconstruction_err_),
            "fit_seconds": round(time.perf_counter() - t0, 2),
        }
        return self

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        from ...basis import nnls_codes

        if X.shape[0] == 0:
            return X.new_zeros(0, self.n_components_)
        H = torch.from_numpy(self.H_)  # float64, as sklearn fitted it
        return nnls_codes(torch.from_numpy(_non_negative(X)), H)

    def _set_H(self, H: torch.Tensor) -> None:
        self.H_ = H.double().numpy()  # float64 for the coder, as sklearn fitted it
        self.components_ = H.float()

    def _learned(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"components": torch.from_numpy(self.H_)}, {}

    def _restore(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self._set_H(tensors["components"])
