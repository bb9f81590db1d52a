"""Stage 4 — rebuild every PFV of a layer from its dictionary with sparse codes.

``u_p = argmin_u ½‖x_p − uV‖² + λ‖u‖₁`` for every position ``p`` of every image (optionally
``u ≥ 0``), solved by :class:`gig.lasso.LassoEncoder` (exact LARS on CPU, batched FISTA to a
duality-gap certificate on GPU), then by default refitted by least squares on the selected
support (the relaxed Lasso, ``debias``). ``coder: omp`` codes by orthogonal matching pursuit
instead (:class:`gig.omp.OMPEncoder`, λ its correlation stop; not the paper's coder).

λ is chosen per layer from the layer's **sparsity–fidelity front**: on ``front_images`` images,
every position is coded along a descending λ path (λ_max·2^(−j), each λ resuming from the codes
of the one above) and, at each λ, the relative error, R², l0 ratio, and the model's output with
the layer replaced by its reconstruction (several λ per forward, the prefix shared) are
measured: per image its top-1 agreement and ``KL(p ‖ q)``, the KL divergence of the original
output distribution ``p`` from the replaced one ``q``. The default rule keeps the sparsest codes
(largest λ) with R² ≥ ``min_r2`` and mean KL ≤ ``max_kl``, refined between grid points to
2^(1/4) in λ; runs made before 0.4 (``max_kl: null``) required top-1 agreement ≥
``min_top1_agreement`` on the front images instead, a statistic too coarse on a few images;
``target_rel_error`` selects the largest λ whose relative error meets it. A bootstrap of the
front images gives every point's 95 % intervals and the choice's stability (the share of
resamples that choose the same λ). The front is saved (``decompose/front.json``), drawn in the
report and printed by ``gig inspect``.

Per layer the stage then codes every image (a capture per batch, then the model run from each
layer with that layer replaced: :func:`_code_batch`) and reports over all images:
relative L2 error ``‖X − X̃‖_F / ‖X‖_F``, R² (against the mean PFV), l0 ratio (share of non-zero
coefficients), top-1 agreement and mean KL with its standard error. These are checked against
the rule (:func:`check_layer`): a layer that misses it beyond the interval is stepped to a
denser λ and coded again (``decompose/check.json``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from .artefacts import (  # noqa: F401  (re-exported: moved to gig.artefacts)
    CodeReader,
    check_path,
    fidelity_path,
    from_sparse_rows,
    front_path,
    load_basis,
    load_dictionary,
    load_fidelity,
    load_front,
    load_images,
    run_alpha,
)
from .basis import BasisEncoder
from .collect import SHARD_IMAGES, iter_image_batches
from .config import Config
from .distributed import Ranks, ShardLoop, sharded_stage
from .errors import RunMismatchError
from .hooks import ModelHandle
from .images import ImageSource
from .lasso import LassoEncoder, lambda_max
from .omp import OMPEncoder
from .store import RunStore, load_json, load_tensors, save_json, save_tensors

#: The λ path of the front: λ_max · 2^(−j), j = 1 … FRONT_POINTS.
FRONT_POINTS = 20
#: Most reconstructions per image in one agreement forward (the batch grows by this factor
#: after the layer).
AGREEMENT_BLOCK = 8
#: Grid points measured past the first that meets the rule (the front beyond the choice).
POINTS_PAST_CHOICE = 1
#: Rounds of refinement between the chosen grid point and the next larger λ, each of
#: ``REFINE_POINTS`` λ evenly spaced in log λ (one round of three: λ to 2^(1/4), as two bisection
#: steps in one block of forwards). Finer is false precision where mean KL binds the choice: with
#: two rounds (to 2^(1/16)) the choice at _blocks.4 of the 800-photo sample repeated in only
#: 31-77 % of bootstrap resamples of its 32 front images (bench/front_rule.py before 0.4).
REFINE_ROUNDS = 1
REFINE_POINTS = 3
#: The walk stops, even where the rule is not met, once this share of the concepts is active ...
DENSE_STOP = 0.9
#: ... or once the reconstruction is exact to this R² (smaller λ cannot change anything).
EXACT_R2 = 0.9999


def encoder_for(
    config: Config, dictionary: torch.Tensor, alpha: float, device: str | torch.device | None = None
) -> LassoEncoder | OMPEncoder:
    """The run's encoder for one layer: coder (Lasso or OMP), solver, sign constraint, debiasing
    and tolerance from the config. Every consumer of a run's codes (this stage, the evaluation)
    builds it here."""
    if config.coder == "omp":
        return OMPEncoder(dictionary, alpha, device=device)
    return LassoEncoder(
        dictionary,
        alpha,
        config.nonnegative,
        max_iter=config.lasso_max_iter,
        tol=config.lasso_tol,
        device=device,
        solver=config.lasso_solver,
        debias=config.debias,
        unit_atoms=config.unit_atoms,
    )


def layer_encoder(
    store: RunStore, layer: str, device: str | torch.device | None = None, alpha: float | None = None
) -> LassoEncoder | OMPEncoder | BasisEncoder:
    """The encoder of one of the run's layers: its basis's own (:mod:`gig.basis`) where the layer
    has one, else the run's coder on its dictionary at ``alpha`` (default: the λ the stage chose)."""
    basis = load_basis(store, layer)
    if basis is not None:
        return basis.to(device) if device is not None else basis
    alpha = run_alpha(store, layer) if alpha is None else alpha
    return encoder_for(store.config, load_dictionary(store, layer), alpha, device)


def reconstruct(encoder, U: torch.Tensor) -> torch.Tensor:
    """``X̃ (N, C)`` from codes ``U (N, K)``: ``U V``, plus the decoder bias of a basis that has one."""
    return encoder.reconstruct(U) if isinstance(encoder, BasisEncoder) else U @ encoder.V


def lambda_in_unit_atoms(config: Config) -> bool:
    """Whether the run's λ is in unit-norm atoms' units: OMP's stop bounds correlations with the
    unit atoms, and ``unit_atoms`` penalises the normalised atoms; else λ is in the concept
    vectors' own units."""
    return config.unit_atoms or config.coder == "omp"


def rule_text(config: Config) -> str:
    """The λ rule of ``config`` in words."""
    coder = " (OMP codes)" if config.coder == "omp" else ""
    if config.target_rel_error is not None:
        return f"largest λ with relative error ≤ {config.target_rel_error}{coder}"
    if config.max_kl is None:  # runs made before 0.4
        return (
            f"largest λ (sparsest codes) with R² ≥ {config.min_r2} and top-1 agreement ≥ "
            f"{config.min_top1_agreement}{coder}"
        )
    return (
        f"largest λ (sparsest codes) with R² ≥ {config.min_r2} and mean KL(model ‖ replaced) ≤ "
        f"{config.max_kl} nats{coder}"
    )


def meets_rule(point: dict, config: Config) -> bool:
    """Whether a front point satisfies the run's λ rule."""
    return bool(_meets(point, config))


def _meets(figures: dict, config: Config):
    """The rule on figures that are numbers or tensors of one shape (then elementwise)."""
    if config.target_rel_error is not None:
        return torch.as_tensor(figures["rel_error"]) <= config.target_rel_error
    r2 = torch.as_tensor(figures["r2"]) >= config.min_r2
    if config.max_kl is None:
        return r2 & (torch.as_tensor(figures["top1_agreement"]) >= config.min_top1_agreement)
    return r2 & (torch.as_tensor(figures["kl"]) <= config.max_kl)


def alpha_for_l0(
    X: torch.Tensor, V: torch.Tensor, target_l0: float, make_encoder, n_bisect: int = 16
) -> tuple[float, float]:
    """λ whose codes of ``X (N, C)`` on ``V (K, C)`` have l0 ratio ``≈ target_l0`` (at most it);
    ``make_encoder(V, λ)`` builds the encoder. Returns ``(λ, l0 ratio)``. The l0 ratio falls as
    λ grows, so: bisection in log λ between λ_max·1e-6 and λ_max (where every code is zero; the
    larger of the atoms' and the unit atoms' λ_max, so it holds for a coder on either)."""
    unit = V / V.norm(dim=1, keepdim=True).clamp_min(1e-12)
    top = max(lambda_max(X, V), lambda_max(X, unit), 1e-30)
    lo, hi = top * 1e-6, top
    best = (hi, 0.0)
    for _ in range(n_bisect):
        mid = math.sqrt(lo * hi)
        l0 = float((make_encoder(V, mid).encode(X) != 0).float().mean())
        if l0 <= target_l0:
            hi, best = mid, (mid, l0)
        else:
            lo = mid
    return best


@dataclass
class FrontImages:
    """The images a front is measured on: ``pixels`` and ``grids[layer]`` per batch
    (``(B, 3, S, S)`` and ``(B, C, H, W)``), the model's predictions ``preds (N,)`` and its output
    distribution ``log_probs (N, classes)`` (log-softmax of the unmodified logits)."""

    pixels: list[torch.Tensor]
    grids: dict[str, list[torch.Tensor]]
    preds: torch.Tensor
    log_probs: torch.Tensor


def load_front_images(
    source: ImageSource, records: list, preds: torch.Tensor, handle: ModelHandle, layers: list[str], config: Config
) -> FrontImages:
    """Capture ``layers`` on the first ``front_images`` of ``records`` in a seeded random order."""
    g = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(records), generator=g)[: config.front_images].sort().values.tolist()
    chosen = [records[i] for i in order]
    pixels, grids, kept, log_probs = [], {layer: [] for layer in layers}, [], []
    by_id = {r.image_id: p for r, p in zip(records, preds.tolist())}
    for batch in iter_image_batches(source, chosen, handle, config.batch_size, config.loader_workers):
        with torch.no_grad():
            logits, captured = handle.capture(batch.pixels, layers)
        pixels.append(batch.pixels)
        log_probs.append(logits.float().log_softmax(1).cpu())
        for layer in layers:
            grids[layer].append(captured[layer])
        kept.extend(by_id[r.image_id] for r in batch.records)
    return FrontImages(pixels, grids, torch.tensor(kept, dtype=torch.long), torch.cat(log_probs))


def kl_from_original(log_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per image ``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)`` in nats, of the unmodified model's
    distribution ``p`` (``log_probs (N, classes)``) from the one of ``logits (N, classes)``."""
    q = logits.float().log_softmax(1)
    return (log_probs.exp() * (log_probs - q)).sum(1).clamp_min(0.0)


def code_grid(
    encoder: LassoEncoder | OMPEncoder, grid: torch.Tensor, meter: "FidelityMeter", init: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``U (B·H·W, K)`` of every position of ``grid (B, C, H, W)`` (row-major positions)
    and its reconstruction in grid form ``(B, C, H, W)``; both are added to ``meter``."""
    b, c, h, w = grid.shape
    X = grid.permute(0, 2, 3, 1).reshape(-1, c)
    U = encoder.encode(X, init)
    X_hat = reconstruct(encoder, U)
    meter.add(X, X_hat, U)
    return U, X_hat.reshape(b, h, w, c).permute(0, 3, 1, 2)


def code_front_point(
    encoder: LassoEncoder | OMPEncoder, images: FrontImages, layer: str, init: list[torch.Tensor] | None = None
) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]]:
    """Code every position of ``images`` at ``layer``: the fidelity figures (``alpha``,
    ``rel_error``, ``r2``, ``l0_ratio``; the model's output figures come from
    :func:`output_fidelity`) with each image's squared error under ``"_sse"`` ``(N,)``, the codes
    per batch ``(B·H·W, K)`` (warm starts for the next λ) and the reconstructions per batch
    ``(B, C, H, W)``. ``init``: codes per batch at a larger λ (see ``encode``)."""
    meter = FidelityMeter(encoder.V.shape[1])
    codes, recons, sse = [], [], []
    for i, grid in enumerate(images.grids[layer]):
        U, recon = code_grid(encoder, grid, meter, None if init is None else init[i])
        codes.append(U)
        recons.append(recon)
        sse.append(((grid - recon).double() ** 2).flatten(1).sum(1).cpu())
    figures = meter.result()
    for unmeasured in ("n_positions", "n_images", "top1_agreement", "kl", "kl_se"):
        figures.pop(unmeasured)
    return {"alpha": encoder.alpha, **figures, "_sse": torch.cat(sse)}, codes, recons


def output_fidelity(
    images: FrontImages, layer: str, handle: ModelHandle, recons: list[list[torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model with ``layer`` replaced by each of ``m`` reconstructions (``recons[j]``: per batch
    ``(B, C, H, W)``, as :func:`code_front_point` gives them), per image: whether its top-1 class
    stays, ``(m, N)`` bool, and the KL divergence of the original output from the replaced one,
    ``(m, N)`` nats (:func:`kl_from_original`). One forward per batch and up to
    ``AGREEMENT_BLOCK`` reconstructions, every image's replacements sharing its prefix
    (:meth:`ModelHandle.run_from`)."""
    n = images.preds.numel()
    agree = torch.zeros(len(recons), n, dtype=torch.bool)
    kl = torch.zeros(len(recons), n, dtype=torch.float64)
    for start in range(0, len(recons), AGREEMENT_BLOCK):
        block, offset = recons[start : start + AGREEMENT_BLOCK], 0
        for i, pixels in enumerate(images.pixels):
            grids = torch.stack([r[i] for r in block], dim=1).flatten(0, 1)  # image-major
            with torch.no_grad():
                logits = handle.measuring(list(images.grids)).run_from(pixels, layer, grids).cpu()
            b = pixels.shape[0]
            rows = slice(offset, offset + b)
            offset += b
            hits = logits.argmax(1).reshape(b, len(block)) == images.preds[rows, None]
            agree[start : start + len(block), rows] = hits.T
            original = images.log_probs[rows].repeat_interleave(len(block), 0)
            kl[start : start + len(block), rows] = kl_from_original(original, logits).reshape(b, len(block)).T.double()
    return agree, kl


class _FrontWalk:
    """The points of one layer's front, coded one λ at a time (each resuming from the codes of
    the λ above) and measured on the model's output in blocks (one forward per batch and block).
    Each point keeps its images' figures (``_sse``, ``_kl``, ``_agree``, each ``(N,)``) for
    :func:`assess_front`."""

    def __init__(
        self,
        path,
        images: FrontImages,
        layer: str,
        handle: ModelHandle,
        config: Config,
        on_point: Callable[[dict], None] | None = None,
    ):
        self.path, self.images, self.layer, self.handle, self.config = path, images, layer, handle, config
        self.on_point = on_point
        self.points: list[dict] = []
        self.codes: list[list[dict[str, torch.Tensor]]] = []  # per point, per batch: CSR (to_sparse_rows)
        self._pending: list[tuple[dict, list[torch.Tensor]]] = []

    def code(self, alpha: float, above: int | None) -> dict:
        """Code λ = ``alpha``, resuming from point ``above`` (a larger λ) where given; its
        output figures wait for :meth:`measure`."""
        init = None if above is None else [from_sparse_rows(**c, k=self.path.V.shape[0]) for c in self.codes[above]]
        point, codes, recons = code_front_point(self.path.with_alpha(alpha), self.images, self.layer, init)
        self.points.append(point)
        self.codes.append([to_sparse_rows(U) for U in codes])
        self._pending.append((point, recons))
        if self.on_point is not None:
            self.on_point(point)
        return point

    def measure(self) -> None:
        """Top-1 agreement and mean KL of every point coded since the last call, in one block."""
        if not self._pending:
            return
        agree, kl = output_fidelity(self.images, self.layer, self.handle, [r for _, r in self._pending])
        for (point, _), hits, div in zip(self._pending, agree, kl):
            point.update(top1_agreement=float(hits.double().mean()), kl=float(div.mean()), _agree=hits, _kl=div)
            point["meets"] = meets_rule(point, self.config)
        self._pending = []

    def first_meeting(self) -> int | None:
        return next((i for i, p in enumerate(self.points) if p["meets"]), None)


def _may_meet(point: dict, config: Config) -> bool:
    """Whether a point without its output figures yet could meet the rule."""
    if config.target_rel_error is not None:
        return point["rel_error"] <= config.target_rel_error
    return point["r2"] >= config.min_r2


def _walk_grid(walk: _FrontWalk, top: float, config: Config) -> int | None:
    """Walk λ down the grid ``top·2^(−j)`` (each λ resuming from the one above) until the first
    point that meets the rule has ``POINTS_PAST_CHOICE`` points after it, or the codes turn dense
    or exact without meeting it. Output figures are measured in blocks: the points up to the first
    that may meet the rule by its R² (or relative error) and ``POINTS_PAST_CHOICE`` more, then
    ``1 + POINTS_PAST_CHOICE`` at a time. Returns the index of the first point meeting the rule."""
    first_pass, reached, want = None, None, None
    for j in range(1, FRONT_POINTS + 1):
        point = walk.code(top * 2.0**-j, j - 2 if j > 1 else None)
        last = j - 1
        if reached is None and _may_meet(point, config):
            reached, want = last, last + POINTS_PAST_CHOICE  # measure up to here at once
        stop = j == FRONT_POINTS or point["l0_ratio"] > DENSE_STOP or point["r2"] >= EXACT_R2
        if not stop and (want is None or last < want):
            continue
        walk.measure()
        first_pass = walk.first_meeting()
        if first_pass is not None:
            if last - first_pass >= POINTS_PAST_CHOICE:
                break
            want = first_pass + POINTS_PAST_CHOICE
        elif stop:
            break  # dense or exact codes that still miss the rule: it cannot be met on this basis
        else:
            want = last + 1 + POINTS_PAST_CHOICE
    walk.measure()
    return first_pass


def _refine(walk: _FrontWalk, first_pass: int) -> None:
    """``REFINE_ROUNDS`` rounds of ``REFINE_POINTS`` λ evenly spaced in log λ between the first
    grid point meeting the rule and the failing one above it, each round one block, so that the
    largest λ meeting the rule is known to ``2^(1/(REFINE_POINTS + 1)^REFINE_ROUNDS)``."""
    chosen, above = walk.points[first_pass], first_pass - 1
    if above < 0:
        return
    hi, lo = walk.points[above]["alpha"], chosen["alpha"]
    for _ in range(REFINE_ROUNDS):
        start = len(walk.points)
        for k in range(1, REFINE_POINTS + 1):  # descending λ, each resuming from the one above
            walk.code(hi * (lo / hi) ** (k / (REFINE_POINTS + 1)), above if k == 1 else len(walk.points) - 1)
        walk.measure()
        refined = walk.points[start:]
        passing = next((i for i, p in enumerate(refined) if p["meets"]), None)
        if passing is None:
            hi, above = refined[-1]["alpha"], len(walk.points) - 1
        else:
            lo = refined[passing]["alpha"]
            if passing:
                hi, above = refined[passing - 1]["alpha"], start + passing - 1


def sparsity_front(
    images: FrontImages,
    layer: str,
    V: torch.Tensor,
    handle: ModelHandle,
    config: Config,
    on_point: Callable[[dict], None] | None = None,
) -> dict:
    """The layer's front and the λ its rule picks, with the choice's error bars.

    Walks the grid λ_max·2^(−j) (:func:`_walk_grid`), refines between the first point meeting
    the rule and the one above (:func:`_refine`), and assesses the choice under a bootstrap of the
    front images (:func:`assess_front`). Returns ``{"points": [...] (descending λ), "alpha",
    "met", "rule", "images", "stability", "decided", "note"}``; each point is ``{alpha,
    rel_error, r2, l0_ratio, top1_agreement, kl, kl_ci, r2_ci, meets}``. The choice is the
    largest λ meeting the rule; where none does, see :func:`assess_front`. ``on_point(point)`` is
    called as each λ is coded (a progress bar's hook).
    """
    device = handle.device
    V = V.to(device)
    rows = torch.cat([g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]) for g in images.grids[layer]])
    atoms = V / V.norm(dim=1, keepdim=True).clamp_min(1e-12) if lambda_in_unit_atoms(config) else V
    top = lambda_max(rows.to(device), atoms, config.nonnegative)  # the penalty's units
    walk = _FrontWalk(encoder_for(config, V, top, device), images, layer, handle, config, on_point)  # one Gram matrix
    first_pass = _walk_grid(walk, top, config)
    if first_pass is not None:
        _refine(walk, first_pass)
    points = sorted(walk.points, key=lambda p: -p["alpha"])
    front = assess_front(points, image_moments(images.grids[layer]), config)
    for point in points:
        for private in ("_sse", "_kl", "_agree"):
            point.pop(private)
    return front


#: Bootstrap resamples of the front images behind every interval and the stability of the choice.
BOOTSTRAP = 1000
#: The least stability (share of resamples choosing the same λ) that decides a choice.
MIN_STABILITY = 0.9
#: A resample's choice counts as the same when within this factor of λ: one step of the refined
#: grid, with room for rounding.
SAME_CHOICE = 2.0 ** (1.01 / (REFINE_POINTS + 1) ** REFINE_ROUNDS)


def image_moments(grids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per image of ``grids`` (per batch ``(B, C, H, W)``): squared norm summed over positions
    ``sum_sq (N,)``, sum over positions ``sum (N, C)``, positions ``n (N,)``: what R² over any
    weighting of the images needs, besides each image's squared error."""
    sum_sq = torch.cat([(g.double() ** 2).flatten(1).sum(1).cpu() for g in grids])
    sums = torch.cat([g.double().sum((2, 3)).cpu() for g in grids])
    n = torch.cat([torch.full((g.shape[0],), g.shape[2] * g.shape[3], dtype=torch.float64) for g in grids])
    return {"sum_sq": sum_sq, "sum": sums, "n": n}


def weighted_figures(
    points: list[dict],
    moments: dict[str, torch.Tensor],
    weights: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Each point's ``r2``, ``rel_error``, ``kl`` and ``top1_agreement`` over the images weighted by
    each row of ``weights (B, N)`` (bootstrap counts; a row of ones gives the points' own figures):
    ``(B, P)`` each. R² as :class:`FidelityMeter` computes it, from the images' moments."""
    W = weights.double()
    sse = torch.stack([p["_sse"] for p in points]).double()  # (P, N)
    total = W @ moments["sum_sq"]
    sst = total - (W @ moments["sum"]).pow(2).sum(1) / (W @ moments["n"])
    err = W @ sse.T
    count = W.sum(1, keepdim=True)
    return {
        "r2": 1.0 - err / sst.clamp_min(1e-12)[:, None],
        "rel_error": (err / total.clamp_min(1e-12)[:, None]).sqrt(),
        "kl": W @ torch.stack([p["_kl"] for p in points]).double().T / count,
        "top1_agreement": W @ torch.stack([p["_agree"] for p in points]).double().T / count,
    }


def assess_front(points: list[dict], moments: dict[str, torch.Tensor], config: Config) -> dict:
    """The choice on a measured front (``points`` by descending λ, each with its images' figures)
    and how far the front images support it, by ``BOOTSTRAP`` resamples of those images:

    * every point's 95 % percentile intervals of mean KL and R² (``kl_ci``, ``r2_ci``);
    * ``stability``: the share of resamples whose own choice (the largest measured λ meeting the
      rule on the resample) lies within one refinement step of the choice;
    * ``decided``: whether the stability reaches ``MIN_STABILITY``, else ``note`` says the images
      are too few to decide. (Not whether the chosen point meets the rule at its interval's far
      end: refined to where the rule binds, it never does.)

    Where no point meets the rule (``met`` False), the choice is the sparsest point with R² ≥
    ``min_r2`` whose KL is not significantly above the densest point's (the paired difference's
    95 % interval reaches 0), or else the most faithful point."""
    n = int(moments["n"].numel())
    g = torch.Generator().manual_seed(config.seed)
    draws = torch.randint(n, (BOOTSTRAP, n), generator=g)
    counts = torch.zeros(BOOTSTRAP, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(BOOTSTRAP, n, dtype=torch.float64)
    )
    boot = weighted_figures(points, moments, counts)
    for j, point in enumerate(points):
        point["kl_ci"] = _percentiles(boot["kl"][:, j])
        point["r2_ci"] = _percentiles(boot["r2"][:, j])
    alphas = torch.tensor([p["alpha"] for p in points], dtype=torch.float64)
    met = [j for j, p in enumerate(points) if p["meets"]]
    front = {"points": points, "met": bool(met), "rule": rule_text(config), "images": n}
    if met:
        chosen = met[0]  # descending λ: the sparsest meeting the rule
        meets = _meets(boot, config)  # (B, P)
        picked = torch.where(meets.any(1), meets.double().argmax(1), -1)  # first meeting per resample
        same = (picked >= 0) & ((alphas[picked.clamp_min(0)] / alphas[chosen]).log().abs() <= math.log(SAME_CHOICE))
        front["stability"] = float(same.double().mean())
    else:
        chosen = _not_worse_than_densest(points, boot, config)
        front["stability"] = None
    front["alpha"] = points[chosen]["alpha"]
    front["decided"], front["note"] = _decided(front)
    return front


def _percentiles(values: torch.Tensor) -> list[float]:
    """The 2.5 % and 97.5 % percentiles of ``values (B,)``."""
    lo, hi = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype)).tolist()
    return [lo, hi]


def _not_worse_than_densest(points: list[dict], boot: dict[str, torch.Tensor], config: Config) -> int:
    """Where no point meets the rule: the sparsest point with R² ≥ ``min_r2`` whose mean KL is not
    significantly above the densest point's (the 2.5 % percentile of the paired difference over
    the resamples ≤ 0); else the point with the best R² (and agreement)."""
    faithful = max(range(len(points)), key=lambda j: (points[j]["r2"], points[j]["top1_agreement"]))
    if config.target_rel_error is not None or config.max_kl is None:
        return faithful  # the earlier rules' fallback
    dense = len(points) - 1
    lower = torch.quantile(boot["kl"] - boot["kl"][:, dense : dense + 1], 0.025, dim=0)
    for j, point in enumerate(points):
        if point["r2"] >= config.min_r2 and float(lower[j]) <= 0:
            return j
    return faithful


def _decided(front: dict) -> tuple[bool, str | None]:
    """Whether the front's images decide the choice: it met the rule and repeats, within one
    refinement step, in at least ``MIN_STABILITY`` of the bootstrap resamples; if not, why."""
    n = front["images"]
    if not front["met"]:
        return False, (
            f"no λ on the front meets the rule on its {n} images; the sparsest point not "
            "significantly worse than the densest was taken"
        )
    if front["stability"] >= MIN_STABILITY:
        return True, None
    return False, (
        f"the choice repeats in {front['stability']:.0%} of bootstrap resamples of the {n} front "
        f"images (decided: ≥ {MIN_STABILITY:.0%}): too few images to decide it; more front images "
        "(front_images; more images where the run has no more) would"
    )


class FidelityMeter:
    """Accumulates reconstruction figures over chunks of positions, and the model's output with
    the layer replaced over images (top-1 agreement; KL divergence, its sum and sum of squares)."""

    def __init__(self, channels: int):
        self.sse = 0.0
        self.sum_sq = 0.0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.n = 0
        self.nnz = 0
        self.n_coef = 0
        self.agree = 0
        self.n_images = 0
        self.kl_sum = 0.0
        self.kl_sq = 0.0

    def add(self, X: torch.Tensor, X_hat: torch.Tensor, U: torch.Tensor) -> None:
        self.sse += float(((X - X_hat).double() ** 2).sum())
        self.sum_sq += float((X.double() ** 2).sum())
        self.sum += X.double().sum(0).cpu()
        self.n += X.shape[0]
        self.nnz += int((U != 0).sum())
        self.n_coef += U.numel()

    def add_outputs(self, agree: torch.Tensor, kl: torch.Tensor) -> None:
        """Images' ``agree (N,)`` (top-1 class kept) and ``kl (N,)`` (nats, :func:`kl_from_original`)."""
        self.agree += int(agree.sum())
        self.n_images += int(agree.numel())
        self.kl_sum += float(kl.double().sum())
        self.kl_sq += float((kl.double() ** 2).sum())

    _FIELDS = ("sse", "sum_sq", "n", "nnz", "n_coef", "agree", "n_images", "kl_sum", "kl_sq")

    def state(self) -> dict:
        """JSON-able running totals (kept per shard)."""
        return {**{f: getattr(self, f) for f in self._FIELDS}, "sum": self.sum.tolist()}

    @classmethod
    def merge(cls, states: list[dict]) -> "FidelityMeter":
        meter = cls(len(states[0]["sum"]))
        for st in states:
            for f in cls._FIELDS:  # shards written before 0.4 hold no KL
                setattr(meter, f, getattr(meter, f) + st.get(f, 0))
            meter.sum += torch.tensor(st["sum"], dtype=torch.float64)
        return meter

    def result(self) -> dict[str, float]:
        sst = self.sum_sq - float((self.sum**2).sum()) / max(self.n, 1)
        m = max(self.n_images, 1)
        kl = self.kl_sum / m
        return {
            "rel_error": math.sqrt(self.sse / max(self.sum_sq, 1e-12)),
            "r2": 1.0 - self.sse / max(sst, 1e-12),
            "l0_ratio": self.nnz / max(self.n_coef, 1),
            "top1_agreement": self.agree / m,
            "kl": kl,
            # the standard error of the mean over images
            "kl_se": math.sqrt(max(self.kl_sq / m - kl * kl, 0.0) / max(m - 1, 1)),
            "n_positions": self.n,
            "n_images": self.n_images,
        }


def to_sparse_rows(U: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense ``(P, K)`` → CSR pieces ``indptr (P+1,)``, ``indices``, ``values`` (row-major order)."""
    U = U.cpu()  # one copy per batch: the pieces go to disk
    rows, cols = U.nonzero(as_tuple=True)
    indptr = torch.zeros(U.shape[0] + 1, dtype=torch.int64)
    indptr[1:] = torch.bincount(rows, minlength=U.shape[0]).cumsum(0)
    return {"indptr": indptr, "indices": cols.int(), "values": U[rows, cols].float()}


def decompose(
    store: RunStore, handle: ModelHandle, source: ImageSource, progress: bool = True, ranks: Ranks | None = None
) -> None:
    """Stage 4 into ``store/decompose``: sparse codes of all positions, shards of images per layer.

    The λ of each layer comes from its front (:func:`sparsity_front`); once every image is coded,
    the stage's figures over all images are checked against the rule (:func:`check_layer`), and a
    layer that misses it beyond its interval steps to a denser λ and is coded again (at most
    ``CHECK_STEPS`` times; ``decompose/check.json``). Under torchrun each rank measures the fronts
    of its share of the layers and all ranks gather them (every rank then codes with the same λ);
    each rank codes its share of the shards, and rank 0 alone checks."""
    ranks = ranks or Ranks()
    store.require("concepts")
    config = store.config
    used = load_images(store)["images"]
    by_id = {r.image_id: r for r in source.records}
    records = [by_id[i["image_id"]] for i in used]
    preds = torch.tensor([i["pred"] for i in used])
    with sharded_stage(store, "decompose", ranks) as summary:
        store.stage_dir("decompose")
        fronts = _fronts(store, handle, source, records, preds, progress, ranks)  # the same on every rank
        checks = ranks.share(load_json(check_path(store)) if check_path(store).is_file() else {})
        # layers with a basis of their own (no λ, no front) keep its encoder
        encoders = {
            layer: layer_encoder(
                store, layer, handle.device, checks.get(layer, {}).get("alpha", fronts[layer]["alpha"])
            )
            if layer in fronts
            else layer_encoder(store, layer, handle.device)
            for layer in config.layers
        }
        loop = ShardLoop(store, "decompose", ranks, range(len(records)), SHARD_IMAGES, progress)
        for name, rows in loop:
            _decompose_shard(store, handle, source, [records[r] for r in rows], preds[rows], encoders, name, loop.bar)
        while True:  # re-code what an earlier check stepped, then check
            _recode_stale(store, handle, source, records, preds, encoders, loop.n_shards, ranks, progress)
            steps = _check_all(store, fronts, checks, encoders, loop.n_shards) if ranks.is_main else None
            steps = ranks.share(steps)
            if not steps:
                break
            for layer, alpha in steps.items():
                encoders[layer] = encoders[layer].with_alpha(alpha)  # the same Gram matrix
        if not ranks.is_main:
            return
        figures = _figures(store, encoders, loop.n_shards, fronts, checks)
        save_json(fidelity_path(store), figures)
        summary["alpha"] = {layer: enc.alpha for layer, enc in encoders.items()}
        summary["rule_met"] = {layer: fronts[layer]["met"] for layer in config.layers if layer in fronts}
        summary["solver"] = {layer: enc.solver_ for layer, enc in encoders.items()}
        summary["fidelity"] = figures


#: Most times the check steps one layer to a denser λ and codes it again.
CHECK_STEPS = 3
#: Each step makes λ at least this factor smaller (a quarter of the front's grid step), so that one
#: re-coding pass moves the figures by more than their noise.
CHECK_STEP = 2.0**0.25


def check_layer(figures: dict, front: dict, config: Config) -> str | None:
    """Whether the figures of a layer over all the run's images miss the λ rule beyond their
    interval, and if so how (else ``None``): mean KL significantly above ``max_kl`` (its 95 %
    interval over images entirely above), R² below ``min_r2`` and below the front's interval for
    the chosen point, or top-1 agreement significantly below ``min_top1_agreement`` (the normal
    interval of a proportion). Runs under the earlier rules, and layers whose front met no point
    of the rule (already reported: a denser λ would not help), are not checked."""
    if config.target_rel_error is not None or config.max_kl is None or not front.get("met", True):
        return None
    misses = []
    if figures["kl"] - 1.96 * figures["kl_se"] > config.max_kl:
        misses.append(f"mean KL {figures['kl']:.3g} ± {1.96 * figures['kl_se']:.2g} > {config.max_kl}")
    chosen = next((p for p in front["points"] if p["alpha"] == front["alpha"]), {})
    r2_low = min(config.min_r2, chosen.get("r2_ci", [config.min_r2])[0])
    if figures["r2"] < r2_low:
        misses.append(f"R² {figures['r2']:.3f} < {r2_low:.3f}")
    a, m = figures["top1_agreement"], max(figures.get("n_images", 0), 1)
    if a + 1.96 * math.sqrt(a * (1 - a) / m) < config.min_top1_agreement:
        misses.append(
            f"top-1 agreement {a:.3f} ± {1.96 * math.sqrt(a * (1 - a) / m):.3f} < {config.min_top1_agreement}"
        )
    return "; ".join(misses) or None


def _layer_figures(store: RunStore, layers, n_shards: int) -> dict[str, dict]:
    """Each layer's figures (:meth:`FidelityMeter.result`) summed over the stage's shards, every
    shard's record read once (a resumed stage reports the same)."""
    infos = [store.shard_info("decompose", f"{i:05d}") for i in range(n_shards)]
    return {layer: FidelityMeter.merge([info[layer] for info in infos if layer in info]).result() for layer in layers}


def _check_all(store: RunStore, fronts: dict, checks: dict, encoders: dict, n_shards: int) -> dict[str, float]:
    """:func:`check_layer` on every layer; the layers that step, with their new λ. Every check
    is recorded in ``checks`` and saved (``decompose/check.json``) before any re-coding, so an
    interrupted stage resumes with the same λ."""
    steps = {}
    figures = _layer_figures(store, encoders, n_shards)
    for layer, encoder in encoders.items():
        if layer not in fronts:  # a basis with its own encoder: measured, never stepped
            continue
        result = {**figures[layer], "alpha": encoder.alpha}
        record = checks.setdefault(layer, {"alpha": encoder.alpha, "steps": []})
        if record["steps"] and record["steps"][-1]["alpha"] == encoder.alpha:
            continue  # checked already (a resumed stage)
        miss = check_layer(result, fronts[layer], store.config)
        record["steps"].append(
            {k: result[k] for k in ("alpha", "r2", "kl", "kl_se", "top1_agreement", "l0_ratio")} | {"miss": miss}
        )
        if miss and len(record["steps"]) <= CHECK_STEPS:
            # The refined points lie exactly CHECK_STEP apart: a rounding margin keeps the next one.
            bound = encoder.alpha / CHECK_STEP * (1 + 1e-6)
            denser = [p["alpha"] for p in fronts[layer]["points"] if p["alpha"] <= bound]
            steps[layer] = record["alpha"] = max(denser, default=encoder.alpha / CHECK_STEP)
    save_json(check_path(store), checks)
    return steps


def _figures(store: RunStore, encoders: dict, n_shards: int, fronts: dict, checks: dict) -> dict[str, dict]:
    """Per layer the stage's figures over all images, its λ and K, and the check's outcome."""
    figures, merged = {}, _layer_figures(store, encoders, n_shards)
    for layer, encoder in encoders.items():
        steps = checks.get(layer, {}).get("steps", [])
        figures[layer] = {
            **merged[layer],
            "K": int(encoder.V.shape[0]),
            "alpha": encoder.alpha,
            "front_alpha": fronts[layer]["alpha"] if layer in fronts else None,
            "check": {"steps": len(steps) - 1 if steps else 0, "miss": steps[-1]["miss"] if steps else None},
        }
        if isinstance(encoder, BasisEncoder):
            figures[layer]["basis"] = encoder.kind
    return figures


def _fronts(
    store: RunStore,
    handle: ModelHandle,
    source: ImageSource,
    records: list,
    preds: torch.Tensor,
    progress: bool,
    ranks: Ranks | None = None,
) -> dict[str, dict]:
    """Every layer's :func:`sparsity_front`, saved to ``decompose/front.json`` as soon as it is
    measured (a resumed stage reuses it: the stage directory is wiped when settings change).

    Under torchrun the layers still to measure are dealt out round-robin, each rank measures its
    own (a front is the same whichever process measures it), and every rank gets all of them."""
    ranks = ranks or Ranks()
    config = store.config
    path = front_path(store)
    fronts = load_json(path) if path.is_file() else {}
    # a layer with a basis of its own has no λ, hence no front
    todo = [layer for layer in config.layers if layer not in fronts and load_basis(store, layer) is None]
    mine = ranks.mine(todo)
    if mine:
        images = load_front_images(source, records, preds, handle, mine, config)
        bar = tqdm(mine, desc="sparsity front", unit="layer", disable=not progress or not ranks.is_main)
        for layer in bar:
            # The bar moves with every λ coded, not only with every layer (a layer can take minutes).
            def shown(point: dict, layer: str = layer) -> None:
                bar.set_postfix_str(
                    f"{layer}: λ {point['alpha']:.3g}, l0 {point['l0_ratio']:.3f}, R² {point['r2']:.3f}"
                )

            fronts[layer] = sparsity_front(images, layer, load_dictionary(store, layer), handle, config, shown)
            if ranks.world == 1:
                save_json(path, fronts)
    if ranks.world > 1 and todo:
        for part in ranks.gather(fronts):
            fronts.update(part)
        fronts = {layer: fronts[layer] for layer in config.layers if layer in fronts}
        if ranks.is_main:
            save_json(path, fronts)
    return fronts


def _decompose_shard(store, handle, source, records, preds, encoders, name, bar=None) -> None:
    """Code every layer of one shard's images and write it; ``bar`` (the stage's progress bar)
    advances per batch."""
    config = store.config
    meters = {layer: FidelityMeter(enc.V.shape[1]) for layer, enc in encoders.items()}
    parts: dict[str, list[dict[str, torch.Tensor]]] = {layer: [] for layer in encoders}
    ids: list[int] = []
    offset = 0
    for batch in iter_image_batches(source, records, handle, config.batch_size, config.loader_workers):
        n = len(batch.records)
        _code_batch(handle, batch.pixels, preds[offset : offset + n], encoders, meters, parts)
        offset += n
        ids.extend(r.image_id for r in batch.records)
        if bar is not None:
            bar.update(n)
    tensors: dict[str, torch.Tensor] = {"image_id": torch.tensor(ids, dtype=torch.int64)}
    for layer, chunks in parts.items():
        tensors.update(_joined_rows(layer, chunks))
    save_tensors(store.shard_path("decompose", name), tensors)
    store.mark_shard(
        "decompose", name, {layer: {**meters[layer].state(), "alpha": encoders[layer].alpha} for layer in encoders}
    )


def _code_batch(handle, pixels, preds, encoders, meters, parts) -> None:
    """Code one batch ``pixels (B, 3, S, S)`` at every layer of ``encoders`` and run the model with
    each layer replaced by its reconstruction: codes into ``parts``, figures into ``meters``.

    A capture, then one :meth:`ModelHandle.run_from` per layer (which reuses a stand-in for the
    network below the layer). At the default batch of 16 this is faster on Lite0's four layers
    than the one shared-prefix pass of :meth:`ModelHandle.run_replacing_each`, whose batch grows
    five-fold: the 800-photo stage took 206 s against 224 s, side by side, identical codes
    (``bench/decompose_speed.py`` prints both passes' seconds per image at the run's batch; at a
    batch of 4 the shared pass is the faster one)."""
    with torch.no_grad():
        base, grids = handle.capture(pixels, list(encoders))
        log_probs = base.float().log_softmax(1).cpu()
        for layer, encoder in encoders.items():
            U, recon = code_grid(encoder, grids[layer], meters[layer])
            parts[layer].append(to_sparse_rows(U))
            logits = handle.measuring(list(encoders)).run_from(pixels, layer, recon).cpu()
            meters[layer].add_outputs(logits.argmax(1) == preds, kl_from_original(log_probs, logits))


def _joined_rows(layer: str, chunks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The CSR pieces of a shard's batches (:func:`to_sparse_rows`) as one CSR, keyed by layer."""
    offsets = torch.cumsum(torch.tensor([0] + [int(c["indptr"][-1]) for c in chunks[:-1]]), 0)
    return {
        f"{layer}/indptr": torch.cat(
            [chunks[0]["indptr"][:1]] + [c["indptr"][1:] + o for c, o in zip(chunks, offsets)]
        ),
        f"{layer}/indices": torch.cat([c["indices"] for c in chunks]),
        f"{layer}/values": torch.cat([c["values"] for c in chunks]),
    }


def _recode_stale(store, handle, source, records, preds, encoders, n_shards: int, ranks: Ranks, progress: bool) -> None:
    """Code again, with today's λ, every layer of every shard coded with another (a layer the check
    stepped); each rank its share of those shards."""
    stale: dict[str, list[str]] = {}
    for i in range(n_shards):
        info = store.shard_info("decompose", f"{i:05d}")
        layers = [l for l, enc in encoders.items() if l in info and info[l].get("alpha", enc.alpha) != enc.alpha]
        if layers:
            stale[f"{i:05d}"] = layers
    mine = ranks.mine(sorted(stale))
    for name in tqdm(mine, desc="decompose: check", unit="shard", disable=not progress or not ranks.is_main):
        rows = range(int(name) * SHARD_IMAGES, min((int(name) + 1) * SHARD_IMAGES, len(records)))
        _recode_shard(
            store,
            handle,
            source,
            [records[r] for r in rows],
            preds[list(rows)],
            {layer: encoders[layer] for layer in stale[name]},
            name,
        )
    ranks.barrier()


def _recode_shard(store, handle, source, records, preds, encoders, name) -> None:
    """Replace the codes of ``encoders``' layers in one written shard, and their figures."""
    config = store.config
    path = store.shard_path("decompose", name)
    tensors = load_tensors(path)
    meters = {layer: FidelityMeter(enc.V.shape[1]) for layer, enc in encoders.items()}
    parts: dict[str, list[dict[str, torch.Tensor]]] = {layer: [] for layer in encoders}
    ids, offset = [], 0
    for batch in iter_image_batches(source, records, handle, config.batch_size, config.loader_workers):
        n = len(batch.records)
        _code_batch(handle, batch.pixels, preds[offset : offset + n], encoders, meters, parts)
        offset += n
        ids.extend(r.image_id for r in batch.records)
    if ids != tensors["image_id"].tolist():
        raise RunMismatchError(f"{path} holds other images than its shard now reads: run `gig decompose --force`")
    for layer, chunks in parts.items():
        tensors.update(_joined_rows(layer, chunks))
    save_tensors(path, tensors)
    info = store.shard_info("decompose", name)
    info.update({layer: {**meters[layer].state(), "alpha": encoders[layer].alpha} for layer in encoders})
    store.mark_shard("decompose", name, info)


def encode_pixels(
    store: RunStore, handle: ModelHandle, pixels: torch.Tensor, layers: list[str] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Codes of images that need not be the run's, as the stage codes the run's own: logits
    ``(N, classes)`` and ``{layer: (N, H·W, K)}`` for ``pixels (N, 3, S, S)``, with the run's
    dictionaries, λ and encoder settings (:func:`layer_encoder`). ``layers``: default all of the run's."""
    layers = list(layers or store.config.layers)
    with torch.no_grad():
        logits, grids = handle.capture(pixels.to(handle.device), layers)
    codes = {}
    for layer in layers:
        n, c = grids[layer].shape[:2]
        encoder = layer_encoder(store, layer, handle.device)
        codes[layer] = (
            encoder.encode(grids[layer].permute(0, 2, 3, 1).reshape(-1, c)).reshape(n, -1, encoder.V.shape[0]).cpu()
        )
    return logits.cpu(), codes
