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

**Error control (the default).** The integrand is not smooth (ReLU6 clipping, the max readout),
so high-order rules gain nothing and uniform grids converge like ``1/N``; paths also differ
widely in difficulty. Each (image, target) therefore gets its own number of steps: the
composite trapezoid rule on ``N = min_steps, 2·min_steps, …`` intervals, whose finer grid reuses
every evaluation of the coarser one, stopped once

    ``‖GIG_N − GIG_{N/2}‖₂ / ‖GIG_N‖₂ ≤ tol``   and   ``|Σ_q GIG_N[q] − Δg| ≤ (tol/2)·|Δg|``

or at ``max_steps`` (recorded as unconverged). The first quantity is the error estimate stored
with every attribution; for an integrand whose error falls like ``1/N`` it equals the true
error of ``GIG_N``, and it overstates it for smoother ones. The targets of one path (the top
concepts of the layer above) share its forward passes: one forward per step for all of them,
one backward per target still refining.

With ``n_steps`` set, a fixed grid is used instead (``gauss-legendre``, ``riemann-midpoint`` or
``trapezoid``); only the trapezoid rule has a nested half grid and so an error estimate (NaN for
the others).

Images, steps and targets are batched together (``internal_batch_size`` items per forward);
the network before ``a`` runs once per image (see ``ModelHandle.run_from``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .hooks import ModelHandle
from .readouts import ClassLogit, ConceptReadout, Readout, concept_readout, concept_readouts  # noqa: F401

RULES = ("gauss-legendre", "riemann-midpoint", "trapezoid")


def quadrature(n_steps: int, rule: str = "riemann-midpoint") -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``α (S,)`` in [0, 1] and weights ``w (S,)`` summing to 1.

    ``trapezoid`` takes ``n_steps`` intervals, hence ``n_steps + 1`` nodes including both ends;
    the other rules take ``n_steps`` nodes inside (0, 1).
    """
    if not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
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
    raise ValueError(f"unknown quadrature {rule!r}: use one of {', '.join(RULES)}")


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
                 max_steps: int = 512, min_steps: int = 8):
        if quadrature_rule not in RULES:
            raise ValueError(f"unknown quadrature {quadrature_rule!r}: use one of {', '.join(RULES)}")
        if not 0 < tol < 1:
            raise ValueError(f"tol must be in (0, 1), got {tol!r}")
        if min_steps < 2 or max_steps < 2 * min_steps:
            raise ValueError(f"need 2 <= min_steps and 2·min_steps <= max_steps, got {min_steps}, {max_steps}")
        self.handle = handle
        self.layer = layer
        self.V = dictionary.float().to(handle.device)
        self.n_steps = n_steps
        self.quadrature_rule = quadrature_rule
        self.internal_batch_size = internal_batch_size
        self.tol = tol
        self.max_steps = max_steps
        self.min_steps = min_steps
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
        device = self.handle.device
        ibs = internal_batch_size or self.internal_batch_size
        n_steps = n_steps or self.n_steps
        tol = self.tol if tol is None else tol
        inputs = inputs.to(device)
        target = torch.as_tensor(target, device=device)
        if target.dim() == 1:
            target = target[:, None]
        n = target.shape[0]
        if codes.shape[0] != n or codes.shape[2] != self.V.shape[0]:
            raise ValueError(f"codes {tuple(codes.shape)} do not fit {n} images and K={self.V.shape[0]}")
        readout = self._readout(readout, read_layer, read_vectors)
        h, w = self.grid_shape(inputs)
        codes = codes.float().to(device)
        recon = (codes @ self.V).transpose(1, 2).reshape(n, -1, h, w)  # (N, C, H, W)
        path = _Path(self.handle, self.layer, inputs, recon, target, readout, ibs)
        converged = None
        if n_steps is None:
            sums, n_int, est, g0, g1, converged = path.refine(codes, self.V, self.min_steps, self.max_steps, tol)
            g_bar, evals, converged = sums / n_int[..., None, None, None], n_int + 1, converged.cpu()
        elif self.quadrature_rule == "trapezoid":
            if n_steps % 2:
                raise ValueError(f"the trapezoid rule needs an even n_steps for its error estimate, got {n_steps}")
            sums, n_int, est, g0, g1, _ = path.refine(codes, self.V, n_steps // 2, n_steps, 0.0)
            g_bar, evals, tol = sums / n_steps, n_int + 1, None
        else:
            alphas, weights = quadrature(n_steps, self.quadrature_rule)
            g_bar = path.integrate(alphas.to(device), weights.to(device))
            g0, g1 = path.endpoints()
            evals = torch.full(target.shape, n_steps, device=device)
            est, tol = torch.full(target.shape, float("nan"), device=device), None
        attributions = project(codes, g_bar, self.V)
        diff = g1 - g0
        return GIGResult(
            attributions=attributions.detach().cpu(),
            output_diff=diff.detach().cpu(),
            residual=(attributions.sum(-1) - diff).detach().cpu(),
            target_value=g1.detach().cpu(),
            n_evaluations=evals.long().cpu(),
            error_estimate=est.detach().float().cpu(),
            integrated_gradients=g_bar.flatten(3).transpose(2, 3).detach().cpu() if return_gradients else None,
            tol=tol,
            converged=converged,
        )

    def uniform_levels(self, inputs: torch.Tensor, codes: torch.Tensor, target: torch.Tensor,
                       max_steps: int, min_steps: int = 2, **read) -> dict[int, torch.Tensor]:
        """Attributions on every nested uniform trapezoid grid ``min_steps, 2·min_steps, …,
        max_steps`` intervals, ``{intervals: (N, T, K)}``, at the cost of the finest (for studies
        of what one global step count buys)."""
        target = torch.as_tensor(target, device=self.handle.device)
        target = target[:, None] if target.dim() == 1 else target
        readout = self._readout(read.pop("readout", None), read.pop("read_layer", None), read.pop("read_vectors", None))
        h, w = self.grid_shape(inputs)
        codes = codes.float().to(self.handle.device)
        recon = (codes @ self.V).transpose(1, 2).reshape(codes.shape[0], -1, h, w)
        path = _Path(self.handle, self.layer, inputs.to(self.handle.device), recon, target, readout,
                     self.internal_batch_size)
        levels: dict[int, torch.Tensor] = {}
        path.refine(codes, self.V, min_steps, max_steps, 0.0, levels)
        return levels

    @staticmethod
    def _readout(readout, read_layer, read_vectors) -> Readout:
        if readout is not None:
            if read_layer is not None or read_vectors is not None:
                raise ValueError("give either readout or read_layer/read_vectors, not both")
            return readout
        if (read_layer is None) != (read_vectors is None):
            raise ValueError("read_layer and read_vectors go together")
        return ClassLogit() if read_layer is None else ConceptReadout(read_layer, read_vectors)


def project(codes: torch.Tensor, g_bar: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``GIG[n,t,q] = Σ_p U[n,p,q] ⟨Ḡ[n,t,p], V_q⟩`` for ``codes (N, P, K)``, ``g_bar (N, T, C, H, W)``,
    ``V (K, C)`` → ``(N, T, K)``, without materialising ``(N, T, P, K)``."""
    g = g_bar.flatten(3)  # (N, T, C, P)
    return (torch.einsum("npk,ntcp->ntkc", codes, g) * V).sum(-1)


class _Path:
    """Gradient evaluations along ``α ↦ α·X̃`` for a batch of images and their targets."""

    def __init__(self, handle, layer, inputs, recon, target, readout, ibs):
        self.handle, self.layer, self.inputs, self.recon = handle, layer, inputs, recon
        self.target, self.readout, self.ibs = target, readout, ibs

    def gradients(self, images: torch.Tensor, alphas: torch.Tensor, weights: torch.Tensor,
                  active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Σ_s w_s ∇g_t(α_s X̃_n)`` for the ``images`` (indices) and targets ``active (n, T)``,
        shape ``(n, T, C, H, W)`` (zero where inactive), and readouts ``(n, S, T)`` at every α."""
        n_sel, t = len(images), self.target.shape[1]
        sums = torch.zeros(n_sel, t, *self.recon.shape[1:], device=self.recon.device)
        values = torch.zeros(n_sel, len(alphas), t, device=self.recon.device)
        for pos, lo, hi in _chunks(n_sel, len(alphas), self.ibs):
            idx = images[pos]
            e = hi - lo
            scale = alphas[lo:hi].repeat(len(pos)).view(-1, 1, 1, 1)
            grid = (self.recon[idx].repeat_interleave(e, 0) * scale)
            grid = grid.contiguous(memory_format=self.handle.memory_format).requires_grad_(True)
            out = self.handle.run_from(self.inputs[idx], self.layer, grid, read=self.readout.layer)
            r = self.readout.values(out, self.target[idx].repeat_interleave(e, 0))  # (M, T)
            values[pos, lo:hi] = r.detach().view(len(pos), e, t)
            act = active[pos]  # (n_c, T)
            slots = act.any(0).nonzero().flatten().tolist()
            row_weight = weights[lo:hi].repeat(len(pos))  # (M,)
            for j, slot in enumerate(slots):
                # One backward per target still refining; the forward is shared by all of them.
                go = torch.zeros_like(r)
                go[:, slot] = row_weight * act[:, slot].repeat_interleave(e).to(r.dtype)
                (g,) = torch.autograd.grad(r, grid, go, retain_graph=j < len(slots) - 1)
                sums[pos, slot] += g.view(len(pos), e, *g.shape[1:]).sum(1)
        return sums, values

    def integrate(self, alphas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Fixed grid: ``Ḡ (N, T, C, H, W)``."""
        n = self.target.shape[0]
        active = torch.ones_like(self.target, dtype=torch.bool)
        sums, _ = self.gradients(torch.arange(n, device=self.recon.device), alphas, weights, active)
        return sums

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``g(F(0))`` and ``g(F(X̃))`` ``(N, T)`` in one no-grad pass (2 replacements per image)."""
        with torch.no_grad():
            ends = torch.stack([torch.zeros_like(self.recon), self.recon], 1).flatten(0, 1)
            out = self.handle.run_from(self.inputs, self.layer, ends, read=self.readout.layer)
            vals = self.readout.values(out, self.target.repeat_interleave(2, 0))
        vals = vals.view(-1, 2, self.target.shape[1])
        return vals[:, 0], vals[:, 1]

    def refine(self, codes, V, min_steps: int, max_steps: int, tol: float, levels: dict | None = None):
        """Nested trapezoid grids, doubled per (image, target) until converged or ``max_steps``.

        Returns ``sums (N, T, C, H, W)`` with ``Ḡ = sums / n_intervals``, ``n_intervals (N, T)``,
        the error estimate ``(N, T)``, ``g(F(0))``, ``g(F(X̃))`` ``(N, T)`` and whether each
        attribution met both criteria ``(N, T)``. With ``levels``
        (a dict) and ``tol = 0`` it also receives ``{intervals: attributions (N, T, K)}`` of every
        level, the uniform grids of a step-count study.
        """
        device = self.recon.device
        n, t = self.target.shape
        everyone = torch.arange(n, device=device)
        active = torch.ones(n, t, dtype=torch.bool, device=device)
        alphas, weights = quadrature(min_steps, "trapezoid")
        # Trapezoid sums are kept unnormalised (ends ½, interior 1) so that refining only adds.
        sums, values = self.gradients(everyone, alphas.to(device), weights.to(device) * min_steps, active)
        g0, g1 = values[:, 0], values[:, -1]
        diff_abs = (g1 - g0).abs()
        n_int = torch.full((n, t), min_steps, device=device)
        previous = project(codes, sums / min_steps, V)
        if levels is not None:
            levels[min_steps] = previous.detach().cpu().clone()
        estimate = torch.full((n, t), float("inf"), device=device)
        steps = min_steps
        while steps < max_steps and bool(active.any()):
            images = active.any(1).nonzero().flatten()
            mids = (torch.arange(steps, device=device, dtype=torch.float64) + 0.5) / steps
            new, _ = self.gradients(images, mids.float(), torch.ones(steps, device=device), active[images])
            sums[images] += new
            steps *= 2
            n_int[active] = steps
            current = project(codes[images], sums[images] / n_int[images][..., None, None, None], V)
            change = (current - previous[images]).norm(dim=-1) / current.norm(dim=-1).clamp_min(1e-12)
            residual = (current.sum(-1) - (g1 - g0)[images]).abs()
            sub_active = active[images]
            estimate[images] = torch.where(sub_active, change, estimate[images])
            previous[images] = torch.where(sub_active[..., None], current, previous[images])
            if levels is not None:
                levels[steps] = current.detach().cpu().clone()
            done = (change <= tol) & (residual <= 0.5 * tol * diff_abs[images])
            active[images] = sub_active & ~done
        return sums, n_int, estimate, g0, g1, ~active


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


def _chunks(n_images: int, per_image: int, batch: int):
    """Yield ``(image positions, lo, hi)``: whole images while they fit, else slices of one image."""
    if per_image <= batch:
        step = max(1, batch // per_image)
        for start in range(0, n_images, step):
            yield list(range(start, min(start + step, n_images))), 0, per_image
    else:
        for i in range(n_images):
            for lo in range(0, per_image, batch):
                yield [i], lo, min(lo + batch, per_image)


# ---------------------------------------------------------------------------- the stage
def _safe(d: torch.Tensor) -> torch.Tensor:
    """``d`` with values too close to 0 replaced by 1e-8 (keeps the sign of real changes)."""
    return torch.where(d.abs() < 1e-8, torch.full_like(d, 1e-8), d)


def gig_for(handle: ModelHandle, layer: str, dictionary: torch.Tensor, config) -> GIG:
    """The GIG of ``layer`` with a run configuration's step settings."""
    return GIG(handle, layer, dictionary, n_steps=config.n_steps, quadrature_rule=config.quadrature,
               internal_batch_size=config.internal_batch_size, tol=config.gig_tol,
               max_steps=config.gig_max_steps)


def attribute(store, handle: ModelHandle, source, progress: bool = True) -> None:
    """Stage 5 into ``store/attribute``: the per-image top-down GIG walk.

    Per image: concept → class GIG at the last layer; its ``top_k`` concepts become the targets of
    concept → concept GIG from the layer below, whose concepts are scored by the share of each
    target they explain, weighted by the target's own importance; and so on down. Saved per
    image and layer: the full score vector, the top concepts, their GIG maps, every GIG row with
    its output difference and completeness residual.
    """
    from tqdm.auto import tqdm

    from .collect import SHARD_IMAGES, iter_image_batches, load_images
    from .concepts import load_dictionary
    from .decompose import CodeReader
    from .store import save_tensors

    store.require("decompose")
    config = store.config
    layers = config.layers  # forward order, checked by the pipeline
    used = load_images(store)["images"]
    by_id = {r.image_id: r for r in source.records}
    records = [by_id[i["image_id"]] for i in used]
    target_of = {i["image_id"]: i["target"] for i in used}
    with store.stage("attribute") as summary:
        readers = {layer: CodeReader(store, layer) for layer in layers}
        fast = handle.for_gradients(layers)
        summary["engine"] = {"folded_batchnorms": fast.folded_batchnorms,
                             "channels_last": fast.memory_format == torch.channels_last}
        gigs = {layer: gig_for(fast, layer, load_dictionary(store, layer), config) for layer in layers}
        shards = [records[i : i + SHARD_IMAGES] for i in range(0, len(records), SHARD_IMAGES)]
        bar = tqdm(total=len(records), desc="attribute", unit="img", disable=not progress)
        for index, shard in enumerate(shards):
            name = f"{index:05d}"
            if not store.shard_done("attribute", name):
                parts: list[dict[str, torch.Tensor]] = []
                for batch in iter_image_batches(source, shard, handle, config.batch_size):
                    ids = [r.image_id for r in batch.records]
                    parts.append(_walk(batch.pixels, ids, [target_of[i] for i in ids], layers, readers, gigs, config.top_k))
                    bar.update(len(ids))
                tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
                save_tensors(store.shard_path("attribute", name), tensors)
                store.mark_shard("attribute", name, {"n_images": int(tensors["image_id"].numel())})
            else:
                bar.update(len(shard))
        bar.close()
        data = load_attributions(store)
        parts = completeness_residuals(store, by_layer=True, data=data)
        summary["completeness"] = _residual_stats(torch.cat(list(parts.values())))
        summary["completeness_by_source"] = {name: _residual_stats(r) for name, r in parts.items()}
        summary["accuracy"] = accuracy_summary(store, data)


def _walk(pixels, ids, class_targets, layers, readers, gigs, top_k) -> dict[str, torch.Tensor]:
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
        upper_importance = top.values
        upper_delta = res.output_diff
        share = res.attributions / _safe(res.output_diff[..., None])
        score = (upper_importance[..., None] * share).sum(1)
    return out


def load_attributions(store) -> dict[str, torch.Tensor]:
    """All attribute shards concatenated: keys as in :func:`_walk`, first axis = images."""
    from .store import load_tensors

    paths = sorted((store.root / "attribute" / "shards").glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no attribution shards in {store.root / 'attribute'}: run `gig attribute` first")
    parts = [load_tensors(p) for p in paths]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _residual_stats(residuals: torch.Tensor) -> dict[str, float]:
    return {"median": float(residuals.median()), "p95": float(residuals.quantile(0.95)),
            "max": float(residuals.max()), "n": int(residuals.numel())}


def completeness_residuals(store, by_layer: bool = False, data: dict[str, torch.Tensor] | None = None):
    """Relative completeness residuals ``|Σ GIG − Δg| / |Δg|`` of every recorded attribution.

    One tensor, or with ``by_layer`` a dict keyed ``"LAYER->class"`` / ``"LOWER->UPPER"``.
    """
    data = load_attributions(store) if data is None else data
    layers = store.config.layers
    top = layers[-1]
    parts = {f"{top}->class": data[f"{top}/class_residual"].abs() / data[f"{top}/class_delta"].abs().clamp_min(1e-8)}
    for lower, upper in zip(layers[:-1], layers[1:]):
        parts[f"{lower}->{upper}"] = (data[f"{lower}/residual"].abs()
                                      / data[f"{lower}/delta"].abs().clamp_min(1e-8)).flatten()
    return parts if by_layer else torch.cat(list(parts.values()))


def _path_keys(layers: list[str]) -> dict[str, tuple[str, str]]:
    """``{"LAYER->class" | "LOWER->UPPER": (steps key, error key)}`` of the stored attributions."""
    top = layers[-1]
    keys = {f"{top}->class": (f"{top}/class_steps", f"{top}/class_error")}
    for lower, upper in zip(layers[:-1], layers[1:]):
        keys[f"{lower}->{upper}"] = (f"{lower}/steps", f"{lower}/error")
    return keys


def load_error_estimates(store, data: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Every stored attribution's relative error estimate, flat (NaN-free; empty for runs made
    before error control or on a fixed grid without an estimate)."""
    data = load_attributions(store) if data is None else data
    parts = [data[error_key].flatten() for _, error_key in _path_keys(store.config.layers).values()
             if error_key in data]
    flat = torch.cat(parts) if parts else torch.zeros(0)
    return flat[~flat.isnan()]


def accuracy_summary(store, data: dict[str, torch.Tensor] | None = None) -> dict:
    """Per path kind: gradient evaluations (mean, median, max, total) and the error estimate
    (median, p95, max, share of attributions above the tolerance) of every stored attribution."""
    data = load_attributions(store) if data is None else data
    config = store.config
    tol = None if config.n_steps else config.gig_tol
    out: dict = {"tol": tol, "by_source": {}}
    all_steps, all_errors = [], []
    for name, (steps_key, error_key) in _path_keys(config.layers).items():
        if steps_key not in data:  # a run attributed before error control: nothing recorded
            continue
        steps = data[steps_key].flatten().double()
        error = data[error_key].flatten().double()
        all_steps.append(steps)
        all_errors.append(error)
        out["by_source"][name] = _accuracy_stats(steps, error, tol)
    if all_steps:
        out.update(_accuracy_stats(torch.cat(all_steps), torch.cat(all_errors), tol))
    return out


def _accuracy_stats(steps: torch.Tensor, error: torch.Tensor, tol: float | None) -> dict:
    stats = {"n": int(steps.numel()), "evaluations_total": int(steps.sum()),
             "evaluations_mean": float(steps.mean()), "evaluations_median": float(steps.median()),
             "evaluations_max": int(steps.max())}
    known = error[~error.isnan()]
    if known.numel():
        stats.update({"error_median": float(known.median()), "error_p95": float(known.quantile(0.95)),
                      "error_max": float(known.max())})
        if tol is not None:
            stats["unconverged"] = float((known > tol).double().mean())
    return stats
