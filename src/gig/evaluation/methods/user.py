"""``user:PATH``: a concept basis of the user's own (e.g. a sparse autoencoder trained elsewhere).

File format (safetensors; ``PATH`` is such a file, used for every evaluated layer, or a folder
holding one ``LAYER.safetensors`` per evaluated layer)::

    components  (K, C)   required  the concept vectors (decoder rows); layer output ≈ codes @ components
    W_enc       (C, K)   optional  encoder weights: codes = ReLU((x − b_pre) @ W_enc + b_enc)
    b_enc       (K,)     optional  encoder bias (default 0)
    b_pre       (C,)     optional  subtracted from x before encoding (default 0)
    threshold   (K,)     optional  JumpReLU: codes ≤ threshold are set to 0
    b_dec       (C,)     optional  decoder bias (needs W_enc): layer output ≈ codes @ components + b_dec
    metadata    top_k    optional  keep only the k largest codes per position (TopK SAE)

``x`` is the layer output at one position, channels as the model's (``C`` channels, no
normalisation). With ``b_dec`` the zero code stands for ``b_dec`` (the basis's
:attr:`~gig.evaluation.bases.ConceptBasis.bias_`): its GIG paths start there and its deletion
curves end there; without it, at the zero layer output. An SAE that subtracts its decoder bias
before encoding stores it as ``b_pre`` and, to reconstruct with it, as ``b_dec``. Without
``W_enc`` the components are coded by the run's own Lasso coder with λ calibrated to the run's
sparsity, as for ``dictionary`` (that coder has no bias term, hence no ``b_dec`` then).

>>> from safetensors.torch import save_file
>>> save_file({"components": D, "W_enc": W, "b_enc": b}, "my_sae.safetensors",
...           metadata={"top_k": "32"})                                   # doctest: +SKIP
>>> # gig evaluate RUN -l _blocks.15 -m ours -m user:my_sae.safetensors
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from ...errors import InputError
from ..bases import USER_PREFIX, LassoCoded, LayerContext, coder_settings, register_basis

KEYS = ("components", "W_enc", "b_enc", "b_pre", "threshold", "b_dec")


def basis_file(path: str | Path, layer: str | None) -> Path:
    """The file of ``layer``: ``path`` itself, or ``path/LAYER.safetensors`` for a folder."""
    path = Path(path)
    if path.is_dir():
        if layer is None:
            raise InputError(f"{path} is a folder of per-layer bases: name the layer")
        path = path / f"{layer}.safetensors"
    if not path.is_file():
        raise InputError(f"no user basis file {path}")
    return path


def read_basis_file(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The tensors of a user basis file and its ``top_k`` (checked against the format)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
        meta = f.metadata() or {}
    unknown = sorted(set(tensors) - set(KEYS))
    if "components" not in tensors or unknown:
        raise InputError(
            f"{path}: a user basis holds 'components' (K, C) and optionally W_enc, b_enc, b_pre, "
            f"threshold, b_dec; found {sorted(tensors)}"
        )
    if "b_dec" in tensors and "W_enc" not in tensors:
        raise InputError(f"{path}: b_dec needs W_enc (the run's coder, used without an encoder, has no decoder bias)")
    K, C = tensors["components"].shape
    want = {"W_enc": (C, K), "b_enc": (K,), "b_pre": (C,), "threshold": (K,), "b_dec": (C,)}
    bad = [
        f"{k} {tuple(v.shape)} (want {want[k]})" for k, v in tensors.items() if k in want and tuple(v.shape) != want[k]
    ]
    if bad or (set(tensors) & {"b_enc", "b_pre", "threshold"} and "W_enc" not in tensors):
        raise InputError(f"{path}: components are {(K, C)}; " + ("; ".join(bad) or "encoder terms need W_enc"))
    top_k = meta.get("top_k")
    if top_k is not None and not (top_k.isdigit() and int(top_k) >= 1):
        raise InputError(f"{path}: metadata top_k must be a positive integer, not {top_k!r}")
    return tensors, int(top_k) if top_k else None


@register_basis
class UserBasis(LassoCoded):
    """A basis read from ``path`` (see the module's file format); ``fit`` reads the file and, for
    a decoder without encoder, calibrates the run's Lasso coder to ``target_l0``."""

    name = "user"

    def __init__(
        self,
        path: str,
        layer: str | None = None,
        target_l0: float | None = None,
        coder: dict[str, Any] | None = None,
        seed: int = 0,
        calibration_size: int = 2000,
    ):
        self.path = str(path)
        self.layer = layer
        self.target_l0 = target_l0
        self.coder = coder
        self.seed = seed
        self.calibration_size = calibration_size

    @classmethod
    def for_layer(cls, ctx: LayerContext) -> "UserBasis":
        path = ctx.spec[len(USER_PREFIX) :]
        tensors, _ = read_basis_file(basis_file(path, ctx.layer))
        # only a decoder-only basis needs the run's sparsity (costs coding the samples once)
        target = None if "W_enc" in tensors else ctx.run_l0_ratio
        return cls(path, ctx.layer, target, coder_settings(ctx.config), ctx.settings.seed, ctx.config.calibration_size)

    @classmethod
    def fingerprint(cls, spec: str) -> dict[str, Any]:
        """SHA-256 of the user's file(s): a changed file is read again."""
        path = Path(spec[len(USER_PREFIX) :])
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}

    def fit(self, X: torch.Tensor | None = None) -> "UserBasis":
        file = basis_file(self.path, self.layer)
        self.tensors_, self.top_k_ = read_basis_file(file)
        self.components_ = self.tensors_["components"]
        self.bias_ = self.tensors_.get("b_dec")
        if X is not None and X.shape[1] != self.components_.shape[1]:
            raise InputError(
                f"{file}: components have {self.components_.shape[1]} channels, layer {self.layer!r} has {X.shape[1]}"
            )
        self.alpha_ = 0.0
        info: dict[str, Any] = {
            "kind": "user basis",
            "file": str(file),
            "encoder": "W_enc" in self.tensors_,
            "top_k": self.top_k_,
            "decoder_bias": self.bias_ is not None,
        }
        if "W_enc" not in self.tensors_:
            if self.target_l0 is None or self.coder is None or X is None:
                raise InputError(f"{file} has no encoder (W_enc): its codes need the run's coder and samples")
            self.alpha_, l0 = self.calibrate(X, self.target_l0, self.seed, self.calibration_size)
            info.update(
                kind="user dictionary + the run's encoder",
                alpha=self.alpha_,
                calibration_l0_ratio=l0,
                target_l0_ratio=self.target_l0,
            )
        self.info_ = info
        return self

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        t = self.tensors_
        if "W_enc" not in t:
            return super().transform(X)
        K = self.components_.shape[0]
        z = (X.float() - t.get("b_pre", 0.0)) @ t["W_enc"] + t.get("b_enc", torch.zeros(K))
        z = torch.relu(z)
        if "threshold" in t:
            z = torch.where(z > t["threshold"], z, torch.zeros_like(z))
        if self.top_k_ is not None and self.top_k_ < K:
            top = z.topk(self.top_k_, dim=1)
            z = torch.zeros_like(z).scatter_(1, top.indices, top.values)
        return z

    def _learned(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return dict(self.tensors_), {"alpha": self.alpha_, "top_k": self.top_k_}

    def _restore(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self.tensors_ = {k: v.float() for k, v in tensors.items()}
        self.components_ = self.tensors_["components"]
        self.bias_ = self.tensors_.get("b_dec")
        self.alpha_ = float(values["alpha"])
        self.top_k_ = values["top_k"]
