"""``sae``: the TopK SAE of Overcomplete (PyPI ``overcomplete``, Fel et al.'s vision
dictionary-learning toolbox; ``pip install 'gig[overcomplete]'``), trained by its own loop.

The default SAE baseline: on the embedded default run (19 images, Lite0, four blocks) it
reconstructs the layers with 27–48 % less relative error than the hand-written ``sae-torch``
(:mod:`.sae`) at the same ``k`` (docs/evaluation.md). Without the package the default method
list uses ``sae-torch`` instead (:func:`gig.evaluation.settings.default_methods`).

Same protocol as ``sae-torch``, so the two compare one to one: the same
latents ``K``, active latents ``k``, PFVs scaled by their mean norm ``s``, Adam at the same rate
and batch size for the same number of steps (rounded up to whole epochs), MSE loss. Overcomplete's
own choices stay: a linear encoder with bias and ReLU, a dictionary renormalised to unit rows at
every step, Xavier initialisation, gradient clipping at 1, no decoder bias (so the zero code is
the zero layer output, as the protocol needs).
"""

from __future__ import annotations

import importlib.util
import math
import time
from typing import Any

import torch

from ...errors import InputError
from ..bases import register_basis
from .sae import TopKSAEBasis, code_figures


def _overcomplete_sae():
    """Overcomplete's ``TopKSAE`` and ``train_sae``. Overcomplete 0.3.0 imports its plotting
    helpers with ``matplotlib.cm.get_cmap``, removed in matplotlib 3.9: the alias is restored
    first (same function, ``matplotlib.colormaps.get_cmap``)."""
    import matplotlib
    import matplotlib.cm

    if not hasattr(matplotlib.cm, "get_cmap"):
        matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
    from overcomplete.sae import TopKSAE, train_sae

    return TopKSAE, train_sae


def _overcomplete_batchtopk():
    """Overcomplete's ``BatchTopKSAE`` (imported as :func:`_overcomplete_sae` does)."""
    _overcomplete_sae()
    from overcomplete.sae import BatchTopKSAE

    return BatchTopKSAE


def _mse(x, x_hat, *_):
    """Overcomplete's loss signature ``(x, x_hat, pre_codes, codes, dictionary)``: plain MSE (TopK
    sets the sparsity, no penalty)."""
    return (x - x_hat).square().mean()


@register_basis
class OvercompleteTopKSAE(TopKSAEBasis):
    """Overcomplete ``TopKSAE(C, K, top_k=k)`` on PFVs scaled by ``1/s``; codes ``z·s (N, K)``,
    ``components_`` its unit-norm dictionary ``(K, C)``. Same parameters (and ``uses``) as the
    hand-written :class:`TopKSAEBasis`, so the two are compared at equal K, k, steps and rate."""

    name = "sae"
    kind = "Overcomplete TopKSAE (train_sae)"
    drop_last = False  # every PFV is trained on

    @classmethod
    def problem(cls) -> str | None:
        if importlib.util.find_spec("overcomplete") is None:
            return (
                "sae (Overcomplete's TopK SAE) needs the optional package overcomplete: "
                "pip install 'gig[overcomplete]'; sae-torch is the hand-written TopK SAE without it"
            )
        return None

    def _model(self, channels: int):
        TopKSAE, _ = _overcomplete_sae()
        return TopKSAE(channels, nb_concepts=self.n_components, top_k=max(1, min(self.k, self.n_components)))

    def fit(self, X: torch.Tensor) -> "OvercompleteTopKSAE":
        if self.problem():
            raise InputError(self.problem())
        _, train = _overcomplete_sae()
        t0 = time.perf_counter()
        X = X.float()
        self.scale_ = float(X.norm(dim=1).mean().clamp_min(1e-12))
        batch = self.batch_ = min(self.batch_size, X.shape[0])
        epochs = max(1, math.ceil(self.steps * batch / X.shape[0]))
        with torch.random.fork_rng():  # Overcomplete initialises from the global generator: seed it, leave it
            torch.manual_seed(self.seed)
            self.model_ = self._model(X.shape[1])
            loader = torch.utils.data.DataLoader(
                X / self.scale_,
                batch_size=batch,
                shuffle=True,
                generator=torch.Generator().manual_seed(self.seed),
                drop_last=self.drop_last,
            )
            opt = torch.optim.Adam(self.model_.parameters(), lr=self.lr)
            train(self.model_, loader, _mse, opt, nb_epochs=epochs, monitoring=0)  # 0: no printing
        self._finish()
        self.info_ = {
            "kind": self.kind,
            "epochs": epochs,
            "steps": epochs * len(loader),
            "lr": self.lr,
            "batch_size": batch,
            "k": self.k,
            "scale": self.scale_,
            **self._threshold_info(),
            **code_figures(self.transform(X), self.components_, X),
            "fit_seconds": round(time.perf_counter() - t0, 2),
        }
        return self

    def _threshold_info(self) -> dict[str, float]:
        return {}

    def _finish(self) -> None:
        self.model_.eval()  # fuses the (normalised) dictionary
        self.components_ = self.model_.get_dictionary().detach().clone()

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            chunks = [self.model_.encode(X[s : s + 8192].float() / self.scale_)[1] for s in range(0, X.shape[0], 8192)]
        return torch.cat(chunks) * self.scale_ if chunks else X.new_zeros(0, self.n_components)

    def _learned(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return dict(self.model_.state_dict()), {"scale": self.scale_}

    def _restore(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self.scale_ = float(values["scale"])
        self.model_ = self._model(tensors["dictionary._weights"].shape[1])
        self.model_.load_state_dict(tensors)
        self._finish()


@register_basis
class OvercompleteBatchTopKSAE(OvercompleteTopKSAE):
    """Overcomplete ``BatchTopKSAE(C, K, top_k=k·batch)``: in training, the ``k·batch`` largest
    codes of each batch are kept (``k`` per PFV on average, more on busy PFVs, fewer on quiet
    ones); in use, every code below the running threshold ``θ`` learned in training is set to 0
    (a ReLU encoder with one threshold). Otherwise trained as :class:`OvercompleteTopKSAE`."""

    name = "sae-batchtopk"
    kind = "Overcomplete BatchTopKSAE (train_sae)"
    drop_last = True  # a smaller last batch would have fewer codes than the k·batch kept

    def _model(self, channels: int):
        BatchTopKSAE = _overcomplete_batchtopk()
        per_batch = max(1, min(self.k, self.n_components)) * getattr(self, "batch_", self.batch_size)
        return BatchTopKSAE(channels, nb_concepts=self.n_components, top_k=per_batch)

    @property
    def threshold_(self) -> float:
        """``θ``, in the scaled units (PFVs divided by ``s``) the encoder works in."""
        return float(self.model_.running_threshold)

    def _threshold_info(self) -> dict[str, float]:
        return {"threshold": self.threshold_}

    def _learned(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, values = super()._learned()
        return tensors, {**values, "threshold": self.threshold_}  # a plain attribute, not in state_dict

    def _restore(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        super()._restore(tensors, values)
        self.model_.running_threshold = torch.tensor(float(values["threshold"]))
