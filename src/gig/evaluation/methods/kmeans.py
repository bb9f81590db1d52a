"""``kmeans``: scikit-learn ``KMeans`` centroids with a hard code: each position uses only its
nearest centroid (Euclidean), with the least-squares coefficient ``⟨x, v⟩ / ‖v‖²``."""

from __future__ import annotations

import time

import torch

from ..bases import ConceptBasis, register_basis


def hard_codes(X: torch.Tensor, V: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Codes ``(N, K)`` of ``X (N, C)``: each row by its nearest row of ``V (K, C)`` (Euclidean)
    with coefficient ``⟨x, v⟩ / ‖v‖²``; all other coefficients 0."""
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


@register_basis
class KMeansBasis(ConceptBasis):
    """``KMeans(n_components, n_init=1, random_state=seed)`` centroids ``(K, C)``, :func:`hard_codes`."""

    name = "kmeans"

    def __init__(self, n_components: int, seed: int = 0):
        self.n_components = n_components
        self.seed = seed

    def fit(self, X: torch.Tensor) -> "KMeansBasis":
        from sklearn.cluster import KMeans

        t0 = time.perf_counter()
        km = KMeans(n_clusters=self.n_components, n_init=1, random_state=self.seed).fit(X.double().numpy())
        self.components_ = torch.from_numpy(km.cluster_centers_).float()
        self.info_ = {
            "kind": "sklearn KMeans, hard nearest-centroid code with projection coefficient",
            "inertia": float(km.inertia_),
            "fit_seconds": round(time.perf_counter() - t0, 2),
        }
        return self

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        return hard_codes(X, self.components_)
