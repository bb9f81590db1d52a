"""``dictionary``: scikit-learn ``MiniBatchDictionaryLearning`` atoms coded by the run's own Lasso
coder, with λ calibrated so that the codes are as sparse as the run's (equal l0): the two
dictionaries are compared at the same sparsity."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np
import torch

from ..bases import LassoCoded, LayerContext, coder_settings, register_basis


def unit_atom_scale(V: torch.Tensor, config) -> float:
    """What divides the run's λ into unit-norm atoms' units: the median atom norm of ``V (K, C)``
    for the Lasso on the atoms themselves; 1 where λ already is in those units
    (:func:`gig.decompose.lambda_in_unit_atoms`)."""
    from ...decompose import lambda_in_unit_atoms

    if lambda_in_unit_atoms(config):
        return 1.0
    return float(V.norm(dim=1).median().clamp_min(1e-12))


@register_basis
class DictionaryLearningBasis(LassoCoded):
    """Unit-norm ``MiniBatchDictionaryLearning`` atoms ``(K, C)``; codes by the run's coder at the
    λ whose l0 ratio on ``calibration_size`` fitting rows is ``target_l0``.

    ``fit_alpha`` is the sparsity penalty while learning the atoms (the evaluation passes the
    run's λ in unit-norm atoms' units: ``λ / median ‖v_q‖`` for the Lasso on the concept vectors,
    λ itself where it already is in those units, OMP's correlation stop or the Lasso with
    ``unit_atoms``; ``None``: 5 % of the mean row norm); ``coder``: the run config's decompose fields (:func:`~gig.evaluation.bases.coder_settings`).
    """

    name = "dictionary"
    uses = ("seed", "dictionary_iter")

    def __init__(
        self,
        n_components: int,
        target_l0: float,
        coder: dict[str, Any],
        fit_alpha: float | None = None,
        seed: int = 0,
        calibration_size: int = 2000,
        n_iter: int = 5,
        batch_size: int = 256,
    ):
        self.n_components = n_components
        self.target_l0 = target_l0
        self.coder = coder
        self.fit_alpha = fit_alpha
        self.seed = seed
        self.calibration_size = calibration_size
        self.n_iter = n_iter
        self.batch_size = batch_size

    @classmethod
    def for_layer(cls, ctx: LayerContext) -> "DictionaryLearningBasis":
        run = ctx.run_basis
        # a layer with a basis of its own has no λ (NaN): fit in the data's units then
        fit_alpha = None if math.isnan(run.alpha_) else float(run.alpha_ / unit_atom_scale(run.components_, ctx.config))
        return cls(
            ctx.K,
            ctx.run_l0_ratio,
            coder_settings(ctx.config),
            fit_alpha,
            ctx.settings.seed,
            ctx.config.calibration_size,
            ctx.settings.dictionary_iter,
        )

    def fit(self, X: torch.Tensor) -> "DictionaryLearningBasis":
        from sklearn.decomposition import MiniBatchDictionaryLearning
        from sklearn.exceptions import ConvergenceWarning

        t0 = time.perf_counter()
        Xn = X.double().numpy()
        fit_alpha = self.fit_alpha
        if fit_alpha is None:  # in the data's units: a small share of the typical row norm
            fit_alpha = 0.05 * float(np.linalg.norm(Xn, axis=1).mean())
        dl = MiniBatchDictionaryLearning(
            n_components=self.n_components,
            alpha=fit_alpha,
            batch_size=min(self.batch_size, X.shape[0]),
            max_iter=self.n_iter,
            random_state=self.seed,
            fit_algorithm="cd",
            positive_code=self.coder["nonnegative"],
        )
        with warnings.catch_warnings():  # coordinate descent inside the fit warns at every batch
            warnings.simplefilter("ignore", ConvergenceWarning)
            dl.fit(Xn)
        V = torch.from_numpy(dl.components_).float()
        self.components_ = V / V.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.alpha_, l0 = self.calibrate(X, self.target_l0, self.seed, self.calibration_size)
        self.info_ = {
            "kind": "sklearn MiniBatchDictionaryLearning + the run's encoder",
            "fit_alpha": fit_alpha,
            "fit_iter": self.n_iter,
            "alpha": self.alpha_,
            "nonnegative": self.coder["nonnegative"],
            "calibration_l0_ratio": l0,
            "target_l0_ratio": self.target_l0,
            "fit_seconds": round(time.perf_counter() - t0, 2),
        }
        return self
