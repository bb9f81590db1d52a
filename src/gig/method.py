"""The GIG method: Generalized Integrated Gradients from the concepts of a layer to any scalar readout.

Apart from its use in the attribute stage (:mod:`gig.attribution`), as Captum keeps its methods
apart from their uses: the quadrature rules, :class:`GIG` (Captum-style ``attribute``), its path
integrator (:class:`PathIntegrator`, with :class:`RefinementState` for error control) and the flow
rule that turns attributions into graph weights (:func:`flow`).

For a source layer ``a`` with codes ``U (P, K)`` and dictionary ``V (K, C)``, reconstruction
``X̃ = U V``, and a scalar target ``g`` read after ``a`` (a :mod:`gig.readouts` object: a class
logit or probability, or a concept's readout at a later layer ``b``)::

    GIG[q] = Σ_p U[p, q] · ∫₀¹ ∂g(F(α X̃)) / ∂U[p, q] dα

Because ``X̃`` is linear in ``U``, ``∂g/∂U[p, q] = ⟨∂g/∂X̃_p, V_q⟩``: one integrated gradient
``Ḡ (P, C)`` with respect to the layer's output gives every concept's attribution,
``GIG[q] = Σ_p U[p, q] ⟨Ḡ_p, V_q⟩``, and keeping ``p`` open gives the spatial map. Completeness,
``Σ_q GIG[q] = g(F(X̃)) − g(F(0))``, holds up to the quadrature error; its residual is recorded
for every attribution.

A basis whose decoder carries a bias ``b (C,)`` (a sparse autoencoder's, or a user basis's)
reconstructs ``X̃ = U V + b``; its zero code stands for ``b``, so its paths run ``α ↦ b + α U V``
(``GIG(..., bias=b)``) and completeness reads ``Σ_q GIG[q] = g(F(b + U V)) − g(F(b))``. The
gradients with respect to the codes are the same ``⟨∂g/∂X̃_p, V_q⟩``.

**Error control (the default).** The integrand is not smooth (ReLU6 clipping, the max readout):
along the path the gradient vector is piecewise constant, with hundreds of small switches
(``bench/quadrature_study.py``), so high-order rules gain nothing, uniform trapezoid grids
converge like ``1/N``, and paths differ widely in difficulty. Every attribution (one image, one target:
a *path*) gets its own grid, refined where its attribution vector changes: cells ``[a, b]`` of α
with their midpoints, integrated by the trapezoid rule on both halves; per cell, the difference
``d`` between that and the one-interval trapezoid is a local error vector over the concepts.
Cells holding most of ``Σ ‖d‖²`` are bisected (two new evaluations each) until

    ``0.85 · max(‖Σ_c d_c‖, (Σ_c ‖d_c‖²)^½) / ‖GIG‖₂ ≤ tol``   and   ``|Σ_q GIG[q] − Δg| ≤ (tol/2)·|Δg|``

or until the path has ``max_steps + 1`` evaluations (recorded as unconverged). The first quantity
is the error estimate stored with every attribution (the factor 0.85: see
:data:`ESTIMATE_SCALE`). A path's numbers do not depend on the other targets or images it is
attributed with. Paths of one image that need the same α in a round share its forward pass; each
target that asked for it gets one backward pass.

With ``n_steps`` set, a fixed grid is used instead (``gauss-legendre``, ``riemann-midpoint`` or
``trapezoid``); only the trapezoid rule has a nested half grid and so an error estimate (NaN for
the others).

Images, steps and targets are batched together (``internal_batch_size`` items per forward); the
network before ``a`` runs once per image, or once on a small blank stand-in where that is checked
to be exact (see ``ModelHandle.run_from``). The refinement state of all paths is kept as padded
tensors and stepped together: a round costs a fixed number of host synchronisations, whatever the
number of images and targets.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError
from .hooks import ModelHandle
from .readouts import ClassLogit, ConceptReadout, Readout

RULES = ("gauss-legendre", "riemann-midpoint", "trapezoid")


def quadrature(n_steps: int, rule: str = "riemann-midpoint") -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``α (S,)`` in [0, 1] and weights ``w (S,)`` summing to 1.

    ``trapezoid`` takes ``n_steps`` intervals, hence ``n_steps + 1`` nodes including both ends;
    the other rules take ``n_steps`` nodes inside (0, 1).
    """
    if not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ConfigError(f"n_steps must be a positive integer, got {n_steps!r}")
    if rule == "gauss-legendre":
        x, w = np.polynomial.legendre.leggauss(n_steps)
        return torch.tensor((x + 1) / 2, dtype=torch.float32), torch.tensor(w / 2, dtype=torch.float32)
    if rule == "riemann-midpoint":
        alphas = (torch.arange(n_steps, dtype=torch.float64) + 0.5) / n_steps
        return alphas.float(), torch.full((n_steps,), 1.0 / n_steps)
    if rule == "trapezoid":
        alphas = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
        weights = torch.full((n_steps + 1,), 1.0 / n_steps, dtype=torch.float64)
        weights[[0, -1]] /= 2
        return alphas.float(), weights.float()
    raise ConfigError(f"unknown quadrature {rule!r}: use one of {', '.join(RULES)}")


#: One vmapped backward for all targets of a chunk (``is_grads_batched``) instead of one backward
#: per target: the same gradients (identical on the default run), but 0.87× the speed on one CPU
#: thread at the engine's chunk sizes (``bench/target_backward.py``), so off; a switch for
#: accelerators, where one larger kernel may pay, once measured there.
BATCHED_TARGETS = False


def _target_gradients(r: torch.Tensor, grid: torch.Tensor, act: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """The gradients ``(len(slots), m, C, H, W)`` of the readouts ``r (m, T)`` w.r.t. ``grid`` for
    each target slot (rows masked by ``act (m, T)``), in one vmapped backward pass."""
    go = torch.zeros(len(slots), *r.shape, dtype=r.dtype, device=r.device)
    for j, slot in enumerate(slots):
        go[j, :, slot] = act[:, slot].to(r.dtype)
    (g,) = torch.autograd.grad(r, grid, go, is_grads_batched=True)
    return g


@dataclass
class GIGResult:
    """Attributions of ``N`` images to ``T`` targets each, over the ``K`` source concepts."""

    attributions: torch.Tensor  # (N, T, K)
    output_diff: torch.Tensor  # (N, T)  g(F(X̃)) − g(F(0))
    residual: torch.Tensor  # (N, T)  Σ_q GIG − output_diff
    target_value: torch.Tensor  # (N, T)  g(F(X̃))
    n_evaluations: torch.Tensor  # (N, T)  gradient evaluations spent on each attribution
    error_estimate: torch.Tensor  # (N, T)  relative L2 error estimate of each attribution (NaN: none)
    integrated_gradients: torch.Tensor | None = None  # (N, T, P, C) Ḡ, when asked for
    tol: float | None = None  # the tolerance asked for (None: fixed grid)
    #: (N, T) bool: both stopping criteria met before the cap (None: fixed grid)
    converged: torch.Tensor | None = None
    #: (N, T, M) attributions to the ``directions`` passed (None: none passed); see :meth:`GIG.attribute`
    direction_attributions: torch.Tensor | None = None

    @property
    def relative_residual(self) -> torch.Tensor:
        """``|residual| / |output_diff|`` per attribution, shape ``(N, T)``."""
        return self.residual.abs() / self.output_diff.abs().clamp_min(1e-8)


class GIG:
    """Generalized Integrated Gradients from the concepts of ``layer`` (Captum-style).

    ``GIG(handle, layer, V).attribute(inputs, codes, target)`` with

    * ``inputs`` ``(N, 3, S, S)`` preprocessed images,
    * ``codes`` ``(N, P, K)`` coefficients of every position of ``layer`` (``P = H·W``),
    * ``target`` ``(N,)`` or ``(N, T)`` indices for the readout: class indices by default
      (:class:`~gig.readouts.ClassLogit`), or with ``read_layer`` / ``read_vectors``
      (``(K_b, C_b)``) concept indices at that later layer (:class:`~gig.readouts.ConceptReadout`),
      or any :class:`~gig.readouts.Readout` passed as ``readout``.

    With no step options every attribution is refined to ``tol`` (see the module docstring);
    ``n_steps`` switches to a fixed grid of ``quadrature_rule``.
    """

    def __init__(
        self,
        handle: ModelHandle,
        layer: str,
        dictionary: torch.Tensor,
        n_steps: int | None = None,
        quadrature_rule: str = "riemann-midpoint",
        internal_batch_size: int = 64,
        tol: float = 0.01,
        max_steps: int = 512,
        min_steps: int = 8,
        refine_fraction: float = 0.3,
        memory_budget: float = 2 * 2**30,
        bias: torch.Tensor | None = None,
    ):
        if quadrature_rule not in RULES:
            raise ConfigError(f"unknown quadrature {quadrature_rule!r}: use one of {', '.join(RULES)}")
        if not 0 < tol < 1:
            raise ConfigError(f"tol must be in (0, 1), got {tol!r}")
        if min_steps < 2 or max_steps < 2 * min_steps:
            raise ConfigError(f"need 2 <= min_steps and 2·min_steps <= max_steps, got {min_steps}, {max_steps}")
        self.handle = handle
        self.layer = layer
        self.V = dictionary.float().to(handle.device)
        if bias is not None and tuple(bias.shape) != (self.V.shape[1],):
            raise ConfigError(
                f"the decoder bias of {layer} must have shape ({self.V.shape[1]},), got {tuple(bias.shape)}"
            )
        #: a basis's decoder bias ``b (C,)``: paths then run from the zero-code reconstruction ``b``
        self.bias = None if bias is None else bias.float().to(handle.device)
        self.n_steps = n_steps
        self.quadrature_rule = quadrature_rule
        self.internal_batch_size = internal_batch_size
        self.tol = tol
        self.max_steps = max_steps
        self.min_steps = min_steps
        self.refine_fraction = refine_fraction
        self.memory_budget = memory_budget
        self._shape: tuple[int, int] | None = None

    def grid_shape(self, inputs: torch.Tensor) -> tuple[int, int]:
        if self._shape is None:
            with torch.no_grad():
                _, grids = self.handle.capture(inputs[:1], [self.layer])
            self._shape = tuple(grids[self.layer].shape[2:])
        return self._shape

    # ------------------------------------------------------------------ public
    def attribute(
        self,
        inputs: torch.Tensor,
        codes: torch.Tensor,
        target: torch.Tensor,
        read_layer: str | None = None,
        read_vectors: torch.Tensor | None = None,
        readout: Readout | None = None,
        n_steps: int | None = None,
        tol: float | None = None,
        internal_batch_size: int | None = None,
        return_gradients: bool = False,
        progress: Callable[[float], None] | None = None,
        directions: torch.Tensor | None = None,
    ) -> GIGResult:
        """Attributions ``(N, T, K)`` of ``codes (N, P, K)`` to ``target (N,)`` or ``(N, T)``.

        ``directions (N, M, C)``, if given, are also attributed along the same paths and grids
        (``direction_attributions (N, T, M)``): direction ``r`` of image ``n`` with the
        least-squares code of the reconstruction on it, ``Σ_p ⟨X̃_p, r̂⟩ ⟨Ḡ_p, r̂⟩`` (``r̂ = r/‖r‖``,
        so a direction's norm does not matter). They ride along: the grid is refined for the
        concepts' attributions alone, so the concepts' grids are the same with or without
        them (and their numbers, up to the order of float sums).
        Over an orthonormal basis of the ``C`` channels they add up to ``Σ_q GIG[q]``; the graph
        stage's significance test compares edges with random ones (:func:`random_directions`).

        ``progress(share)``, if given, is called after every refinement round with the share of
        the attributions (of all ``N · T``) that finished in it: the shares add up to 1.

        ``return_gradients`` also returns the integrated gradients ``Ḡ (N, T, P, C)`` (for
        :func:`gig_maps`); with error control that keeps every step's gradient until the end, so
        images are then processed in groups that fit ``memory_budget`` bytes."""
        ibs = internal_batch_size or self.internal_batch_size
        n_steps = n_steps or self.n_steps
        tol = self.tol if tol is None else tol
        target = self._checked_target(target, codes, directions)
        readout = self._readout(readout, read_layer, read_vectors)
        shape = self.grid_shape(inputs)
        group = self._images_per_group(target, shape, n_steps, return_gradients)
        parts = []
        with _full_float32():
            for images, report in _image_groups(target.shape[0], group, progress):
                settings = (ibs, n_steps, tol, return_gradients, report, directions)
                parts.append(self._attribute_group(inputs, codes, target, readout, images, shape, *settings))
        return self._result(parts, n_steps is not None, tol, return_gradients, self.V.shape[0])

    def _checked_target(
        self, target: torch.Tensor, codes: torch.Tensor, directions: torch.Tensor | None
    ) -> torch.Tensor:
        """``target`` as an ``(N, T)`` tensor on the device, once ``codes (N, P, K)`` and
        ``directions (N, M, C)`` are checked to fit its ``N`` images and the dictionary."""
        target = torch.as_tensor(target, device=self.handle.device)
        if target.dim() == 1:
            target = target[:, None]
        n = target.shape[0]
        if codes.shape[0] != n or codes.shape[2] != self.V.shape[0]:
            raise ValueError(f"codes {tuple(codes.shape)} do not fit {n} images and K={self.V.shape[0]}")
        if directions is not None and (
            directions.dim() != 3 or directions.shape[0] != n or directions.shape[2] != self.V.shape[1]
        ):
            raise ValueError(f"directions {tuple(directions.shape)} do not fit {n} images and C={self.V.shape[1]}")
        return target

    def _images_per_group(
        self, target: torch.Tensor, shape: tuple[int, int], n_steps: int | None, return_gradients: bool
    ) -> int:
        """How many images go through one :class:`PathIntegrator`: all of them, except when error
        control keeps every step's gradient ``(C, H, W)`` of every target ``(N, T)`` until the end,
        where the worst case (``max_steps + 1`` of them per path) must fit ``memory_budget``."""
        n = target.shape[0]
        if n_steps is None and return_gradients:
            h, w = shape
            per_image = (self.max_steps + 1) * target.shape[1] * self.V.shape[1] * h * w * 4
            return max(1, int(self.memory_budget // per_image))
        return n

    def _attribute_group(
        self, inputs, codes, target, readout, sl, shape, ibs, n_steps, tol, return_gradients, progress, directions
    ):
        device = self.handle.device
        ctx = PathIntegrator(
            self.handle,
            self.layer,
            inputs[sl].to(device),
            codes[sl].float().to(device),
            self.V,
            shape,
            target[sl],
            readout,
            ibs,
            None if directions is None else directions[sl].float().to(device),
            self.bias,
        )
        if n_steps is None:
            return ctx.adaptive(
                tol, self.min_steps, self.max_steps + 1, self.refine_fraction, return_gradients, progress
            )
        out = ctx.fixed(n_steps, self.quadrature_rule)
        if progress is not None:
            progress(1.0)
        return out

    @staticmethod
    def _result(parts: list[dict], fixed: bool, tol: float, return_gradients: bool, k: int) -> GIGResult:
        """The groups' results concatenated into one :class:`GIGResult` (on the CPU); columns
        past the ``k`` concepts are the directions' attributions."""
        fields = {
            k: (torch.cat([p[k] for p in parts]).detach().cpu() if parts[0][k] is not None else None) for k in parts[0]
        }
        g_bar = fields["g_bar"]
        every, diff = fields["attributions"], fields["g1"] - fields["g0"]
        attributions = every[..., :k]
        return GIGResult(
            attributions=attributions,
            output_diff=diff,
            residual=attributions.sum(-1) - diff,
            target_value=fields["g1"],
            n_evaluations=fields["evaluations"].long(),
            error_estimate=fields["estimate"].float(),
            integrated_gradients=g_bar.flatten(3).transpose(2, 3) if return_gradients else None,
            tol=None if fixed else tol,
            converged=None if fixed else fields["converged"],
            direction_attributions=every[..., k:] if every.shape[-1] > k else None,
        )

    def uniform_levels(
        self,
        inputs: torch.Tensor,
        codes: torch.Tensor,
        target: torch.Tensor,
        max_steps: int,
        min_steps: int = 2,
        **read,
    ) -> dict[int, torch.Tensor]:
        """Attributions on every nested uniform trapezoid grid ``min_steps, 2·min_steps, …,
        max_steps`` intervals, ``{intervals: (N, T, K)}``, at the cost of the finest (for studies
        of what one global step count buys)."""
        F, _ = self.uniform_integrand(inputs, codes, target, max_steps, **read)
        levels, steps = {}, min_steps
        while steps <= max_steps:
            w = torch.zeros(max_steps + 1, device=F.device)
            w[:: max_steps // steps] = quadrature(steps, "trapezoid")[1].to(F.device)
            levels[steps] = torch.einsum("s,nstk->ntk", w, F).cpu()
            steps *= 2
        return levels

    def uniform_integrand(
        self, inputs: torch.Tensor, codes: torch.Tensor, target: torch.Tensor, intervals: int, **read
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The integrand on the uniform grid ``α = i / intervals``: ``F (N, nodes, T, K)``, each
        node's gradient projected on the concepts, and the readouts ``g(α X̃)`` ``(N, nodes, T)``
        (for studies of quadrature rules, ``bench/gig_integrands.py``)."""
        target = torch.as_tensor(target, device=self.handle.device)
        target = target[:, None] if target.dim() == 1 else target
        readout = self._readout(read.pop("readout", None), read.pop("read_layer", None), read.pop("read_vectors", None))
        ctx = PathIntegrator(
            self.handle,
            self.layer,
            inputs.to(self.handle.device),
            codes.float().to(self.handle.device),
            self.V,
            self.grid_shape(inputs),
            target,
            readout,
            self.internal_batch_size,
            bias=self.bias,
        )
        (n, t), nodes = target.shape, intervals + 1
        image, alpha = ctx._all_items(quadrature(intervals, "trapezoid")[0])
        out = ctx.evaluate(image, alpha, torch.ones(len(image), t, dtype=torch.bool, device=ctx.device), per_node=True)
        return out["F"].view(n, nodes, t, -1), out["values"].view(n, nodes, t)

    @staticmethod
    def _readout(readout, read_layer, read_vectors) -> Readout:
        if readout is not None:
            if read_layer is not None or read_vectors is not None:
                raise ValueError("give either readout or read_layer/read_vectors, not both")
            return readout
        if (read_layer is None) != (read_vectors is None):
            raise ValueError("read_layer and read_vectors go together")
        return ClassLogit() if read_layer is None else ConceptReadout(read_layer, read_vectors)


def _image_groups(
    n: int, group: int, progress: Callable[[float], None] | None
) -> Iterator[tuple[slice, Callable[[float], None] | None]]:
    """The ``n`` images in consecutive slices of ``group``, each with its own progress callback:
    a group's shares of its attributions, scaled by its share of the images (so they add up to 1
    over the groups), or None where no ``progress`` is asked for."""
    for lo in range(0, n, group):
        share = min(group, n - lo) / n
        report = None if progress is None else (lambda done, share=share: progress(done * share))
        yield slice(lo, lo + group), report


@contextmanager
def _full_float32():
    """GIG in float32 on CUDA: TF32 convolutions (PyTorch's default for cuDNN) moved attributions
    by 0.2–0.7 % against the CPU on an H200 (bench/gpu_check.py), most of a 1 % tolerance."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def project(codes: torch.Tensor, g_bar: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``GIG[n,t,q] = Σ_p U[n,p,q] ⟨Ḡ[n,t,p], V_q⟩`` for ``codes (N, P, K)``, ``g_bar (N, T, C, H, W)``,
    ``V (K, C)`` → ``(N, T, K)``, without materialising ``(N, T, P, K)``."""
    g = g_bar.flatten(3)  # (N, T, C, P)
    return (torch.einsum("npk,ntcp->ntkc", codes, g) * V).sum(-1)


class PathIntegrator:
    """Gradient evaluations along ``α ↦ b + α·X̃`` (``b``: a basis's decoder bias, else 0) for a
    batch of images and their targets.

    An *item* is one (image, α) pair: one forward pass, shared by the image's targets, and one
    backward pass per target still refining. Items of several images go through one forward
    (``internal_batch_size`` at a time) with the network before the layer run once per image."""

    def __init__(self, handle, layer, inputs, codes, V, shape, target, readout, ibs, directions=None, bias=None):
        self.handle, self.layer, self.inputs, self.codes, self.V = handle, layer, inputs, codes, V
        self.target, self.readout, self.ibs = target, readout, ibs
        n = codes.shape[0]
        flat = codes @ V  # (N, P, C)
        self.recon = flat.transpose(1, 2).reshape(n, -1, *shape)  # (N, C, H, W)
        # The path's start, the zero-code reconstruction: 0, or a basis's decoder bias at every position.
        self.base = None if bias is None else bias.view(1, -1, 1, 1)
        self.device = inputs.device
        self.k = V.shape[0]
        # Directions ride along as extra columns of the integrand: unit vectors (N, M, C) and the
        # reconstruction's least-squares code on each (N, P, M).
        self.directions = None if directions is None else torch.nn.functional.normalize(directions, dim=-1)
        self.direction_codes = None if directions is None else flat @ self.directions.transpose(1, 2)
        self.width = self.k + (0 if directions is None else directions.shape[1])

    # ------------------------------------------------------------------ evaluations
    def evaluate(
        self,
        image: torch.Tensor,
        alpha: torch.Tensor,
        wanted: torch.Tensor,
        weight_sets: list[torch.Tensor] = (),
        per_node: bool = False,
        keep_gradients: bool = False,
    ):
        """Gradients of the wanted targets at items ``(image (M,), alpha (M,))``.

        Items of one image must be consecutive (the network before the layer then runs once per
        run of them). ``wanted (M, T)``: which targets of each item need a backward pass; items are
        best ordered so that a chunk of ``internal_batch_size`` holds one pattern of ``wanted``,
        since a backward pass costs the whole chunk whichever of its rows asked for it. Returns a
        dict with ``values (M, T)`` (the readouts), and as asked: ``sums`` — one
        ``(N, T, C, H, W)`` per weight vector of ``weight_sets`` (``Σ_items w · gradient``);
        ``F (M, T, K)`` — each item's gradient projected on the concepts,
        ``Σ_p U[p,q] ⟨∇g[p], V_q⟩`` (zero where not wanted); ``G (R, C, H, W)``, the gradient of
        every wanted (item, target), row ``G_row[m, t]`` (``(M, T)``, −1 where not wanted)."""
        m, (n, t) = image.numel(), self.target.shape
        shape = self.recon.shape[1:]
        out = {"values": torch.zeros(m, t, device=self.device)}
        out["sums"] = [torch.zeros(n, t, *shape, device=self.device) for _ in weight_sets]
        if per_node:
            out["F"] = torch.zeros(m, t, self.width, device=self.device)
        if keep_gradients:
            out["G_row"] = torch.full((m, t), -1, dtype=torch.long, device=self.device)
            out["G_row"][wanted] = torch.arange(int(wanted.sum()), device=self.device)
            out["G"] = torch.zeros(int(wanted.sum()), *shape, device=self.device)
        for lo, hi in self._chunks(wanted):
            img, a = image[lo:hi], alpha[lo:hi]
            uniq, counts = torch.unique_consecutive(img, return_counts=True)
            grid = self.recon[img] * a.to(self.recon.dtype).view(-1, 1, 1, 1)
            if self.base is not None:
                grid = grid + self.base
            grid = grid.contiguous(memory_format=self.handle.memory_format).requires_grad_(True)
            res = self.handle.run_from(self.inputs[uniq], self.layer, grid, read=self.readout.layer, counts=counts)
            r = self.readout.values(res, self.target[img])  # (m_c, T)
            out["values"][lo:hi] = r.detach()
            act = wanted[lo:hi]  # (m_c, T)
            slots = act.any(0).nonzero().flatten().tolist()
            batched = _target_gradients(r, grid, act, slots) if BATCHED_TARGETS and len(slots) > 1 else None
            for j, slot in enumerate(slots):
                if batched is not None:
                    g = batched[j]
                else:  # one backward per target wanted in the chunk; the forward is shared by all
                    go = torch.zeros_like(r)
                    go[:, slot] = act[:, slot].to(r.dtype)
                    (g,) = torch.autograd.grad(r, grid, go, retain_graph=j < len(slots) - 1)
                g = g.contiguous()
                for k, weights in enumerate(weight_sets):
                    out["sums"][k][:, slot].index_add_(0, img, g * weights[lo:hi].view(-1, 1, 1, 1))
                if per_node:
                    out["F"][lo:hi, slot] = self._project_items(uniq, counts, g) * act[:, slot, None]
                if keep_gradients:
                    asked = act[:, slot]
                    out["G"][out["G_row"][lo:hi, slot][asked]] = g[asked]
        return out

    def _chunks(self, wanted: torch.Tensor) -> list[tuple[int, int]]:
        """``[lo, hi)`` item ranges of at most ``internal_batch_size`` items, each holding one
        pattern of ``wanted`` (a backward pass costs the whole chunk, whichever rows asked for it)."""
        m = wanted.shape[0]
        change = (wanted[1:] != wanted[:-1]).any(1).nonzero().flatten() + 1
        bounds = [0, *change.tolist(), m]
        return [
            (lo, min(lo + self.ibs, hi))
            for start, hi in zip(bounds[:-1], bounds[1:])
            for lo in range(start, hi, self.ibs)
        ]

    def _project_items(self, images: torch.Tensor, counts: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``Σ_p U[n,p,q] ⟨g_m[p], V_q⟩`` per item ``m`` (consecutive runs of ``counts`` items of
        ``images``): ``(M, K)``, then the directions' columns likewise (``(M, K + M_dirs)``)."""
        flat = g.flatten(2)  # (M, C, P)
        out = torch.empty(g.shape[0], self.width, device=g.device)
        lo = 0
        for n, count in zip(images.tolist(), counts.tolist()):
            items = flat[lo : lo + count].transpose(1, 2)  # (m, P, C)
            # (K, P) @ (m, P, C) → (m, K, C), then ⟨·, V_q⟩ over C
            out[lo : lo + count, : self.k] = (torch.matmul(self.codes[n].T, items) * self.V).sum(-1)
            if self.directions is not None:  # a separate product: the concepts' columns stay as they were
                dirs = self.directions[n]
                out[lo : lo + count, self.k :] = (torch.matmul(self.direction_codes[n].T, items) * dirs).sum(-1)
            lo += count
        return out

    def _project_sums(self, g_bar: torch.Tensor) -> torch.Tensor:
        """:func:`project` of integrated gradients ``(N, T, C, H, W)`` on the concepts, and on the
        directions where there are some: ``(N, T, K [+ M])``."""
        concepts = project(self.codes, g_bar, self.V)
        if self.directions is None:
            return concepts
        g = g_bar.flatten(3)  # (N, T, C, P)
        dirs = torch.einsum("npm,ntcp,nmc->ntm", self.direction_codes, g, self.directions)
        return torch.cat([concepts, dirs], -1)

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``g(F(0))`` and ``g(F(X̃))`` ``(N, T)`` in one no-grad pass (2 replacements per image)."""
        with torch.no_grad():
            ends = torch.stack([torch.zeros_like(self.recon), self.recon], 1).flatten(0, 1)
            if self.base is not None:
                ends = ends + self.base
            out = self.handle.run_from(self.inputs, self.layer, ends, read=self.readout.layer)
            vals = self.readout.values(out, self.target.repeat_interleave(2, 0))
        vals = vals.view(-1, 2, self.target.shape[1])
        return vals[:, 0], vals[:, 1]

    def _all_items(self, alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.target.shape[0]
        image = torch.arange(n, device=self.device).repeat_interleave(len(alphas))
        return image, alphas.to(self.device).repeat(n)

    # ------------------------------------------------------------------ fixed grids
    def fixed(self, n_steps: int, rule: str) -> dict:
        """One fixed grid for every attribution; the trapezoid rule also integrates its nested half
        grid, whose difference is the error estimate."""
        n, t = self.target.shape
        alphas, weights = quadrature(n_steps, rule)
        image, alpha = self._all_items(alphas)
        active = torch.ones(len(image), t, dtype=torch.bool, device=self.device)
        weight_sets = [weights.to(self.device).repeat(n)]
        if rule == "trapezoid":
            if n_steps % 2:
                raise ConfigError(f"the trapezoid rule needs an even n_steps for its error estimate, got {n_steps}")
            half = torch.zeros(n_steps + 1)
            half[::2] = quadrature(n_steps // 2, "trapezoid")[1]
            weight_sets.append(half.to(self.device).repeat(n))
        out = self.evaluate(image, alpha, active, weight_sets)
        g_bar = out["sums"][0]
        attributions = self._project_sums(g_bar)
        if rule == "trapezoid":
            values = out["values"].view(n, n_steps + 1, t)
            g0, g1 = values[:, 0], values[:, -1]
            coarse = project(self.codes, out["sums"][1], self.V)
            estimate = _relative_change(attributions[..., : self.k], coarse)
        else:
            g0, g1 = self.endpoints()
            estimate = torch.full((n, t), float("nan"), device=self.device)
        evaluations = torch.full((n, t), len(alphas), device=self.device)
        return _result(attributions, g0, g1, evaluations, estimate, None, g_bar)

    # ------------------------------------------------------------------ error control
    def adaptive(
        self,
        tol: float,
        min_cells: int,
        max_nodes: int,
        fraction: float,
        keep_gradients: bool,
        progress: Callable[[float], None] | None = None,
    ) -> dict:
        """Every attribution (one image, one target: a *path*) gets its own cells ``[a, b]`` with
        their midpoints ``m`` (the trapezoid rule on ``[a, m]`` and ``[m, b]``), bisected where
        its attribution vector changes most, until its estimate meets the tolerance.

        Starts from ``min_cells`` equal cells, shared by all paths. Per round, per path:
        ``d_c = T2_c − T1_c`` per cell (the two-interval minus the one-interval trapezoid, a vector
        over the concepts), the estimate ``ESTIMATE_SCALE · max(‖Σ_c d_c‖, (Σ_c ‖d_c‖²)^½) /
        ‖Σ_c T2_c‖``, and the cells holding the first ``fraction`` of ``Σ_c ‖d_c‖²`` are bisected
        (two new nodes each). A path stops once its estimate is within ``tol`` and its
        completeness residual within ``tol / 2``, or when it has ``max_nodes`` nodes.

        The state of every path is a padded tensor (nodes, integrands, cells), so a round is a
        fixed number of tensor operations and host synchronisations whatever the number of images
        and targets. A round's new nodes are evaluated once per distinct (image, α) — paths of one
        image that ask for the same node share its forward — with one backward pass per target
        that asked for it (items are grouped by the set of targets that want them).
        """
        n, t = self.target.shape
        state, g0, g1, pieces = self._start_refinement(min_cells, keep_gradients)
        self._refine(state, tol, max_nodes, fraction, keep_gradients, pieces, progress)
        A, estimate, done = state.final(tol)
        g_bar = state.integrated_gradients(pieces) if keep_gradients else None
        return _result(
            A.view(n, t, -1),
            g0,
            g1,
            state.count.view(n, t).float(),
            estimate.view(n, t),
            done.view(n, t),
            None if g_bar is None else g_bar.view(n, t, *g_bar.shape[1:]),
        )

    def _start_refinement(
        self, min_cells: int, keep_gradients: bool
    ) -> tuple[RefinementState, torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
        """Every path on the shared start grid of ``min_cells`` equal cells (``2·min_cells + 1``
        nodes): its :class:`RefinementState`, the readouts at the path's ends ``g0, g1 (N, T)``,
        and with ``keep_gradients`` the list of gradient pieces, the start grid's first."""
        n, t = self.target.shape
        dev, paths = self.device, n * self.target.shape[1]
        start = torch.linspace(0, 1, 2 * min_cells + 1, dtype=torch.float64, device=dev)
        per = len(start)
        image, alpha = self._all_items(start)
        first = self.evaluate(
            image,
            alpha.float(),
            torch.ones(n * per, t, dtype=torch.bool, device=dev),
            per_node=True,
            keep_gradients=keep_gradients,
        )
        values = first["values"].view(n, per, t)
        g0, g1 = values[:, 0], values[:, -1]
        state = RefinementState(
            start,
            first["F"].view(n, per, t, -1).transpose(1, 2).reshape(paths, per, -1),
            min_cells,
            (g1 - g0).reshape(paths),
            t,
            self.k,
        )
        pieces = [first["G"]] if keep_gradients else None  # every round's gradients, until the end
        if keep_gradients:  # path p = (image i, target j) reads row G_row[i·per + k, j] at node k
            rows = first["G_row"].view(n, per, t).transpose(1, 2).reshape(paths, per)
            state.record_piece(0, rows)
        return state, g0, g1, pieces

    def _refine(
        self,
        state: RefinementState,
        tol: float,
        max_nodes: int,
        fraction: float,
        keep_gradients: bool,
        pieces: list[torch.Tensor] | None,
        progress: Callable[[float], None] | None,
    ) -> None:
        """Refinement rounds until every path of ``state`` is done: each round stops the paths
        that are, bisects the chosen cells of the others and evaluates their new nodes (gradients
        appended to ``pieces`` with ``keep_gradients``); ``progress`` gets each round's share of
        the paths that finished in it."""
        n, t = self.target.shape
        paths = n * t
        reported = 0
        while True:
            chosen = state.round(tol, max_nodes, fraction)
            if progress is not None:  # one host sync more per round, only when asked
                finished = paths - int(state.active.sum())
                progress((finished - reported) / paths)
                reported = finished
            if chosen is None:
                break
            path, cell = chosen
            items = state.requests(path, cell)
            out = self.evaluate(
                items.image, items.alpha.float(), items.wanted, per_node=True, keep_gradients=keep_gradients
            )
            state.add(path, cell, items, out["F"])
            if keep_gradients:
                pieces.append(out["G"])
                state.record_piece(len(pieces) - 1, None, out["G_row"])


#: The trapezoid rule's error estimate, scaled: ``max(‖Σ_c d_c‖, (Σ_c ‖d_c‖²)^½)`` compares the
#: composite rule with the one a level coarser. On GIG integrands (piecewise constant in α, with
#: hundreds of small switches of ReLU6 units and of the readout's argmax along a path) the rule's
#: error falls about like N^-1.5, so the difference over-states the finer rule's error by about
#: 2^1.5 − 1 ≈ 1.8 at the median, but by less on a few paths (5th percentile 1.2–1.35 on Lite0 with
#: ImageNet and embedded photos, Lite1 with Tux Paint stamps). Scaled by 0.85 the stopping test
#: stays at or above the true error on about 95 % of paths, so the error's p95 stays within the
#: tolerance; 0.7 let it reach 1.1–1.2 % at a 1 % tolerance (bench/gig_accuracy.py against a
#: 1 024-step reference; bench/quadrature_study.py replays the rule on saved integrands).
ESTIMATE_SCALE = 0.85


@dataclass
class _Items:
    """One round's distinct nodes: ``image (M,)``, ``alpha (M,)`` float64, ``wanted (M, T)``, and
    for every request (path, new node) the item that answers it, ``of_request (R, 2)``."""

    image: torch.Tensor
    alpha: torch.Tensor
    wanted: torch.Tensor
    of_request: torch.Tensor


class RefinementState:
    """The refinement state of ``P`` paths as padded tensors.

    ``alphas (P, cap)`` float64 nodes, ``F (P, cap, K)`` the integrand at them, ``count (P,)``;
    ``cells (P, cells_cap, 3)`` node indices ``(a, m, b)``, ``n_cells (P,)``; ``where (P, cap, 2)``
    which gradient piece and row hold each node's gradient; ``active (P,)``. Path ``p`` is image
    ``p // T``, target ``p % T``.
    """

    def __init__(self, start: torch.Tensor, F: torch.Tensor, min_cells: int, delta: torch.Tensor, t: int, k: int):
        paths, per, _ = F.shape
        dev = F.device
        self.t, self.k = t, k  # the first k columns of F are the concepts'; the rest ride along
        self.delta = delta
        cap = 4 * per
        self.alphas = torch.zeros(paths, cap, dtype=torch.float64, device=dev)
        self.alphas[:, :per] = start
        self.F = F.new_zeros(paths, cap, F.shape[2])
        self.F[:, :per] = F
        self.count = torch.full((paths,), per, dtype=torch.long, device=dev)
        j = torch.arange(min_cells, device=dev)
        self.cells = torch.zeros(paths, 2 * min_cells, 3, dtype=torch.long, device=dev)
        self.cells[:, :min_cells] = torch.stack([2 * j, 2 * j + 1, 2 * j + 2], 1)
        self.n_cells = torch.full((paths,), min_cells, dtype=torch.long, device=dev)
        self.where = torch.zeros(paths, cap, 2, dtype=torch.long, device=dev)
        self.active = torch.ones(paths, dtype=torch.bool, device=dev)
        self._last_rows: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ per round
    def widths(self) -> torch.Tensor:
        """``(P, cells)`` float64: every cell's width ``b − a``, 0 for padding."""
        valid = torch.arange(self.cells.shape[1], device=self.cells.device) < self.n_cells[:, None]
        return (self.alphas.gather(1, self.cells[..., 2]) - self.alphas.gather(1, self.cells[..., 0])) * valid

    def state(self):
        """Attributions ``A (P, K [+ M])``, scaled estimates ``(P,)``, per-cell scores ``(P, cells)``,
        which cells can be bisected ``(P, cells)``; the estimates and scores are the concepts' alone."""
        width = self.widths()
        h = width.to(self.F.dtype)[..., None]  # (P, cells, 1); 0 for padding
        k = self.F.shape[2]
        Fa, Fm, Fb = (self.F.gather(1, self.cells[..., i, None].expand(-1, -1, k)) for i in range(3))
        two = h / 4 * (Fa + 2 * Fm + Fb)
        d = (two - h / 2 * (Fa + Fb))[..., : self.k]
        A = two.sum(1)
        concepts = A[:, : self.k]
        norm2 = (concepts * concepts).sum(-1).clamp_min(1e-30)  # (P,)
        local = (d * d).sum(-1)  # (P, cells)
        # The change against every cell one level coarser; cells' errors can cancel in that sum by
        # chance, so it is taken at least as large as their root sum of squares.
        change = torch.maximum(d.sum(1).norm(dim=-1), local.sum(1).sqrt())
        estimate = ESTIMATE_SCALE * change / norm2.sqrt()
        return A, estimate, local / norm2[:, None], width > 1e-9

    def met(self, A: torch.Tensor, estimate: torch.Tensor, tol: float) -> torch.Tensor:
        residual = (A[:, : self.k].sum(-1) - self.delta).abs()
        return (estimate <= tol) & (residual <= 0.5 * tol * self.delta.abs())

    def round(self, tol: float, max_nodes: int, fraction: float):
        """Stop the paths that are done; the cells to bisect of the others as ``(path, cell)``
        index tensors, or None when every path is done."""
        A, estimate, score, splittable = self.state()
        room = (max_nodes - self.count) // 2
        self.active &= ~(self.met(A, estimate, tol) | (room < 1) | ~splittable.any(1))
        if not bool(self.active.any()):
            return None
        score = torch.where(splittable, score, torch.full_like(score, -1.0))
        order = torch.argsort(score, dim=1, descending=True)
        cumulative = score.gather(1, order).clamp_min(0).cumsum(1)
        wanted = (cumulative < fraction * cumulative[:, -1:]).sum(1) + 1
        wanted = torch.minimum(wanted, room).clamp_min(1)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous()
        )
        chosen = (rank < wanted[:, None]) & splittable & self.active[:, None]
        return chosen.nonzero(as_tuple=True)

    def requests(self, path: torch.Tensor, cell: torch.Tensor) -> _Items:
        """The distinct (image, α) items that the chosen cells' new nodes need."""
        a, m, b = (self.alphas[path, self.cells[path, cell, i]] for i in range(3))
        alpha = torch.stack([(a + m) / 2, (m + b) / 2], 1)  # (R, 2)
        image = (path // self.t)[:, None].expand(-1, 2)
        # α are exact dyadic refinements of a shared start grid, so equal nodes are equal floats;
        # the key orders items image-major.
        key = image * 2.0 + alpha  # α ∈ [0, 1], so images cannot collide
        unique, inverse = torch.unique(key.flatten(), return_inverse=True)
        wanted = torch.zeros(len(unique), self.t, dtype=torch.bool, device=path.device)
        wanted[inverse, (path % self.t).repeat_interleave(2)] = True
        item_alpha = torch.zeros(len(unique), dtype=torch.float64, device=path.device)
        item_alpha[inverse] = alpha.flatten()
        item_image = torch.zeros(len(unique), dtype=torch.long, device=path.device)
        item_image[inverse] = image.flatten()
        # Items grouped by the targets that want them (image-major inside a group): a chunk's
        # backward passes then serve only rows that asked for them.
        if self.t < 62:
            pattern = (wanted.long() << torch.arange(self.t, device=path.device)).sum(1)
            order = torch.argsort(pattern, stable=True)
            rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
            item_image, item_alpha, wanted, inverse = item_image[order], item_alpha[order], wanted[order], rank[inverse]
        return _Items(item_image, item_alpha, wanted, inverse.view(-1, 2))

    def add(self, path: torch.Tensor, cell: torch.Tensor, items: _Items, F_items: torch.Tensor) -> None:
        """Store the new nodes' integrands and split the chosen cells into their halves."""
        dev = path.device
        per_path = torch.bincount(path, minlength=len(self.count))
        self._grow(int((self.count + 2 * per_path).max()), int((self.n_cells + per_path).max()))
        first_of_path = torch.cumsum(per_path, 0) - per_path
        rank = torch.arange(len(path), device=dev) - first_of_path[path]
        left = self.count[path] + 2 * rank
        slot = path % self.t
        for side, pos in ((0, left), (1, left + 1)):
            rows = items.of_request[:, side]
            self.alphas[path, pos] = items.alpha[rows]
            self.F[path, pos] = F_items[rows, slot]
        self._last_rows = (path, torch.stack([left, left + 1], 1), items.of_request)
        a, m, b = (self.cells[path, cell, i] for i in range(3))
        self.cells[path, cell] = torch.stack([a, left, m], 1)
        self.cells[path, self.n_cells[path] + rank] = torch.stack([m, left + 1, b], 1)
        self.count += 2 * per_path
        self.n_cells += per_path

    def record_piece(self, piece: int, rows: torch.Tensor | None, G_row: torch.Tensor | None = None) -> None:
        """Which gradient piece and row hold the nodes just added: ``rows (P, nodes)`` for the
        start grid, else the last :meth:`add`'s nodes through the piece's ``G_row (M, T)``."""
        if rows is not None:
            self.where[:, : rows.shape[1], 0] = piece
            self.where[:, : rows.shape[1], 1] = rows
            return
        path, pos, item_rows = self._last_rows
        self.where[path[:, None], pos, 0] = piece
        self.where[path[:, None], pos, 1] = G_row[item_rows, (path % self.t)[:, None]]

    def _grow(self, nodes: int, cells: int) -> None:
        if nodes > self.alphas.shape[1]:
            extra = max(nodes, 2 * self.alphas.shape[1]) - self.alphas.shape[1]
            self.alphas = torch.nn.functional.pad(self.alphas, (0, extra))
            self.F = torch.nn.functional.pad(self.F, (0, 0, 0, extra))
            self.where = torch.nn.functional.pad(self.where, (0, 0, 0, extra))
        if cells > self.cells.shape[1]:
            extra = max(cells, 2 * self.cells.shape[1]) - self.cells.shape[1]
            self.cells = torch.nn.functional.pad(self.cells, (0, 0, 0, extra))

    # ------------------------------------------------------------------ results
    def final(self, tol: float):
        """Attributions ``(P, K)``, estimates ``(P,)`` and whether both criteria were met ``(P,)``."""
        A, estimate, _, _ = self.state()
        return A, estimate.float(), self.met(A, estimate, tol)

    def node_weights(self) -> torch.Tensor:
        """``(P, cap)``: every node's weight in its path's composite two-interval trapezoid rule."""
        h = self.widths()
        w = torch.zeros_like(self.alphas)
        for i, share in enumerate((0.25, 0.5, 0.25)):
            w.scatter_add_(1, self.cells[..., i], share * h)
        return w.float()

    def integrated_gradients(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """``Ḡ (P, C, H, W)``: each path's gradients at its nodes, weighted by its rule."""
        w = self.node_weights()
        paths = torch.arange(len(self.count), device=w.device)[:, None].expand_as(w)
        out = pieces[0].new_zeros(len(self.count), pieces[0][0].numel())
        for index, piece in enumerate(pieces):
            mine = (self.where[..., 0] == index) & (w != 0)
            weights = torch.zeros(len(self.count), piece.shape[0], device=w.device)
            weights.index_put_((paths[mine], self.where[..., 1][mine]), w[mine], accumulate=True)
            out += weights @ piece.flatten(1)
        return out.view(len(self.count), *pieces[0].shape[1:])


def _relative_change(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """``‖fine − coarse‖₂ / ‖fine‖₂`` over the last axis."""
    return (fine - coarse).norm(dim=-1) / fine.norm(dim=-1).clamp_min(1e-30)


def _result(attributions, g0, g1, evaluations, estimate, converged, g_bar) -> dict:
    return {
        "attributions": attributions,
        "g0": g0,
        "g1": g1,
        "evaluations": evaluations,
        "estimate": estimate,
        "converged": converged,
        "g_bar": g_bar,
    }


def gig_maps(
    codes: torch.Tensor, integrated_gradients: torch.Tensor, dictionary: torch.Tensor, concepts: torch.Tensor
) -> torch.Tensor:
    """Spatial GIG maps: where each chosen concept drives each target.

    ``codes (N, P, K)``, ``integrated_gradients (N, T, P, C)``, ``dictionary (K, C)``,
    ``concepts (N, J)`` → ``(N, T, J, P)`` with ``map[n,t,j,p] = U[n,p,q] ⟨Ḡ[n,t,p], V_q⟩``,
    ``q = concepts[n, j]``; summing over ``p`` gives the concept's GIG.
    """
    u = codes.gather(2, concepts[:, None, :].expand(-1, codes.shape[1], -1))  # (N, P, J)
    v = dictionary[concepts]  # (N, J, C)
    proj = torch.einsum("ntpc,njc->ntjp", integrated_gradients, v)
    return proj * u.transpose(1, 2)[:, None]


def random_directions(image_ids: list[int], layer: str, m: int, channels: int) -> torch.Tensor:
    """``(N, m, C)`` standard normal directions (so uniform on the sphere once normalised), each
    image's own, seeded by its id and the layer's name: the same whatever the batch, shard or
    number of processes."""
    salt = zlib.crc32(layer.encode()) << 24
    out = torch.empty(len(image_ids), m, channels)
    for row, image_id in enumerate(image_ids):
        g = torch.Generator().manual_seed(salt + int(image_id))
        out[row] = torch.randn(m, channels, generator=g)
    return out


def safe_denominator(d: torch.Tensor) -> torch.Tensor:
    """``d`` with values too close to 0 replaced by 1e-8 (keeps the sign of real changes)."""
    return torch.where(d.abs() < 1e-8, torch.full_like(d, 1e-8), d)


def flow(attributions: torch.Tensor, output_diff: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """The flow rule: the part of an upper target's importance that each lower concept carries,
    ``I[t] · GIG_t[q] / Δg_t``, for ``attributions (..., K)``, their targets' output changes
    ``output_diff (...)`` and importances ``importance (...)`` → ``(..., K)``. The graph's edge
    weights and the walk's lower-layer scores (their sums over the targets) are these flows, so
    weights compose along paths."""
    return importance[..., None] * (attributions / safe_denominator(output_diff)[..., None])
