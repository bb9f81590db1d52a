"""One contract for every concept basis the evaluation compares, in scikit-learn's shape.

A basis is a dictionary ``components_ (K, C)`` (one concept vector per row), an optional decoder
bias ``bias_ (C,)`` (None, the default: no bias) and an encoder ``transform(X (N, C)) → codes
(N, K)``; a layer output is rebuilt as ``codes @ components_ + bias_``
(:meth:`ConceptBasis.reconstruct`), so the all-zero code, "every concept removed", is ``bias_``
at every position (the all-zero layer output for a basis without bias): the start of its GIG
paths (``GIG(..., bias=bias_)``) and the end of its deletion curves. Hyper-parameters are
constructor arguments (:meth:`ConceptBasis.get_params`), learned state ends in ``_`` and is set
by :meth:`ConceptBasis.fit`.

A method is one class in one module of :mod:`gig.evaluation.methods`, decorated with
:func:`register_basis`; the evaluation takes methods from the registry by name
(:func:`basis_class`). ``user:PATH`` names a user's own basis (see
:mod:`gig.evaluation.methods.user`). Saved bases are a safetensors file of the learned tensors
beside a JSON file of the method, its parameters, learned scalars and details (no pickle)::

    basis.safetensors   {"components": (K, C), "bias": (C,) where the basis has one, …}
    basis.json          {"format": 1, "method": "sae", "class": "…", "params": {…}, "values": {…}, "info": {…}}

>>> from gig.evaluation.bases import basis_class
>>> km = basis_class("kmeans")(n_components=8, seed=0).fit(X)   # doctest: +SKIP
>>> codes = km.transform(X)                                       # (N, 8)
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import ConfigError, InputError
from ..store import load_json, load_tensors, save_json, save_tensors

if TYPE_CHECKING:
    from ..config import Config
    from ..lasso import LassoEncoder

FORMAT = 1
USER_PREFIX = "user:"


class ConceptBasis:
    """Base of every concept basis: ``fit(X)``, ``transform(X) → (N, K)``, ``components_ (K, C)``
    and ``bias_ (C,)`` (the decoder bias, None where there is none).

    Subclasses set :attr:`name` (the registry key), :attr:`uses` (the
    :class:`~gig.evaluation.settings.EvaluationSettings` fields their fit depends on: a saved
    basis is reused only while these and the run are unchanged), and implement :meth:`fit`,
    :meth:`transform`, :meth:`_learned` and :meth:`_restore`. :meth:`for_layer` builds the
    evaluation's instance for one layer of a run.
    """

    name: ClassVar[str] = ""
    uses: ClassVar[tuple[str, ...]] = ("seed",)
    #: True for a basis the run has learned already: :meth:`for_layer` returns it fitted, and the
    #: evaluation neither fits nor saves it
    from_run: ClassVar[bool] = False

    components_: torch.Tensor  # (K, C)
    #: decoder bias ``(C,)``: the reconstruction is ``codes @ components_ + bias_``, and the zero
    #: code (every concept removed, the GIG baseline) is ``bias_``; None: no bias (zero)
    bias_: torch.Tensor | None = None
    info_: dict[str, Any]  # how the fit went (kind, seconds, …): recorded in extraction.json

    # ------------------------------------------------------------------ the contract
    def fit(self, X: torch.Tensor) -> "ConceptBasis":
        """Learn the basis from the rows of ``X (N, C)``; returns ``self``."""
        raise NotImplementedError

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        """Codes ``(N, K)`` of the rows of ``X (N, C)``."""
        raise NotImplementedError

    def fit_transform(self, X: torch.Tensor) -> torch.Tensor:
        return self.fit(X).transform(X)

    @property
    def n_components_(self) -> int:
        return int(self.components_.shape[0])

    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        """Layer outputs ``(..., C)`` of ``codes (..., K)``: ``codes @ components_ + bias_``."""
        X = codes.float() @ self.components_.float().to(codes.device)
        return X if self.bias_ is None else X + self.bias_.float().to(codes.device)

    def codes_for(self, X: torch.Tensor, image_ids: list[int]) -> torch.Tensor:
        """Codes ``(N·P, K)`` of the images ``image_ids`` whose layer outputs are the rows of
        ``X (N·P, C)``; a basis that has its codes already (the run's) reads them instead."""
        return self.transform(X)

    # ------------------------------------------------------------------ evaluation hooks
    @classmethod
    def for_layer(cls, ctx: "LayerContext") -> "ConceptBasis":
        """The instance the evaluation fits on one layer (default: ``K`` of the run, its seed)."""
        return cls(n_components=ctx.K, seed=ctx.settings.seed)

    @classmethod
    def problem(cls) -> str | None:
        """Why this method cannot run here (a missing optional package), or ``None``."""
        return None

    @classmethod
    def identity(cls) -> str:
        """The implementing class (module and name): saved with a fit and part of every reuse key,
        so a method name that comes to mean another implementation never reuses old results."""
        return f"{cls.__module__}.{cls.__qualname__}"

    @classmethod
    def fingerprint(cls, spec: str) -> dict[str, Any]:
        """What besides the run and :attr:`uses` a saved fit depends on (e.g. a user file's hash)."""
        return {}

    # ------------------------------------------------------------------ parameters and persistence
    def get_params(self) -> dict[str, Any]:
        """The constructor arguments (JSON values), as scikit-learn's ``get_params``."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {p: getattr(self, p) for p in names}

    def _learned(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Learned tensors and learned JSON values that :meth:`_restore` rebuilds the fit from."""
        return {"components": self.components_, **self._bias_tensors()}, {}

    def _restore(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self.components_ = tensors["components"].float()
        self._restore_bias(tensors)

    def _bias_tensors(self) -> dict[str, torch.Tensor]:
        """``{"bias": bias_}`` where the basis has a decoder bias, else nothing (files as before)."""
        return {} if self.bias_ is None else {"bias": self.bias_}

    def _restore_bias(self, tensors: dict[str, torch.Tensor]) -> None:
        self.bias_ = tensors["bias"].float() if "bias" in tensors else None

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``path`` (``.safetensors``, the learned tensors) and its ``.json`` sibling."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, values = self._learned()
        save_tensors(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        save_json(
            path.with_suffix(".json"),
            {
                "format": FORMAT,
                "method": self.name,
                "class": self.identity(),
                "params": self.get_params(),
                "values": values,
                "info": getattr(self, "info_", {}),
                **(extra or {}),
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> "ConceptBasis":
        """A basis saved by :meth:`save`; called on :class:`ConceptBasis` it builds the class
        the file names (from the registry)."""
        path = Path(path)
        meta = load_json(path.with_suffix(".json"))
        if meta.get("format") != FORMAT:
            raise InputError(f"{path.with_suffix('.json')} is not a gig concept basis (format {meta.get('format')!r})")
        klass = cls
        if cls is ConceptBasis:
            klass = registered().get(meta["method"])
            if klass is None:
                raise InputError(f"{path}: method {meta['method']!r} is not registered here")
        if meta.get("class", klass.identity()) != klass.identity():
            raise InputError(f"{path} was saved by {meta['class']}, not {klass.identity()}: fit it again")
        basis = klass(**meta["params"])
        basis._restore(load_tensors(path), meta["values"])
        basis.info_ = meta.get("info", {})
        return basis


class LassoCoded(ConceptBasis):
    """Atoms ``components_ (K, C)`` coded by the run's Lasso coder at ``λ = alpha_``.

    ``coder`` holds the run config's decompose fields (``nonnegative``, ``lasso_solver``,
    ``debias``, …); the encoder is :func:`gig.decompose.encoder_for` on a config with them, so the
    codes are exactly those the decompose stage would give these atoms.
    """

    coder: dict[str, Any]
    alpha_: float

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        return self.encoder_.encode(X)

    @property
    def encoder_(self) -> "LassoEncoder":
        """The coder of ``components_`` at ``alpha_`` (built once per fitted state: its Gram matrix)."""
        key = (id(self.components_), self.alpha_)
        if getattr(self, "_encoder_key", None) != key:
            self._encoder, self._encoder_key = self.make_encoder(self.components_, self.alpha_), key
        return self._encoder

    def make_encoder(self, V: torch.Tensor, alpha: float) -> "LassoEncoder":
        """The coder of this basis on atoms ``V (K, C)`` at ``λ = alpha``."""
        from ..decompose import encoder_for

        return encoder_for(config_of_coder(self.coder), V, alpha)

    def calibrate(self, X: torch.Tensor, target_l0: float, seed: int, size: int) -> tuple[float, float]:
        """``(λ, l0 ratio)``: the λ whose codes of ``size`` rows of ``X (N, C)`` (drawn with
        ``seed``) are as sparse as ``target_l0`` (share of non-zero coefficients), at most."""
        from ..decompose import alpha_for_l0

        g = torch.Generator().manual_seed(seed)
        calib = X[torch.randperm(X.shape[0], generator=g)[:size]].float()
        return alpha_for_l0(calib, self.components_, target_l0, self.make_encoder)

    def _learned(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"components": self.components_, **self._bias_tensors()}, {"alpha": self.alpha_}

    def _restore(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self.components_ = tensors["components"].float()
        self._restore_bias(tensors)
        self.alpha_ = float(values["alpha"])


def coder_settings(config: "Config") -> dict[str, Any]:
    """The fields of the run's config that its coder reads (the decompose stage's; fields added
    since, at the value they stand for when absent, left out as in the stage hash)."""
    from ..config import HASHED_WHEN_SET, STAGE_FIELDS

    return {
        f: getattr(config, f)
        for f in STAGE_FIELDS["decompose"]
        if not (f in HASHED_WHEN_SET and getattr(config, f) == HASHED_WHEN_SET[f])
    }


def config_of_coder(settings: dict[str, Any]) -> "Config":
    """The config :func:`coder_settings` came from, as far as the coder reads it: the fields it
    left out stand for the values they had before they existed (``HASHED_WHEN_SET``), not for
    today's defaults (a Lasso run's settings without ``coder`` are a Lasso run's)."""
    from ..config import HASHED_WHEN_SET, Config

    return Config(**{**HASHED_WHEN_SET, **settings})


def reconstruction_figures(
    X: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None
) -> dict[str, float]:
    """Relative error ``‖X − X̃‖/‖X‖``, R² against the mean PFV, l0 ratio and active concepts per
    position over the rows of ``X (P, C)`` with codes ``U (P, K)``, atoms ``V (K, C)`` and
    ``X̃ = UV + bias`` (``bias (C,)``: a decoder bias, None for none): the decompose stage's
    :class:`~gig.decompose.FidelityMeter` (no model run, so no top-1 agreement)."""
    from ..decompose import FidelityMeter

    meter = FidelityMeter(X.shape[1])
    recon = U.double() @ V.double()
    meter.add(X.double(), recon if bias is None else recon + bias.double(), U)
    figures = meter.result()
    figures.pop("top1_agreement")
    return {**figures, "active_per_position": figures["l0_ratio"] * U.shape[1]}


# ---------------------------------------------------------------------------- the registry
_REGISTRY: dict[str, type[ConceptBasis]] = {}
_IMPORTED = False


def register_basis(cls: type[ConceptBasis]) -> type[ConceptBasis]:
    """Class decorator: make ``cls`` available to the evaluation under ``cls.name``."""
    if not cls.name or cls.name.startswith(USER_PREFIX):
        raise ValueError(f"{cls.__name__}.name must be a non-empty name without the {USER_PREFIX!r} prefix")
    _REGISTRY[cls.name] = cls
    return cls


def _import_methods() -> None:
    """Import every module of :mod:`gig.evaluation.methods` (each registers its class)."""
    from . import methods

    for module in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"{methods.__name__}.{module.name}")


def registered() -> dict[str, type[ConceptBasis]]:
    """Name → class of every registered method (the built-in ones and any added by
    :func:`register_basis`)."""
    global _IMPORTED
    if not _IMPORTED:  # a flag, not emptiness: importing one method module registers it alone
        _IMPORTED = True
        _import_methods()
    return dict(_REGISTRY)


def basis_class(spec: str) -> type[ConceptBasis]:
    """The class behind a method name (``user:PATH`` → the user basis); ConfigError naming
    the method otherwise."""
    known = registered()
    name = "user" if spec.startswith(USER_PREFIX) else spec
    if name not in known or (name == "user" and not spec.startswith(USER_PREFIX)):
        choices = ", ".join(n for n in known if n != "user")
        raise ConfigError(
            f"unknown method {spec!r}: registered methods are {choices}, or user:PATH for a "
            "basis of your own (a .safetensors file or a folder of LAYER.safetensors)"
        )
    return known[name]


def method_label(spec: str) -> str:
    """How results name a method: the name itself, ``user:STEM`` for ``user:PATH``."""
    if spec.startswith(USER_PREFIX):
        return USER_PREFIX + Path(spec[len(USER_PREFIX) :]).stem
    return spec


def method_problem(spec: str) -> str | None:
    """Why ``spec`` cannot be evaluated (unknown name, missing file or package), or ``None``."""
    try:
        klass = basis_class(spec)
    except ConfigError as exc:
        return str(exc)
    if spec.startswith(USER_PREFIX) and not Path(spec[len(USER_PREFIX) :]).exists():
        return f"{spec!r}: no file or folder {spec[len(USER_PREFIX) :]}"
    return klass.problem()


# ---------------------------------------------------------------------------- what a layer offers
@dataclass
class LayerContext:
    """What the run offers a method fitted on one of its layers.

    ``samples (N, C)``: the collect stage's sampled PFVs (what the run's dictionary was learned
    from); ``run_basis``: the run's dictionary with its Lasso coder; ``config``: the run's
    config (its coder settings); ``spec``: the method as the user named it.
    """

    layer: str
    samples: torch.Tensor
    run_basis: "ConceptBasis"  # the run's own (gig.evaluation.methods.ours.RunDictionary)
    config: "Config"
    #: the evaluation's settings (gig.evaluation.settings.EvaluationSettings, which builds on this
    #: registry and is not imported here)
    settings: Any
    spec: str = ""

    @property
    def K(self) -> int:
        return self.run_basis.n_components_

    @cached_property
    def run_codes(self) -> torch.Tensor:
        """The run's codes of the samples ``(N, K)`` (computed once, shared by every method)."""
        return self.run_basis.transform(self.samples)

    @property
    def run_l0_ratio(self) -> float:
        """Share of non-zero coefficients in the run's codes of the samples."""
        return float((self.run_codes != 0).float().mean())

    @property
    def run_active_per_pfv(self) -> int:
        """The run's mean number of active concepts per sampled PFV, rounded (at least 1)."""
        return max(1, int(round(float((self.run_codes != 0).sum(1).float().mean()))))

    @property
    def sae_k(self) -> int:
        """Active latents of an SAE: ``settings.sae_k``, else the run's own sparsity."""
        return self.settings.sae_k if self.settings.sae_k is not None else self.run_active_per_pfv

    def make_encoder(self, V: torch.Tensor, alpha: float) -> "LassoEncoder":
        """The run's Lasso coder on other atoms ``V (K', C)`` at ``λ = alpha``."""
        from ..decompose import encoder_for

        return encoder_for(self.config, V, alpha)
