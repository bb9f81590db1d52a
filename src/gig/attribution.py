"""Stage 5 — Generalized Integrated Gradients (GIG) between concept layers and to classes.

For a source layer ``a`` with codes ``U (P, K)`` and dictionary ``V (K, C)``, reconstruction
``X̃ = U V``, and a scalar target ``g`` read after ``a`` (a class logit, or a concept's readout
at a later layer ``b``)::

    GIG[q] = Σ_p U[p, q] · ∫₀¹ ∂g(F(α X̃)) / ∂U[p, q] dα

Because ``X̃`` is linear in ``U``, ``∂g/∂U[p, q] = ⟨∂g/∂X̃_p, V_q⟩``: one integrated gradient
``Ḡ (P, C)`` with respect to the layer's output gives every concept's attribution,
``GIG[q] = Σ_p U[p, q] ⟨Ḡ_p, V_q⟩``, and keeping ``p`` open gives the spatial map. Completeness,
``Σ_q GIG[q] = g(F(X̃)) − g(F(0))``, holds up to the quadrature error, which is reported for
every attribution as the residual.

Images, integration steps and targets are batched together (``internal_batch_size`` items per
forward/backward); the network before ``a`` runs once per image (see ``ModelHandle.run_from``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .hooks import ModelHandle


def quadrature(n_steps: int, rule: str = "gauss-legendre") -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``α (S,)`` in (0, 1) and weights ``w (S,)`` summing to 1."""
    if n_steps < 1:
        raise ValueError("n_steps must be at least 1")
    if rule == "gauss-legendre":
        x, w = np.polynomial.legendre.leggauss(n_steps)
        return torch.tensor((x + 1) / 2, dtype=torch.float32), torch.tensor(w / 2, dtype=torch.float32)
    if rule == "riemann-midpoint":
        alphas = (torch.arange(n_steps, dtype=torch.float32) + 0.5) / n_steps
        return alphas, torch.full((n_steps,), 1.0 / n_steps)
    raise ValueError(f"unknown quadrature {rule!r}: use 'gauss-legendre' or 'riemann-midpoint'")


@dataclass
class GIGResult:
    """Attributions of ``N`` images to ``T`` targets each, over the ``K`` source concepts."""

    attributions: torch.Tensor  # (N, T, K)
    output_diff: torch.Tensor  # (N, T)  g(F(X̃)) − g(F(0))
    residual: torch.Tensor  # (N, T)  Σ_q GIG − output_diff
    target_value: torch.Tensor  # (N, T)  g(F(X̃))
    integrated_gradients: torch.Tensor | None = None  # (N, T, P, C) Ḡ, when asked for

    @property
    def relative_residual(self) -> torch.Tensor:
        """``|residual| / |output_diff|`` per attribution, shape ``(N, T)``."""
        return self.residual.abs() / self.output_diff.abs().clamp_min(1e-8)


class GIG:
    """Generalized Integrated Gradients from the concepts of ``layer`` (Captum-style).

    ``GIG(handle, layer, V).attribute(inputs, codes, target)`` with

    * ``inputs`` ``(N, 3, S, S)`` preprocessed images,
    * ``codes`` ``(N, P, K)`` coefficients of every position of ``layer`` (``P = H·W``),
    * ``target`` ``(N,)`` or ``(N, T)`` class indices, or with ``read_layer`` / ``read_vectors``
      (``(K_b, C_b)``) concept indices at that later layer, read as the maximum over positions of
      ``⟨x_p, v_r⟩ / ‖v_r‖``.
    """

    def __init__(self, handle: ModelHandle, layer: str, dictionary: torch.Tensor, n_steps: int = 16,
                 quadrature_rule: str = "gauss-legendre", internal_batch_size: int = 64):
        self.handle = handle
        self.layer = layer
        self.V = dictionary.float().to(handle.device)
        self.n_steps = n_steps
        self.quadrature_rule = quadrature_rule
        self.internal_batch_size = internal_batch_size
        self._shape: tuple[int, int] | None = None

    # -------------------------------------------------------------- targets
    def _readout(self, out: torch.Tensor, target: torch.Tensor, read_vectors: torch.Tensor | None) -> torch.Tensor:
        """``out``: logits ``(M, classes)`` or read grid ``(M, C_b, H_b, W_b)``; target ``(M,)`` → ``(M,)``."""
        if read_vectors is None:
            return out.gather(1, target[:, None]).squeeze(1)
        return concept_readout(out, read_vectors[target])

    def grid_shape(self, inputs: torch.Tensor) -> tuple[int, int]:
        if self._shape is None:
            with torch.no_grad():
                _, grids = self.handle.capture(inputs[:1], [self.layer])
            self._shape = tuple(grids[self.layer].shape[2:])
        return self._shape

    def attribute(self, inputs: torch.Tensor, codes: torch.Tensor, target: torch.Tensor,
                  read_layer: str | None = None, read_vectors: torch.Tensor | None = None,
                  n_steps: int | None = None, internal_batch_size: int | None = None,
                  return_gradients: bool = False) -> GIGResult:
        device = self.handle.device
        n_steps = n_steps or self.n_steps
        ibs = internal_batch_size or self.internal_batch_size
        inputs = inputs.to(device)
        target = torch.as_tensor(target, device=device)
        if target.dim() == 1:
            target = target[:, None]
        n, t = target.shape
        if codes.shape[0] != n or codes.shape[2] != self.V.shape[0]:
            raise ValueError(f"codes {tuple(codes.shape)} do not fit {n} images and K={self.V.shape[0]}")
        if (read_layer is None) != (read_vectors is None):
            raise ValueError("read_layer and read_vectors go together")
        rv = None if read_vectors is None else read_vectors.float().to(device)
        h, w = self.grid_shape(inputs)
        codes = codes.float().to(device)
        recon = (codes @ self.V).transpose(1, 2).reshape(n, -1, h, w)  # (N, C, H, W)
        alphas, weights = quadrature(n_steps, self.quadrature_rule)
        alphas, weights = alphas.to(device), weights.to(device)

        # Endpoints g(F(0)) and g(F(X̃)) in one no-grad pass: 2 replacements per image.
        with torch.no_grad():
            ends = torch.stack([torch.zeros_like(recon), recon], 1).flatten(0, 1)  # (2N, C, H, W)
            out = self.handle.run_from(inputs, self.layer, ends, read=read_layer)
            tgt = target.repeat_interleave(2, 0)  # (2N, T)
            vals = torch.stack([self._readout(out, tgt[:, j], rv) for j in range(t)], 1).view(n, 2, t)
        g0, g1 = vals[:, 0], vals[:, 1]

        # Integrated gradient w.r.t. the layer output, items ordered (image, target, step).
        per_image = t * n_steps
        grad_sum = torch.zeros(n, t, *recon.shape[1:], device=device)
        step_alpha = alphas.repeat(t)  # (T·S,)
        step_weight = weights.repeat(t)
        step_target = torch.arange(t, device=device).repeat_interleave(n_steps)
        for img_idx, lo, hi in _chunks(n, per_image, ibs):
            a = step_alpha[lo:hi].repeat(len(img_idx))
            grid = (recon[img_idx].repeat_interleave(hi - lo, 0) * a.view(-1, 1, 1, 1)).requires_grad_(True)
            out = self.handle.run_from(inputs[img_idx], self.layer, grid, read=read_layer)
            tj = step_target[lo:hi].repeat(len(img_idx))
            tg = target[img_idx].repeat_interleave(hi - lo, 0).gather(1, tj[:, None]).squeeze(1)
            (grad,) = torch.autograd.grad(self._readout(out, tg, rv).sum(), grid)
            grad = grad * step_weight[lo:hi].repeat(len(img_idx)).view(-1, 1, 1, 1)
            grad = grad.view(len(img_idx), hi - lo, *grad.shape[1:])
            # Sum the steps of each (image, target) pair into grad_sum.
            rows = torch.tensor(img_idx, device=device).repeat_interleave(hi - lo).view(len(img_idx), -1)
            grad_sum.index_put_((rows.flatten(), tj), grad.flatten(0, 1), accumulate=True)

        g_bar = grad_sum.flatten(3).transpose(2, 3)  # (N, T, P, C)
        # GIG[n,t,q] = Σ_p U[n,p,q] ⟨Ḡ[n,t,p], V_q⟩ without materialising (N, T, P, K).
        attributions = (torch.einsum("npk,ntpc->ntkc", codes, g_bar) * self.V).sum(-1)
        diff = g1 - g0
        return GIGResult(
            attributions=attributions.detach().cpu(),
            output_diff=diff.cpu(),
            residual=(attributions.sum(-1) - diff).detach().cpu(),
            target_value=g1.cpu(),
            integrated_gradients=g_bar.detach().cpu() if return_gradients else None,
        )


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


def concept_readout(grid: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``max_p ⟨x_p, v⟩ / ‖v‖`` for ``grid (M, C, H, W)`` and one vector per item ``(M, C)`` → ``(M,)``."""
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("mchw,mc->mhw", grid, unit).flatten(1).max(dim=1).values


def concept_readouts(grid: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Readouts of every concept: ``grid (M, C, H, W)``, ``vectors (K, C)`` → ``(M, K)``."""
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("mchw,kc->mkhw", grid, unit).flatten(2).max(dim=2).values


def _chunks(n_images: int, per_image: int, batch: int):
    """Yield ``(image indices, lo, hi)``: whole images while they fit, else slices of one image."""
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


def _normalised(weights: torch.Tensor) -> torch.Tensor:
    """Positive part of ``(N, T)`` importances, rows summing to 1 (uniform if all ≤ 0)."""
    w = weights.clamp_min(0)
    total = w.sum(1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(1e-12), torch.full_like(w, 1.0 / w.shape[1]))


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
        gigs = {layer: GIG(handle, layer, load_dictionary(store, layer), config.n_steps, config.quadrature,
                           config.internal_batch_size) for layer in layers}
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
        parts = completeness_residuals(store, by_layer=True)
        summary["completeness"] = _residual_stats(torch.cat(list(parts.values())))
        summary["completeness_by_source"] = {name: _residual_stats(r) for name, r in parts.items()}


def _walk(pixels, ids, class_targets, layers, readers, gigs, top_k) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {"image_id": torch.tensor(ids, dtype=torch.int64)}
    top_layer = layers[-1]
    codes = torch.stack([readers[top_layer].codes(i) for i in ids])
    res = gigs[top_layer].attribute(pixels, codes, torch.tensor(class_targets), return_gradients=True)
    out[f"{top_layer}/class_gig"] = res.attributions[:, 0]
    out[f"{top_layer}/class_delta"] = res.output_diff[:, 0]
    out[f"{top_layer}/class_residual"] = res.residual[:, 0]
    score = res.attributions[:, 0] / _safe(res.output_diff[:, 0:1])  # share of the logit change
    upper_weight = torch.ones(len(ids), 1)
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
        weight = (upper_weight / _safe(upper_delta))[:, :, None, None]
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
        upper_weight = _normalised(top.values)
        upper_delta = res.output_diff
        share = res.attributions / _safe(res.output_diff[..., None])
        score = (upper_weight[..., None] * share).sum(1)
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


def completeness_residuals(store, by_layer: bool = False):
    """Relative completeness residuals ``|Σ GIG − Δg| / |Δg|`` of every recorded attribution.

    One tensor, or with ``by_layer`` a dict keyed ``"LAYER->class"`` / ``"LOWER->UPPER"``.
    """
    data = load_attributions(store)
    layers = store.config.layers
    top = layers[-1]
    parts = {f"{top}->class": data[f"{top}/class_residual"].abs() / data[f"{top}/class_delta"].abs().clamp_min(1e-8)}
    for lower, upper in zip(layers[:-1], layers[1:]):
        parts[f"{lower}->{upper}"] = (data[f"{lower}/residual"].abs()
                                      / data[f"{lower}/delta"].abs().clamp_min(1e-8)).flatten()
    return parts if by_layer else torch.cat(list(parts.values()))
