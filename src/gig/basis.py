"""A layer's concept basis other than k-means + sparse codes: a sparse autoencoder, or a user's
basis with its own encoder (config ``bases: {LAYER: SPEC}``).

``SPEC`` is ``kmeans`` (the paper's: bisecting k-means concepts coded by OMP or Lasso, the
default for every layer not named), ``sae`` (gig's TopK sparse autoencoder, :mod:`gig.sae`,
trained by the concepts stage on the layer's sampled PFVs with as many latents ``K`` as k-means
would have concepts, ``sae_k`` of them active, ``sae_steps`` Adam steps, the run's seed),
``sae-overcomplete`` (Overcomplete's TopK SAE, :func:`fit_overcomplete_sae`), ``sae-batchtopk``
(Overcomplete's BatchTopK SAE: ``sae_k`` codes per PFV on average in training, then one learned
threshold, so a ``threshold`` encoder), ``nmf``
(scikit-learn NMF, the evaluation's ``nmf`` method :class:`gig.evaluation.methods.nmf.NMFBasis`,
fitted on the sampled PFVs with the same ``K`` (at most ``C``) and the run's seed, for non-negative layers such as
post-ReLU blocks; its codes are the ``activation: nnls`` ones below), or a safetensors file holding
a user basis:

=========  ===========  =====================================================
tensor     shape        meaning
=========  ===========  =====================================================
``W_dec``  ``(K, C)``   decoder rows: the concepts (``V`` is accepted too)
``W_enc``  ``(C, K)``   encoder
``b_enc``  ``(K,)``     encoder bias (optional, 0)
``b_pre``  ``(C,)``     subtracted from the input before encoding (optional, 0)
``b_dec``  ``(C,)``     decoder bias (optional, 0)
``threshold`` ``(K,)``  JumpReLU thresholds: codes below them set to 0 (optional)
=========  ===========  =====================================================

and in its metadata optionally ``activation`` (``relu``, the default, ``topk``, ``threshold`` — ReLU
then the ``threshold`` tensor, which it needs: a JumpReLU SAE — or ``nnls``), ``k``
(the active latents of ``topk``) and ``scale`` (inputs are divided by it before encoding and codes
multiplied by it after, 1 by default).

Codes come from the basis's own encoder, ``z = act((x/s − b_pre) W_enc + b_enc) · s``, not from a
sparse coder; the reconstruction is ``x̂ = z W_dec + b_dec``. ``activation: nnls`` (an NMF
dictionary) has no encoder weights: its codes are non-negative least squares against the fixed
decoder, ``z = argmin_{z ≥ 0} ‖x − z W_dec‖²`` per row, solved exactly in float64 by SciPy's
active-set NNLS (:func:`nnls_codes`), row by row. Such a file needs only ``W_dec``, non-negative; ``W_enc`` and ``b_enc`` are not read, and a
nonzero ``b_pre`` or ``b_dec`` or a scale other than 1 is refused (NNLS uses none of them). The
layer's activations must be non-negative too: a negative value is an InputError. Coordinate
descent costs grow with ``K²`` per row, and beyond ``K = C`` the codes are neither unique nor
sparse: the ``nmf`` kind fits at most ``C`` concepts. The concepts are the decoder rows,
so everything downstream (cards, GIG, graphs) reads them as it reads k-means concepts; GIG
integrates from the zero-code reconstruction ``b_dec`` (``GIG(..., bias=b_dec)``), and
completeness holds for that baseline, ``Σ_q GIG[q] = g(F(x̂)) − g(F(b_dec))``. A basis has no λ:
the decompose stage measures its fidelity over all images (R², top-1 agreement, KL, l0) as for
the other layers, reports it in ``gig inspect``, and does not step it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import BASIS_KINDS as KINDS  # noqa: F401  (re-exported)
from .config import is_basis_file  # noqa: F401  (re-exported)
from .errors import InputError
from .store import load_tensors, open_tensors

#: Encoder kinds of a basis (metadata ``activation``).
ACTIVATIONS = ("relu", "topk", "threshold", "nnls")


@dataclass
class BasisEncoder:
    """A basis's encoder and decoder; the same interface as the sparse coders
    (:class:`gig.omp.OMPEncoder`): ``V``, ``alpha`` (None: no λ), ``solver_``, :meth:`encode`,
    :meth:`with_alpha`, and :meth:`reconstruct` with the decoder bias. ``nnls``: codes by
    non-negative least squares against ``V`` (an NMF dictionary; no encoder weights, None)."""

    kind: str
    V: torch.Tensor  # (K, C) decoder rows
    W_enc: torch.Tensor | None  # (C, K); None for nnls
    b_enc: torch.Tensor | None  # (K,); None for nnls
    b_pre: torch.Tensor | None  # (C,); None for nnls
    bias: torch.Tensor | None  # (C,) decoder bias, None where it is 0
    k: int | None  # active latents (TopK), None: every positive one (ReLU)
    scale: float = 1.0
    nnls: bool = False  # codes = argmin_{z ≥ 0} ‖x − z V‖² (NMF transform), not an encoder
    threshold: torch.Tensor | None = None  # (K,) JumpReLU / BatchTopK: codes below it set to 0
    alpha = None

    @property
    def activation(self) -> str:
        """The encoder kind: ``relu``, ``topk``, ``threshold`` or ``nnls`` (metadata ``activation``)."""
        if self.nnls:
            return "nnls"
        if self.k is not None:
            return "topk"
        return "relu" if self.threshold is None else "threshold"

    @property
    def solver_(self) -> str:
        return self.kind

    def with_alpha(self, alpha) -> "BasisEncoder":
        return self

    def encode(self, X: torch.Tensor, init: torch.Tensor | None = None) -> torch.Tensor:
        """Codes ``(N, K)`` of the rows of ``X (N, C)`` (chunks of 8192 rows)."""
        if self.nnls:
            return self._encode_nnls(X)
        out = X.new_zeros(X.shape[0], self.V.shape[0], dtype=torch.float32)
        with torch.no_grad():
            for s in range(0, X.shape[0], 8192):
                x = X[s : s + 8192].float().to(self.V.device)
                a = torch.relu((x / self.scale - self.b_pre) @ self.W_enc + self.b_enc)
                if self.threshold is not None:  # JumpReLU: below its latent's threshold, 0
                    a = a * (a >= self.threshold.to(a.device))
                if self.k is not None and self.k < a.shape[1]:
                    top = a.topk(self.k, dim=1)
                    a = torch.zeros_like(a).scatter_(1, top.indices, top.values)
                out[s : s + 8192] = (a * self.scale).to(out.device)
        return out

    def _encode_nnls(self, X: torch.Tensor) -> torch.Tensor:
        """Exact NNLS codes of the rows of ``X (N, C)`` against ``V`` (:func:`nnls_codes`)."""
        require_non_negative(X, f"the {self.kind} basis (NMF/nnls codes)")
        return nnls_codes(X, self.V).to(X.device)

    def reconstruct(self, U: torch.Tensor) -> torch.Tensor:
        """``U V + b_dec`` for codes ``U (N, K)``."""
        X = U @ self.V
        return X if self.bias is None else X + self.bias

    def to(self, device) -> "BasisEncoder":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return BasisEncoder(
            self.kind,
            move(self.V),
            move(self.W_enc),
            move(self.b_enc),
            move(self.b_pre),
            move(self.bias),
            self.k,
            self.scale,
            self.nnls,
            move(self.threshold),
        )

    # ------------------------------------------------------------------ files
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"W_dec": self.V, "W_enc": self.W_enc, "b_enc": self.b_enc, "b_pre": self.b_pre, "b_dec": self.bias}
        out["threshold"] = self.threshold
        return {name: t.detach().float().cpu().contiguous() for name, t in out.items() if t is not None}

    def metadata(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "activation": self.activation,
            "k": "" if self.k is None else str(self.k),
            "scale": repr(float(self.scale)),
        }

    @classmethod
    def from_tensors(cls, tensors: dict, metadata: dict | None, kind: str, channels: int, where: str) -> "BasisEncoder":
        """A basis from its tensors and metadata (see the module docstring), checked against a
        layer of ``channels`` channels; ``where`` names the file in errors."""
        metadata = metadata or {}
        activation = metadata.get("activation", "relu")
        if activation not in ACTIVATIONS:
            raise InputError(f"basis file {where}: activation {activation!r} is not relu, topk, threshold or nnls")
        if activation == "nnls":
            return cls._nnls_from_tensors(tensors, metadata, kind, channels, where)
        V = tensors.get("W_dec", tensors.get("V"))
        if V is None or "W_enc" not in tensors:
            raise InputError(f"basis file {where}: needs tensors W_dec (K×C) and W_enc (C×K), has {sorted(tensors)}")
        V, W_enc = V.float(), tensors["W_enc"].float()
        K = V.shape[0] if V.dim() == 2 else -1
        shapes = {
            "W_dec": (tuple(V.shape), (K, channels)),
            "W_enc": (tuple(W_enc.shape), (channels, K)),
            **{
                name: (tuple(tensors[name].shape), want)
                for name, want in (("b_enc", (K,)), ("b_pre", (channels,)), ("b_dec", (channels,)), ("threshold", (K,)))
                if name in tensors
            },
        }
        wrong = [f"{name} {got} (want {want})" for name, (got, want) in shapes.items() if got != want]
        if V.dim() != 2 or wrong:
            raise InputError(f"basis file {where} does not fit a layer of {channels} channels: {', '.join(wrong)}")
        k = metadata.get("k") or None
        if activation == "topk" and (k is None or not str(k).isdigit() or int(k) < 1):
            raise InputError(f"basis file {where}: activation topk needs a metadata k ≥ 1, got {k!r}")
        if activation == "threshold" and "threshold" not in tensors:
            raise InputError(f"basis file {where}: activation threshold needs a tensor threshold (K,)")
        scale = _scale(metadata, where)
        b_dec = tensors.get("b_dec")
        return cls(
            kind,
            V,
            W_enc,
            tensors.get("b_enc", torch.zeros(K)).float(),
            tensors.get("b_pre", torch.zeros(channels)).float(),
            None if b_dec is None or not bool(b_dec.any()) else b_dec.float(),
            int(k) if activation == "topk" else None,
            scale,
            threshold=None if "threshold" not in tensors else tensors["threshold"].float(),
        )

    @classmethod
    def _nnls_from_tensors(cls, tensors: dict, metadata: dict, kind: str, channels: int, where: str) -> "BasisEncoder":
        """An ``activation: nnls`` basis: a non-negative ``W_dec`` alone (see the module docstring)."""
        V = tensors.get("W_dec", tensors.get("V"))
        if V is None:
            raise InputError(f"basis file {where}: activation nnls needs a tensor W_dec (K×C), has {sorted(tensors)}")
        V = V.float()
        if V.dim() != 2 or V.shape[1] != channels:
            raise InputError(
                f"basis file {where} does not fit a layer of {channels} channels: "
                f"W_dec {tuple(V.shape)} (want (K, {channels}))"
            )
        if bool((V < 0).any()):
            raise InputError(
                f"basis file {where}: activation nnls needs a non-negative W_dec (an NMF dictionary), "
                f"but it has values down to {float(V.min()):.3g}"
            )
        unused = [name for name in ("b_pre", "b_dec") if name in tensors and bool(tensors[name].any())]
        scale = _scale(metadata, where)
        if scale != 1.0:
            unused.append(f"scale {scale:g}")
        if unused:
            raise InputError(
                f"basis file {where}: activation nnls codes x by non-negative least squares against "
                f"W_dec alone, so {', '.join(unused)} would be ignored: remove them"
            )
        return cls(kind, V, None, None, None, None, None, 1.0, nnls=True)


def _scale(metadata: dict, where: str) -> float:
    """A basis file's metadata ``scale`` (1 where absent)."""
    try:
        return float(metadata.get("scale") or 1.0)
    except ValueError:
        raise InputError(f"basis file {where}: scale {metadata.get('scale')!r} is not a number") from None


def read_basis_file(path: str | Path, channels: int) -> BasisEncoder:
    """A user basis from its safetensors file, checked against a layer of ``channels`` channels."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"basis file not found: {path}")
    return read_basis(path, channels, f"file:{path}")


def read_basis(path: Path, channels: int | None = None, kind: str | None = None) -> BasisEncoder:
    """The basis in the safetensors file ``path`` (tensors and metadata, see the module
    docstring), checked against ``channels`` (default: its decoder's) and named ``kind`` (default:
    its metadata's, else ``file``): the one reader of a basis file, a user's or a run's."""
    with open_tensors(path) as f:
        metadata = f.metadata() or {}
    tensors = load_tensors(path)
    if channels is None:
        channels = tensors["W_dec"].shape[1] if "W_dec" in tensors else tensors["V"].shape[1]
    return BasisEncoder.from_tensors(tensors, metadata, kind or metadata.get("kind", "file"), channels, str(path))


def require_non_negative(X: torch.Tensor, what: str) -> None:
    """InputError where the layer outputs ``X`` have a negative value, which NMF cannot code;
    ``what`` names what needs them (``"bases: LAYER: nmf"``, a basis, an evaluation method)."""
    low = float(X.min()) if X.numel() else 0.0
    if low < 0:
        raise InputError(
            f"{what} needs non-negative activations, but the layer's values go down to {low:.3g} (a "
            "signed layer, e.g. a block ending in a linear projection): use it on a non-negative "
            "(post-ReLU) layer, and a signed basis here (sae, kmeans, the evaluation's dictionary, or "
            "a basis file with activation relu, topk or threshold)"
        )


def nnls_codes(X: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Codes ``(N, K) ≥ 0`` of the rows of ``X (N, C)`` against the fixed concepts ``H (K, C)``:
    ``argmin_{z ≥ 0} ‖x − z H‖²`` for each row, solved exactly (to float64 rounding) by SciPy's
    Lawson–Hanson active-set NNLS, row by row, so a row's code never depends on which rows are
    coded with it. (scikit-learn's coordinate descent, NMF's own transform, stops on a relative
    drop of the projected gradient over the whole batch: at 2 000 iterations and tolerance 1e-8
    it still left codes 0.03 off on a 16-concept layer, and took 6× longer on a 256-concept one.)"""
    from scipy.optimize import nnls

    A = H.detach().cpu().double().numpy().T  # (C, K)
    rows = X.detach().cpu().double().numpy()
    out = torch.zeros(X.shape[0], H.shape[0], dtype=torch.float64)
    for i, x in enumerate(rows):
        try:
            out[i] = torch.from_numpy(nnls(A, x, maxiter=50 * max(1, A.shape[1]))[0])
        except RuntimeError as err:  # SciPy's iteration cap: never met in the tests, named if it is
            raise InputError(f"NNLS did not converge for a row of {A.shape[1]} concepts: {err}") from None
    return out.float()
