"""Stage 5 — Generalized Integrated Gradients (GIG) between concept layers and to classes.

For a source layer ``a`` with codes ``U (P, K)`` and dictionary ``V (K, C)``, reconstruction
``X̃ = U V``, and a scalar target ``g`` read after ``a`` (a :mod:`gig.readouts` object: a class
logit or probability, or a concept's readout at a later layer ``b``)::

    GIG[q] = Σ_p U[p, q] · ∫₀¹ ∂g(F(α X̃)) / ∂U[p, q] dα

Because ``X̃`` is linear in ``U``, ``∂g/∂U[p, q] = ⟨∂g/∂X̃_p, V_q⟩``: one integrated gradient
``Ḡ (P, C)`` with respect to the layer's output gives every concept's attribution,
``GIG[q] = Σ_p U[p, q] ⟨Ḡ_p, V_q⟩``, and keeping ``p`` open gives the spatial map. Completeness,
``Σ_q GIG[q] = g(F(X̃)) − g(F(0))``, holds up to the quadrature error; its residual is recorded
for every attribution.

**Error control (the default).** The integrand is not smooth (ReLU6 clipping, the max readout):
along the path the gradient vector jumps, often at a few values of α that carry most of the
variation, so high-order rules gain nothing, uniform grids converge like ``1/N``, and paths
differ widely in difficulty. Each image's path gets its own grid, refined where its
attributions change: cells ``[a, b]`` of α with their midpoints, integrated by the trapezoid
rule on both halves; per cell, the difference ``d`` between that and the one-interval trapezoid
is a local error vector over the concepts. Cells holding most of ``Σ ‖d‖²`` are bisected (two
new evaluations each) until, for every target,

    ``max(‖Σ_c d_c‖, (Σ_c ‖d_c‖²)^½) / ‖GIG‖₂ ≤ tol``   and   ``|Σ_q GIG[q] − Δg| ≤ (tol/2)·|Δg|``

or until the image has ``max_steps + 1`` evaluations (recorded as unconverged). The first
quantity is the error estimate stored with every attribution. The targets of one image share its
grid: one forward per step for all of them, one backward per target still refining; a target's
numbers therefore depend, within the tolerance, on the targets it is attributed with.

With ``n_steps`` set, a fixed grid is used instead (``gauss-legendre``, ``riemann-midpoint`` or
``trapezoid``); only the trapezoid rule has a nested half grid and so an error estimate (NaN for
the others).

Images, steps and targets are batched together (``internal_batch_size`` items per forward);
the network before ``a`` runs once per image (see ``ModelHandle.run_from``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open

from .errors import ConfigError, RunMismatchError
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

    def __init__(self, handle: ModelHandle, layer: str, dictionary: torch.Tensor, n_steps: int | None = None,
                 quadrature_rule: str = "riemann-midpoint", internal_batch_size: int = 64, tol: float = 0.01,
                 max_steps: int = 512, min_steps: int = 8, refine_fraction: float = 0.3,
                 memory_budget: float = 2 * 2**30):
        if quadrature_rule not in RULES:
            raise ConfigError(f"unknown quadrature {quadrature_rule!r}: use one of {', '.join(RULES)}")
        if not 0 < tol < 1:
            raise ConfigError(f"tol must be in (0, 1), got {tol!r}")
        if min_steps < 2 or max_steps < 2 * min_steps:
            raise ConfigError(f"need 2 <= min_steps and 2·min_steps <= max_steps, got {min_steps}, {max_steps}")
        self.handle = handle
        self.layer = layer
        self.V = dictionary.float().to(handle.device)
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
    def attribute(self, inputs: torch.Tensor, codes: torch.Tensor, target: torch.Tensor,
                  read_layer: str | None = None, read_vectors: torch.Tensor | None = None,
                  readout: Readout | None = None, n_steps: int | None = None, tol: float | None = None,
                  internal_batch_size: int | None = None, return_gradients: bool = False) -> GIGResult:
        """Attributions ``(N, T, K)`` of ``codes (N, P, K)`` to ``target (N,)`` or ``(N, T)``.

        ``return_gradients`` also returns the integrated gradients ``Ḡ (N, T, P, C)`` (for
        :func:`gig_maps`); with error control that keeps every step's gradient until the end, so
        images are then processed in groups that fit ``memory_budget`` bytes."""
        device = self.handle.device
        ibs = internal_batch_size or self.internal_batch_size
        n_steps = n_steps or self.n_steps
        tol = self.tol if tol is None else tol
        target = torch.as_tensor(target, device=device)
        if target.dim() == 1:
            target = target[:, None]
        n = target.shape[0]
        if codes.shape[0] != n or codes.shape[2] != self.V.shape[0]:
            raise ValueError(f"codes {tuple(codes.shape)} do not fit {n} images and K={self.V.shape[0]}")
        readout = self._readout(readout, read_layer, read_vectors)
        h, w = self.grid_shape(inputs)
        group = n
        if n_steps is None and return_gradients:
            per_image = (self.max_steps + 1) * target.shape[1] * self.V.shape[1] * h * w * 4
            group = max(1, int(self.memory_budget // per_image))
        parts = []
        with _full_float32():
            for lo in range(0, n, group):
                parts.append(self._attribute_group(inputs, codes, target, readout, slice(lo, lo + group), (h, w),
                                                   ibs, n_steps, tol, return_gradients))
        return self._result(parts, n_steps is not None, tol, return_gradients)

    def _attribute_group(self, inputs, codes, target, readout, sl, shape, ibs, n_steps, tol, return_gradients):
        device = self.handle.device
        ctx = _Context(self.handle, self.layer, inputs[sl].to(device), codes[sl].float().to(device), self.V,
                       shape, target[sl], readout, ibs)
        if n_steps is None:
            return ctx.adaptive(tol, self.min_steps, self.max_steps + 1, self.refine_fraction, return_gradients)
        return ctx.fixed(n_steps, self.quadrature_rule)

    @staticmethod
    def _result(parts: list[dict], fixed: bool, tol: float, return_gradients: bool) -> GIGResult:
        """The groups' results concatenated into one :class:`GIGResult` (on the CPU)."""
        fields = {k: (torch.cat([p[k] for p in parts]).detach().cpu() if parts[0][k] is not None else None)
                  for k in parts[0]}
        g_bar = fields["g_bar"]
        attributions, diff = fields["attributions"], fields["g1"] - fields["g0"]
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
        )

    def uniform_levels(self, inputs: torch.Tensor, codes: torch.Tensor, target: torch.Tensor,
                       max_steps: int, min_steps: int = 2, **read) -> dict[int, torch.Tensor]:
        """Attributions on every nested uniform trapezoid grid ``min_steps, 2·min_steps, …,
        max_steps`` intervals, ``{intervals: (N, T, K)}``, at the cost of the finest (for studies
        of what one global step count buys)."""
        target = torch.as_tensor(target, device=self.handle.device)
        target = target[:, None] if target.dim() == 1 else target
        readout = self._readout(read.pop("readout", None), read.pop("read_layer", None), read.pop("read_vectors", None))
        ctx = _Context(self.handle, self.layer, inputs.to(self.handle.device),
                       codes.float().to(self.handle.device), self.V, self.grid_shape(inputs), target, readout,
                       self.internal_batch_size)
        return ctx.uniform_levels(min_steps, max_steps)

    @staticmethod
    def _readout(readout, read_layer, read_vectors) -> Readout:
        if readout is not None:
            if read_layer is not None or read_vectors is not None:
                raise ValueError("give either readout or read_layer/read_vectors, not both")
            return readout
        if (read_layer is None) != (read_vectors is None):
            raise ValueError("read_layer and read_vectors go together")
        return ClassLogit() if read_layer is None else ConceptReadout(read_layer, read_vectors)


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


class _Context:
    """Gradient evaluations along ``α ↦ α·X̃`` for a batch of images and their targets.

    An *item* is one (image, α) pair: one forward pass, shared by the image's targets, and one
    backward pass per target still refining. Items of several images go through one forward
    (``internal_batch_size`` at a time) with the network before the layer run once per image."""

    def __init__(self, handle, layer, inputs, codes, V, shape, target, readout, ibs):
        self.handle, self.layer, self.inputs, self.codes, self.V = handle, layer, inputs, codes, V
        self.target, self.readout, self.ibs = target, readout, ibs
        n = codes.shape[0]
        self.recon = (codes @ V).transpose(1, 2).reshape(n, -1, *shape)  # (N, C, H, W)
        self.device = inputs.device

    # ------------------------------------------------------------------ evaluations
    def evaluate(self, image: torch.Tensor, alpha: torch.Tensor, active: torch.Tensor,
                 weight_sets: list[torch.Tensor] = (), per_node: bool = False, keep_gradients: bool = False):
        """Gradients of every active target at items ``(image (M,) sorted, alpha (M,))``.

        ``active (N, T)``: which targets of each image need a backward pass. Returns a dict with
        ``values (M, T)`` (the readouts), and as asked: ``sums`` — one ``(N, T, C, H, W)`` per
        weight vector of ``weight_sets`` (``Σ_items w · gradient``); ``F (M, T, K)`` — each item's
        gradient projected on the concepts, ``Σ_p U[p,q] ⟨∇g[p], V_q⟩``; ``G (M, T, C, H, W)``."""
        m, (n, t) = image.numel(), self.target.shape
        shape = self.recon.shape[1:]
        out = {"values": torch.zeros(m, t, device=self.device)}
        out["sums"] = [torch.zeros(n, t, *shape, device=self.device) for _ in weight_sets]
        if per_node:
            out["F"] = torch.zeros(m, t, self.V.shape[0], device=self.device)
        if keep_gradients:
            out["G"] = torch.zeros(m, t, *shape, device=self.device)
        for lo in range(0, m, self.ibs):
            hi = min(lo + self.ibs, m)
            img, a = image[lo:hi], alpha[lo:hi]
            uniq, counts = torch.unique_consecutive(img, return_counts=True)
            grid = (self.recon[img] * a.to(self.recon.dtype).view(-1, 1, 1, 1))
            grid = grid.contiguous(memory_format=self.handle.memory_format).requires_grad_(True)
            res = self.handle.run_from(self.inputs[uniq], self.layer, grid, read=self.readout.layer, counts=counts)
            r = self.readout.values(res, self.target[img])  # (m_c, T)
            out["values"][lo:hi] = r.detach()
            act = active[img]  # (m_c, T)
            slots = act.any(0).nonzero().flatten().tolist()
            for j, slot in enumerate(slots):
                # One backward per target still refining; the forward is shared by all of them.
                go = torch.zeros_like(r)
                go[:, slot] = act[:, slot].to(r.dtype)
                (g,) = torch.autograd.grad(r, grid, go, retain_graph=j < len(slots) - 1)
                g = g.contiguous()
                for k, weights in enumerate(weight_sets):
                    out["sums"][k][:, slot].index_add_(0, img, g * weights[lo:hi].view(-1, 1, 1, 1))
                if per_node:
                    out["F"][lo:hi, slot] = self._project_items(img, g)
                if keep_gradients:
                    out["G"][lo:hi, slot] = g
        return out

    def _project_items(self, img: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``Σ_p U[n,p,q] ⟨g_m[p], V_q⟩`` per item ``m`` of image ``n = img[m]``: ``(M, K)``."""
        flat = g.flatten(2)  # (M, C, P)
        out = torch.empty(g.shape[0], self.V.shape[0], device=g.device)
        for n in torch.unique(img).tolist():
            rows = (img == n).nonzero().flatten()
            # (K, P) @ (m, P, C) → (m, K, C), then ⟨·, V_q⟩ over C
            out[rows] = (torch.matmul(self.codes[n].T, flat[rows].transpose(1, 2)) * self.V).sum(-1)
        return out

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``g(F(0))`` and ``g(F(X̃))`` ``(N, T)`` in one no-grad pass (2 replacements per image)."""
        with torch.no_grad():
            ends = torch.stack([torch.zeros_like(self.recon), self.recon], 1).flatten(0, 1)
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
        active = torch.ones(n, t, dtype=torch.bool, device=self.device)
        alphas, weights = quadrature(n_steps, rule)
        image, alpha = self._all_items(alphas)
        weight_sets = [weights.to(self.device).repeat(n)]
        if rule == "trapezoid":
            if n_steps % 2:
                raise ConfigError(f"the trapezoid rule needs an even n_steps for its error estimate, got {n_steps}")
            half = torch.zeros(n_steps + 1)
            half[::2] = quadrature(n_steps // 2, "trapezoid")[1]
            weight_sets.append(half.to(self.device).repeat(n))
        out = self.evaluate(image, alpha, active, weight_sets)
        g_bar = out["sums"][0]
        attributions = project(self.codes, g_bar, self.V)
        if rule == "trapezoid":
            values = out["values"].view(n, n_steps + 1, t)
            g0, g1 = values[:, 0], values[:, -1]
            coarse = project(self.codes, out["sums"][1], self.V)
            estimate = _relative_change(attributions, coarse)
        else:
            g0, g1 = self.endpoints()
            estimate = torch.full((n, t), float("nan"), device=self.device)
        evaluations = torch.full((n, t), len(alphas), device=self.device)
        return _result(attributions, g0, g1, evaluations, estimate, None, g_bar)

    def uniform_levels(self, min_steps: int, max_steps: int) -> dict[int, torch.Tensor]:
        n, t = self.target.shape
        active = torch.ones(n, t, dtype=torch.bool, device=self.device)
        alphas = quadrature(max_steps, "trapezoid")[0]
        image, alpha = self._all_items(alphas)
        F = self.evaluate(image, alpha, active, per_node=True)["F"].view(n, max_steps + 1, t, -1)
        levels, steps = {}, min_steps
        while steps <= max_steps:
            w = torch.zeros(max_steps + 1, device=self.device)
            w[:: max_steps // steps] = quadrature(steps, "trapezoid")[1].to(self.device)
            levels[steps] = torch.einsum("s,nstk->ntk", w, F).cpu()
            steps *= 2
        return levels

    # ------------------------------------------------------------------ error control
    def adaptive(self, tol: float, min_cells: int, max_nodes: int, fraction: float, keep_gradients: bool) -> dict:
        """Per image, one set of cells ``[a, b]`` with their midpoints ``m`` (the trapezoid rule on
        ``[a, m]`` and ``[m, b]``), shared by the image's targets; cells are bisected where the
        attribution vectors change most, until each target's estimate meets the tolerance.

        Starts from ``min_cells`` equal cells. Per round, per image: ``d_c = T2_c − T1_c`` per cell
        (the two-interval minus the one-interval trapezoid, a vector over the concepts per
        target), the estimate ``max(‖Σ_c d_c‖, (Σ_c ‖d_c‖²)^½) / ‖Σ_c T2_c‖`` per target, and the cells holding the
        first ``fraction`` of ``Σ_t ‖d_{c,t}‖² / ‖A_t‖²`` over targets still refining are bisected
        (two new evaluations each). A target stops once its estimate is within ``tol`` and its
        completeness residual within ``tol / 2``, or when the image has ``max_nodes`` evaluations.
        """
        n, t = self.target.shape
        dev = self.device
        active = torch.ones(n, t, dtype=torch.bool, device=dev)
        start = torch.linspace(0, 1, 2 * min_cells + 1, dtype=torch.float64)
        image, alpha = self._all_items(start)
        first = self.evaluate(image, alpha.float(), active, per_node=True, keep_gradients=keep_gradients)
        per = len(start)
        nodes = [start.to(dev).clone() for _ in range(n)]  # α of every evaluated item, per image
        F = list(first["F"].view(n, per, t, -1))
        # Gradients of every evaluation, kept in per-round pieces (no growing copies) until the end.
        G = [[g] for g in first["G"].view(n, per, t, *self.recon.shape[1:])] if keep_gradients else None
        values = first["values"].view(n, per, t)
        g0, g1 = values[:, 0], values[:, -1]
        diff_abs = (g1 - g0).abs()
        j = torch.arange(min_cells, device=dev)
        cells = [torch.stack([2 * j, 2 * j + 1, 2 * j + 2], 1) for _ in range(n)]
        result = {"attributions": torch.zeros(n, t, self.V.shape[0], device=dev),
                  "estimate": torch.full((n, t), float("inf"), device=dev),
                  "evaluations": torch.zeros(n, t, device=dev),
                  "converged": torch.zeros(n, t, dtype=torch.bool, device=dev),
                  "g_bar": torch.zeros(n, t, *self.recon.shape[1:], device=dev) if keep_gradients else None}
        while bool(active.any()):
            new_image, new_alpha, splits = [], [], {}
            for i in active.any(1).nonzero().flatten().tolist():
                A, est, score = _cell_state(nodes[i], F[i], cells[i])
                residual = (A.sum(-1) - (g1[i] - g0[i])).abs()
                done = (est <= tol) & (residual <= 0.5 * tol * diff_abs[i])
                room = (max_nodes - len(nodes[i])) // 2
                finish = active[i] & (done | (room < 1))
                if bool(finish.any()):
                    self._finish(result, i, finish, A, est, done, len(nodes[i]), nodes[i], cells[i], G)
                    active[i] &= ~finish
                if not bool(active[i].any()):
                    continue
                chosen = _choose_cells(score[:, active[i]], nodes[i], cells[i], fraction, room)
                a, m, b = (nodes[i][cells[i][chosen, k]] for k in range(3))
                new_image.append(torch.full((2 * len(chosen),), i, device=dev))
                new_alpha.append(torch.stack([(a + m) / 2, (m + b) / 2], 1).flatten())
                splits[i] = chosen
            if not splits:
                break
            image, alpha = torch.cat(new_image), torch.cat(new_alpha)
            out = self.evaluate(image, alpha.float(), active, per_node=True, keep_gradients=keep_gradients)
            for i, chosen in splits.items():
                rows = (image == i).nonzero().flatten()
                first_new = len(nodes[i])
                nodes[i] = torch.cat([nodes[i], alpha[rows]])
                F[i] = torch.cat([F[i], out["F"][rows]])
                if keep_gradients:
                    G[i].append(out["G"][rows])
                left = first_new + 2 * torch.arange(len(chosen), device=dev)
                parent = cells[i][chosen]
                children = torch.cat([torch.stack([parent[:, 0], left, parent[:, 1]], 1),
                                      torch.stack([parent[:, 1], left + 1, parent[:, 2]], 1)])
                keep = torch.ones(len(cells[i]), dtype=torch.bool, device=dev)
                keep[chosen] = False
                cells[i] = torch.cat([cells[i][keep], children])
        result["g0"], result["g1"] = g0, g1
        return result

    def _finish(self, result, i, finish, A, est, done, n_nodes, alphas, cells, G) -> None:
        """Record the attributions of image ``i``'s targets in ``finish (T,)``."""
        result["attributions"][i, finish] = A[finish]
        result["estimate"][i, finish] = est[finish].float()
        result["evaluations"][i, finish] = n_nodes
        result["converged"][i, finish] = done[finish]
        if G is not None:
            w = _node_weights(alphas, cells)  # (nodes,), in the order the pieces were evaluated
            total, start = 0, 0
            for piece in G[i]:
                total = total + torch.einsum("s,stchw->tchw", w[start : start + len(piece)], piece[:, finish])
                start += len(piece)
            result["g_bar"][i, finish] = total


def _cell_state(alphas: torch.Tensor, F: torch.Tensor, cells: torch.Tensor):
    """Attributions ``A (T, K)``, error estimates ``(T,)`` and per-cell scores ``(cells, T)``."""
    Fa, Fm, Fb = F[cells[:, 0]], F[cells[:, 1]], F[cells[:, 2]]  # (cells, T, K)
    h = (alphas[cells[:, 2]] - alphas[cells[:, 0]]).to(F.dtype)[:, None, None]
    two = h / 4 * (Fa + 2 * Fm + Fb)
    d = two - h / 2 * (Fa + Fb)
    A = two.sum(0)
    norm2 = (A * A).sum(-1).clamp_min(1e-30)  # (T,)
    local = (d * d).sum(-1)  # (cells, T)
    # The change against every cell one level coarser; cells' errors can cancel in that sum by
    # chance, so it is taken at least as large as their root sum of squares.
    change = torch.maximum(d.sum(0).norm(dim=-1), local.sum(0).sqrt())
    return A, change / norm2.sqrt(), local / norm2


def _choose_cells(score: torch.Tensor, alphas: torch.Tensor, cells: torch.Tensor, fraction: float,
                  room: int) -> torch.Tensor:
    """The cells holding the first ``fraction`` of the summed score (at least one, at most
    ``room``), skipping cells too narrow to bisect in float64."""
    total = score.sum(1)
    width = alphas[cells[:, 2]] - alphas[cells[:, 0]]
    total = torch.where(width > 1e-9, total, torch.full_like(total, -1.0))
    order = torch.argsort(total, descending=True)
    cumulative = total[order].clamp_min(0).cumsum(0)
    count = int((cumulative < fraction * cumulative[-1]).sum()) + 1
    return order[: max(1, min(count, room))]


def _node_weights(alphas: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Weights of every node in the composite two-interval trapezoid rule over ``cells``."""
    h = alphas[cells[:, 2]] - alphas[cells[:, 0]]
    w = torch.zeros_like(alphas)
    w.index_add_(0, cells[:, 0], h / 4)
    w.index_add_(0, cells[:, 1], h / 2)
    w.index_add_(0, cells[:, 2], h / 4)
    return w.float()


def _relative_change(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """``‖fine − coarse‖₂ / ‖fine‖₂`` over the last axis."""
    return (fine - coarse).norm(dim=-1) / fine.norm(dim=-1).clamp_min(1e-30)


def _result(attributions, g0, g1, evaluations, estimate, converged, g_bar) -> dict:
    return {"attributions": attributions, "g0": g0, "g1": g1, "evaluations": evaluations,
            "estimate": estimate, "converged": converged, "g_bar": g_bar}


def gig_maps(codes: torch.Tensor, integrated_gradients: torch.Tensor, dictionary: torch.Tensor,
             concepts: torch.Tensor) -> torch.Tensor:
    """Spatial GIG maps: where each chosen concept drives each target.

    ``codes (N, P, K)``, ``integrated_gradients (N, T, P, C)``, ``dictionary (K, C)``,
    ``concepts (N, J)`` → ``(N, T, J, P)`` with ``map[n,t,j,p] = U[n,p,q] ⟨Ḡ[n,t,p], V_q⟩``,
    ``q = concepts[n, j]``; summing over ``p`` gives the concept's GIG.
    """
    u = codes.gather(2, concepts[:, None, :].expand(-1, codes.shape[1], -1))  # (N, P, J)
    v = dictionary[concepts]  # (N, J, C)
    proj = torch.einsum("ntpc,njc->ntjp", integrated_gradients, v)
    return proj * u.transpose(1, 2)[:, None]


# ---------------------------------------------------------------------------- the stage
def _safe(d: torch.Tensor) -> torch.Tensor:
    """``d`` with values too close to 0 replaced by 1e-8 (keeps the sign of real changes)."""
    return torch.where(d.abs() < 1e-8, torch.full_like(d, 1e-8), d)


def gig_for(handle: ModelHandle, layer: str, dictionary: torch.Tensor, config) -> GIG:
    """The GIG of ``layer`` with a run configuration's step settings."""
    return GIG(handle, layer, dictionary, n_steps=config.n_steps, quadrature_rule=config.quadrature,
               internal_batch_size=config.internal_batch_size, tol=config.gig_tol,
               max_steps=config.gig_max_steps)


def attribute(store, handle: ModelHandle, source, progress: bool = True, ranks=None) -> None:
    """Stage 5 into ``store/attribute``: the per-image top-down GIG walk.

    Per image: concept → class GIG at the last layer; its ``top_k`` concepts become the targets of
    concept → concept GIG from the layer below, whose concepts are scored by the share of each
    target they explain, weighted by the target's own importance; and so on down. Saved per
    image and layer: the full score vector, the top concepts, their GIG maps, every GIG row with
    its output difference and completeness residual. Under torchrun each rank walks its share of
    the shards (:mod:`gig.distributed`) and rank 0 writes the summary.
    """

    from .collect import SHARD_IMAGES, iter_image_batches, load_images
    from .concepts import load_dictionary
    from .decompose import CodeReader
    from .distributed import Ranks, ShardLoop, sharded_stage
    from .store import save_tensors

    ranks = ranks or Ranks()

    store.require("decompose")
    config = store.config
    layers = config.layers  # forward order, checked by the pipeline
    used = load_images(store)["images"]
    by_id = {r.image_id: r for r in source.records}
    records = [by_id[i["image_id"]] for i in used]
    target_of = {i["image_id"]: i["target"] for i in used}
    with sharded_stage(store, "attribute", ranks) as summary:
        readers = {layer: CodeReader(store, layer) for layer in layers}
        fast = handle.for_gradients(layers)
        summary["engine"] = {"folded_batchnorms": fast.folded_batchnorms,
                             "channels_last": fast.memory_format == torch.channels_last}
        gigs = {layer: gig_for(fast, layer, load_dictionary(store, layer), config) for layer in layers}
        loop = ShardLoop(store, "attribute", ranks, records, SHARD_IMAGES, progress)
        for name, shard in loop:
            parts: list[dict[str, torch.Tensor]] = []
            for batch in iter_image_batches(source, shard, handle, config.batch_size, config.loader_workers):
                ids = [r.image_id for r in batch.records]
                parts.append(walk(batch.pixels, ids, [target_of[i] for i in ids], layers, readers, gigs, config.top_k))
                loop.bar.update(len(ids))
            tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            save_tensors(store.shard_path("attribute", name), tensors)
            store.mark_shard("attribute", name, {"n_images": int(tensors["image_id"].numel())})
        if not ranks.is_main:
            return
        data = load_attributions(store, SUMMARY_FIELDS)  # not the maps: memory flat in the images
        parts = completeness_residuals(store, by_layer=True, data=data)
        summary["completeness"] = _residual_stats(torch.cat(list(parts.values())))
        summary["completeness_by_source"] = {name: _residual_stats(r) for name, r in parts.items()}
        summary["accuracy"] = accuracy_summary(store, data)


def walk(pixels: torch.Tensor, ids: list[int], class_targets: list[int], layers: list[str], readers: dict, gigs: dict,
         top_k: int) -> dict[str, torch.Tensor]:
    """One batch of images, top layer down.

    Importances are fractions of the image's class-logit change ``Δz``: at the top layer
    ``I[q] = GIG_class[q] / Δz``; one layer down, the part of each upper target's importance
    that flows through lower concept ``q``, ``I[q] = Σ_t I[t] · GIG_t[q] / Δg_t`` over the
    upper layer's top-``k`` targets ``t`` (``Δg_t``: the change of ``t``'s readout). These flows
    are the graph's edge weights (:func:`gig.graph.edge_weights`), so they compose along paths.
    """
    out: dict[str, torch.Tensor] = {"image_id": torch.tensor(ids, dtype=torch.int64)}
    top_layer = layers[-1]
    codes = torch.stack([readers[top_layer].codes(i) for i in ids])
    res = gigs[top_layer].attribute(pixels, codes, torch.tensor(class_targets), return_gradients=True)
    out[f"{top_layer}/class_gig"] = res.attributions[:, 0]
    out[f"{top_layer}/class_delta"] = res.output_diff[:, 0]
    out[f"{top_layer}/class_residual"] = res.residual[:, 0]
    out[f"{top_layer}/class_steps"] = res.n_evaluations[:, 0]
    out[f"{top_layer}/class_error"] = res.error_estimate[:, 0]
    out[f"{top_layer}/class_converged"] = _converged(res)[:, 0]
    score = res.attributions[:, 0] / _safe(res.output_diff[:, 0:1])  # share of the logit change
    upper_importance = torch.ones(len(ids), 1)  # the class node carries the whole change
    upper_delta = res.output_diff
    for position in range(len(layers) - 1, -1, -1):
        layer = layers[position]
        k = min(top_k, score.shape[1])
        top = score.topk(k, dim=1)
        out[f"{layer}/score"] = score
        out[f"{layer}/top"] = top.indices
        out[f"{layer}/importance"] = top.values
        h, w = gigs[layer].grid_shape(pixels)
        maps = gig_maps(codes, res.integrated_gradients, gigs[layer].V.cpu(), top.indices)  # (N, T, k, P)
        weight = (upper_importance / _safe(upper_delta))[:, :, None, None]
        out[f"{layer}/maps"] = (maps * weight).sum(1).reshape(len(ids), k, h, w)
        if position == 0:
            break
        lower = layers[position - 1]
        codes = torch.stack([readers[lower].codes(i) for i in ids])
        res = gigs[lower].attribute(pixels, codes, top.indices, read_layer=layer,
                                    read_vectors=gigs[layer].V, return_gradients=True)
        out[f"{lower}/targets"] = top.indices
        out[f"{lower}/gig"] = res.attributions  # (N, k, K_lower)
        out[f"{lower}/delta"] = res.output_diff
        out[f"{lower}/residual"] = res.residual
        out[f"{lower}/steps"] = res.n_evaluations
        out[f"{lower}/error"] = res.error_estimate
        out[f"{lower}/converged"] = _converged(res)
        upper_importance = top.values
        upper_delta = res.output_diff
        share = res.attributions / _safe(res.output_diff[..., None])
        score = (upper_importance[..., None] * share).sum(1)
    return out


def _converged(res: GIGResult) -> torch.Tensor:
    """``(N, T)`` uint8: both stopping criteria met (all 0 on a fixed grid)."""
    if res.converged is None:
        return torch.zeros_like(res.n_evaluations, dtype=torch.uint8)
    return res.converged.to(torch.uint8)


#: The per-image records of an attribution's path (no maps, no GIG vectors): what the summaries read.
SUMMARY_FIELDS = ("class_residual", "class_delta", "residual", "delta", "class_steps", "class_error",
                  "class_converged", "steps", "error", "converged")


def iter_attributions(store, fields: Collection[str] | None = None,
                      image_ids: Collection[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The attribute shards one at a time, in order: keys as in :func:`walk`, first axis = that
    shard's images. ``fields`` keeps only the keys ``LAYER/FIELD`` with those FIELDs (and
    ``image_id``); ``image_ids`` only those images' rows. Only what is kept is read from disk, so
    memory holds one shard's selection, never the run's."""
    paths = sorted((store.root / "attribute" / "shards").glob("*.safetensors"))
    if not paths:
        raise RunMismatchError(f"no attribution shards in {store.root / 'attribute'}: run `gig attribute` first")
    wanted = None if image_ids is None else torch.tensor(sorted({int(i) for i in image_ids}), dtype=torch.long)
    for path in paths:
        with safe_open(str(path), framework="pt") as shard:
            ids = shard.get_tensor("image_id")
            rows = None if wanted is None else torch.isin(ids, wanted).nonzero().flatten()
            if rows is not None and rows.numel() == 0:
                continue
            keys = [k for k in shard.keys()
                    if k == "image_id" or fields is None or k.rsplit("/", 1)[-1] in fields]
            part = {}
            for key in keys:
                if rows is None:
                    part[key] = shard.get_tensor(key)
                else:  # read the rows' span only, then keep the rows
                    first, last = int(rows[0]), int(rows[-1]) + 1
                    part[key] = shard.get_slice(key)[first:last][rows - first]
            yield part


def load_attributions(store, fields: Collection[str] | None = None,
                      image_ids: Collection[int] | None = None) -> dict[str, torch.Tensor]:
    """The attribute shards concatenated (see :func:`iter_attributions` for ``fields`` and
    ``image_ids``): keys as in :func:`walk`, first axis = images."""
    parts = list(iter_attributions(store, fields, image_ids))
    if not parts:
        raise RunMismatchError(f"none of the images {sorted(image_ids or [])[:10]} has attributions in {store.root}")
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _residual_stats(residuals: torch.Tensor) -> dict[str, float]:
    return {"median": float(residuals.median()), "p95": float(residuals.quantile(0.95)),
            "max": float(residuals.max()), "n": int(residuals.numel())}


def completeness_residuals(store, by_layer: bool = False, data: dict[str, torch.Tensor] | None = None):
    """Relative completeness residuals ``|Σ GIG − Δg| / |Δg|`` of every recorded attribution.

    One tensor, or with ``by_layer`` a dict keyed ``"LAYER->class"`` / ``"LOWER->UPPER"``.
    """
    data = load_attributions(store, SUMMARY_FIELDS) if data is None else data
    layers = store.config.layers
    top = layers[-1]
    parts = {f"{top}->class": data[f"{top}/class_residual"].abs() / data[f"{top}/class_delta"].abs().clamp_min(1e-8)}
    for lower, upper in zip(layers[:-1], layers[1:]):
        parts[f"{lower}->{upper}"] = (data[f"{lower}/residual"].abs()
                                      / data[f"{lower}/delta"].abs().clamp_min(1e-8)).flatten()
    return parts if by_layer else torch.cat(list(parts.values()))


def _path_keys(layers: list[str]) -> dict[str, tuple[str, str, str]]:
    """``{"LAYER->class" | "LOWER->UPPER": (steps, error, converged keys)}`` of the stored attributions."""
    top = layers[-1]
    keys = {f"{top}->class": (f"{top}/class_steps", f"{top}/class_error", f"{top}/class_converged")}
    for lower, upper in zip(layers[:-1], layers[1:]):
        keys[f"{lower}->{upper}"] = (f"{lower}/steps", f"{lower}/error", f"{lower}/converged")
    return keys


def load_error_estimates(store, data: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Every stored attribution's relative error estimate, flat (NaN-free; empty for runs made
    before error control or on a fixed grid without an estimate)."""
    data = load_attributions(store, SUMMARY_FIELDS) if data is None else data
    parts = [data[keys[1]].flatten() for keys in _path_keys(store.config.layers).values() if keys[1] in data]
    flat = torch.cat(parts) if parts else torch.zeros(0)
    return flat[~flat.isnan()]


def accuracy_summary(store, data: dict[str, torch.Tensor] | None = None) -> dict:
    """Per path kind: gradient evaluations (mean, median, max, total), the error estimate
    (median, p95, max) and the share of attributions that did not converge (estimate above the
    tolerance, or completeness residual above half of it, at the step cap) of every stored
    attribution."""
    data = load_attributions(store, SUMMARY_FIELDS) if data is None else data
    config = store.config
    tol = None if config.n_steps else config.gig_tol
    out: dict = {"tol": tol, "by_source": {}}
    every: list[tuple[torch.Tensor, ...]] = []
    for name, (steps_key, error_key, done_key) in _path_keys(config.layers).items():
        if steps_key not in data:  # a run attributed before error control: nothing recorded
            continue
        columns = (data[steps_key].flatten().double(), data[error_key].flatten().double(),
                   data[done_key].flatten().bool() if done_key in data else None)
        every.append(columns)
        out["by_source"][name] = _accuracy_stats(*columns, tol)
    if every:
        done = None if any(c[2] is None for c in every) else torch.cat([c[2] for c in every])
        out.update(_accuracy_stats(torch.cat([c[0] for c in every]), torch.cat([c[1] for c in every]), done, tol))
    return out


def _accuracy_stats(steps: torch.Tensor, error: torch.Tensor, converged: torch.Tensor | None,
                    tol: float | None) -> dict:
    stats = {"n": int(steps.numel()), "evaluations_total": int(steps.sum()),
             "evaluations_mean": float(steps.mean()), "evaluations_median": float(steps.median()),
             "evaluations_max": int(steps.max())}
    known = error[~error.isnan()]
    if known.numel():
        stats.update({"error_median": float(known.median()), "error_p95": float(known.quantile(0.95)),
                      "error_max": float(known.max())})
        if tol is not None:
            flags = ~converged if converged is not None else (error > tol)
            stats["unconverged"] = float(flags.double().mean())
    return stats
