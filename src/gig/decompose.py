"""Stage 4 — rebuild every PFV of a layer from its dictionary with sparse codes.

``u_p = argmin_u ½‖x_p − uV‖² + λ‖u‖₁`` for every position ``p`` of every image (optionally
``u ≥ 0``), solved by :class:`gig.lasso.LassoEncoder` (exact LARS on CPU, batched FISTA to a
duality-gap certificate on GPU), then by default refitted by least squares on the selected
support (the relaxed Lasso, ``debias``). ``coder: omp`` codes by orthogonal matching pursuit
instead (:class:`gig.omp.OMPEncoder`, λ its correlation stop; not the paper's coder).

λ is chosen per layer from the layer's **sparsity–fidelity front**: on ``front_images`` images,
every position is coded along a descending λ path (λ_max·2^(−j), each λ resuming from the codes
of the one above) and, at each λ, the relative error, R², l0 ratio and the model's top-1
agreement (the layer replaced by its reconstruction; several λ per forward, the prefix shared)
are measured. The default rule keeps the sparsest codes (largest λ) with R² ≥ ``min_r2`` and
agreement ≥ ``min_top1_agreement``, refined between grid points to 2^(1/16) in λ;
``target_rel_error`` selects the largest λ whose relative error meets it instead. The front is
saved (``decompose/front.json``), drawn in the report and printed by ``gig inspect``.

Per layer the stage then codes every image (one forward per batch codes every layer and runs the
model with each replaced: :meth:`ModelHandle.run_replacing_each`) and reports over all images:
relative L2 error ``‖X − X̃‖_F / ‖X‖_F``, R² (against the mean PFV), l0 ratio (share of non-zero
coefficients), and the top-1 agreement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .collect import SHARD_IMAGES, iter_image_batches, load_images
from .concepts import load_dictionary
from .config import Config
from .distributed import Ranks, ShardLoop, sharded_stage
from .errors import RunMismatchError
from .hooks import ModelHandle
from .images import ImageSource
from .lasso import LassoEncoder, lambda_max
from .omp import OMPEncoder
from .store import RunStore, load_json, open_tensors, save_json, save_tensors

#: The λ path of the front: λ_max · 2^(−j), j = 1 … FRONT_POINTS.
FRONT_POINTS = 20
#: Most reconstructions per image in one agreement forward (the batch grows by this factor
#: after the layer).
AGREEMENT_BLOCK = 8
#: Grid points measured past the first that meets the rule (the front beyond the choice).
POINTS_PAST_CHOICE = 1
#: Rounds of refinement between the chosen grid point and the next larger λ, each of
#: ``REFINE_POINTS`` λ evenly spaced in log λ (two rounds of three: λ to 2^(1/16), as four
#: bisection steps, in two blocks of forwards instead of four).
REFINE_ROUNDS = 2
REFINE_POINTS = 3
#: The walk stops, even where the rule is not met, once this share of the concepts is active ...
DENSE_STOP = 0.9
#: ... or once the reconstruction is exact to this R² (smaller λ cannot change anything).
EXACT_R2 = 0.9999


def encoder_for(config: Config, dictionary: torch.Tensor, alpha: float,
                device: str | torch.device | None = None) -> LassoEncoder | OMPEncoder:
    """The run's encoder for one layer: coder (Lasso or OMP), solver, sign constraint, debiasing
    and tolerance from the config. Every consumer of a run's codes (this stage, the evaluation)
    builds it here."""
    if config.coder == "omp":
        return OMPEncoder(dictionary, alpha, device=device)
    return LassoEncoder(dictionary, alpha, config.nonnegative, max_iter=config.lasso_max_iter,
                        tol=config.lasso_tol, device=device, solver=config.lasso_solver, debias=config.debias,
                        unit_atoms=config.unit_atoms)


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
    return (f"largest λ (sparsest codes) with R² ≥ {config.min_r2} and top-1 agreement ≥ "
            f"{config.min_top1_agreement}{coder}")


def meets_rule(point: dict, config: Config) -> bool:
    """Whether a front point satisfies the run's λ rule."""
    if config.target_rel_error is not None:
        return point["rel_error"] <= config.target_rel_error
    return point["r2"] >= config.min_r2 and point["top1_agreement"] >= config.min_top1_agreement


def alpha_for_l0(X: torch.Tensor, V: torch.Tensor, target_l0: float,
                 make_encoder, n_bisect: int = 16) -> tuple[float, float]:
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
    (``(B, 3, S, S)`` and ``(B, C, H, W)``), and the model's predictions ``preds (N,)``."""

    pixels: list[torch.Tensor]
    grids: dict[str, list[torch.Tensor]]
    preds: torch.Tensor


def load_front_images(source: ImageSource, records: list, preds: torch.Tensor, handle: ModelHandle,
                      layers: list[str], config: Config) -> FrontImages:
    """Capture ``layers`` on the first ``front_images`` of ``records`` in a seeded random order."""
    g = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(records), generator=g)[: config.front_images].sort().values.tolist()
    chosen = [records[i] for i in order]
    pixels, grids, kept = [], {layer: [] for layer in layers}, []
    by_id = {r.image_id: p for r, p in zip(records, preds.tolist())}
    for batch in iter_image_batches(source, chosen, handle, config.batch_size, config.loader_workers):
        with torch.no_grad():
            _, captured = handle.capture(batch.pixels, layers)
        pixels.append(batch.pixels)
        for layer in layers:
            grids[layer].append(captured[layer])
        kept.extend(by_id[r.image_id] for r in batch.records)
    return FrontImages(pixels, grids, torch.tensor(kept, dtype=torch.long))


def code_grid(encoder: LassoEncoder | OMPEncoder, grid: torch.Tensor, meter: "FidelityMeter",
              init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``U (B·H·W, K)`` of every position of ``grid (B, C, H, W)`` (row-major positions)
    and its reconstruction in grid form ``(B, C, H, W)``; both are added to ``meter``."""
    b, c, h, w = grid.shape
    X = grid.permute(0, 2, 3, 1).reshape(-1, c)
    U = encoder.encode(X, init)
    X_hat = U @ encoder.V
    meter.add(X, X_hat, U)
    return U, X_hat.reshape(b, h, w, c).permute(0, 3, 1, 2)


def code_front_point(encoder: LassoEncoder | OMPEncoder, images: FrontImages, layer: str,
                     init: list[torch.Tensor] | None = None) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]]:
    """Code every position of ``images`` at ``layer``: the fidelity figures (``alpha``,
    ``rel_error``, ``r2``, ``l0_ratio``; the agreement comes from :func:`top1_agreements`), the
    codes per batch ``(B·H·W, K)`` (warm starts for the next λ) and the reconstructions per batch
    ``(B, C, H, W)``. ``init``: codes per batch at a larger λ (see ``encode``)."""
    meter = FidelityMeter(encoder.V.shape[1])
    codes, recons = [], []
    for i, grid in enumerate(images.grids[layer]):
        U, recon = code_grid(encoder, grid, meter, None if init is None else init[i])
        codes.append(U)
        recons.append(recon)
    figures = meter.result()
    for unmeasured in ("n_positions", "top1_agreement"):
        figures.pop(unmeasured)
    return {"alpha": encoder.alpha, **figures}, codes, recons


def top1_agreements(images: FrontImages, layer: str, handle: ModelHandle,
                    recons: list[list[torch.Tensor]]) -> list[float]:
    """The model's top-1 agreement with ``layer`` replaced by each of ``m`` reconstructions
    (``recons[j]``: per batch ``(B, C, H, W)``, as :func:`code_front_point` gives them): one
    forward per batch and up to ``AGREEMENT_BLOCK`` reconstructions, every image's replacements
    sharing its prefix (:meth:`ModelHandle.run_from`)."""
    agree = torch.zeros(len(recons), dtype=torch.long)
    for start in range(0, len(recons), AGREEMENT_BLOCK):
        block, offset = recons[start : start + AGREEMENT_BLOCK], 0
        for i, pixels in enumerate(images.pixels):
            grids = torch.stack([r[i] for r in block], dim=1).flatten(0, 1)  # image-major
            with torch.no_grad():
                logits = handle.run_from(pixels, layer, grids)
            b = pixels.shape[0]
            preds = images.preds[offset : offset + b]
            offset += b
            hits = logits.argmax(1).cpu().reshape(b, len(block)) == preds[:, None]
            agree[start : start + len(block)] += hits.sum(0)
    return (agree.double() / max(images.preds.numel(), 1)).tolist()


class _FrontWalk:
    """The points of one layer's front, coded one λ at a time (each resuming from the codes of
    the λ above) and measured for agreement in blocks (one forward per batch and block)."""

    def __init__(self, path, images: FrontImages, layer: str, handle: ModelHandle, config: Config):
        self.path, self.images, self.layer, self.handle, self.config = path, images, layer, handle, config
        self.points: list[dict] = []
        self.codes: list[list[dict[str, torch.Tensor]]] = []  # per point, per batch: CSR (to_sparse_rows)
        self._pending: list[tuple[dict, list[torch.Tensor]]] = []

    def code(self, alpha: float, above: int | None) -> dict:
        """Code λ = ``alpha``, resuming from point ``above`` (a larger λ) where given; its
        agreement waits for :meth:`measure`."""
        init = None if above is None else [from_sparse_rows(**c, k=self.path.V.shape[0]) for c in self.codes[above]]
        point, codes, recons = code_front_point(self.path.with_alpha(alpha), self.images, self.layer, init)
        self.points.append(point)
        self.codes.append([to_sparse_rows(U) for U in codes])
        self._pending.append((point, recons))
        return point

    def measure(self) -> None:
        """Top-1 agreement of every point coded since the last call, in one block."""
        if not self._pending:
            return
        agreements = top1_agreements(self.images, self.layer, self.handle, [r for _, r in self._pending])
        for (point, _), agreement in zip(self._pending, agreements):
            point["top1_agreement"] = agreement
            point["meets"] = meets_rule(point, self.config)
        self._pending = []


def _may_meet(point: dict, config: Config) -> bool:
    """Whether a point without its agreement yet could meet the rule."""
    if config.target_rel_error is not None:
        return point["rel_error"] <= config.target_rel_error
    return point["r2"] >= config.min_r2


def sparsity_front(images: FrontImages, layer: str, V: torch.Tensor, handle: ModelHandle, config: Config,
                   ) -> dict:
    """The layer's front and the λ its rule picks.

    Walks λ down the grid λ_max·2^(−j), coding each λ from the codes of the one above (a warm
    start; OMP resumes its pursuit), until the first point that may meet the rule by its R² (or
    relative error) and ``POINTS_PAST_CHOICE`` more; then measures their top-1 agreements in one
    block, and goes on in blocks of ``1 + POINTS_PAST_CHOICE`` points until the first that meets
    the rule has ``POINTS_PAST_CHOICE`` points after it (or the codes turn dense or exact without
    meeting it). Then ``REFINE_ROUNDS`` rounds of ``REFINE_POINTS`` λ evenly spaced in log λ
    between that point and the failing one above it, each round one block, narrow the choice to
    the largest λ that meets the rule. Returns ``{"points": [...] (descending λ), "alpha", "met",
    "rule"}``; each point is ``{alpha, rel_error, r2, l0_ratio, top1_agreement, meets}``.
    Where no λ meets the rule, the most faithful point measured is chosen and ``met`` is False.
    """
    device = handle.device
    V = V.to(device)
    rows = torch.cat([g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]) for g in images.grids[layer]])
    atoms = V / V.norm(dim=1, keepdim=True).clamp_min(1e-12) if lambda_in_unit_atoms(config) else V
    top = lambda_max(rows.to(device), atoms, config.nonnegative)  # the penalty's units
    walk = _FrontWalk(encoder_for(config, V, top, device), images, layer, handle, config)  # one Gram matrix
    first_pass, reached, want = None, None, None
    for j in range(1, FRONT_POINTS + 1):
        point = walk.code(top * 2.0 ** -j, j - 2 if j > 1 else None)
        last = j - 1
        if reached is None and _may_meet(point, config):
            reached, want = last, last + POINTS_PAST_CHOICE  # measure up to here at once
        stop = j == FRONT_POINTS or point["l0_ratio"] > DENSE_STOP or point["r2"] >= EXACT_R2
        if not stop and (want is None or last < want):
            continue
        walk.measure()
        first_pass = next((i for i, p in enumerate(walk.points) if p["meets"]), None)
        if first_pass is not None:
            if last - first_pass >= POINTS_PAST_CHOICE:
                break
            want = first_pass + POINTS_PAST_CHOICE
        elif stop:
            break  # dense or exact codes that still miss the rule: it cannot be met on this basis
        else:
            want = last + 1 + POINTS_PAST_CHOICE
    walk.measure()
    points = walk.points
    if first_pass is None:
        best = max(points, key=lambda p: (p["r2"], p["top1_agreement"]))
        return {"points": points, "alpha": best["alpha"], "met": False, "rule": rule_text(config)}
    chosen, above = points[first_pass], first_pass - 1
    if above >= 0:  # narrow the choice between the failing λ above and the passing one
        hi, lo = points[above]["alpha"], chosen["alpha"]
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
                lo, chosen = refined[passing]["alpha"], refined[passing]
                if passing:
                    hi, above = refined[passing - 1]["alpha"], start + passing - 1
    points.sort(key=lambda p: -p["alpha"])
    return {"points": points, "alpha": chosen["alpha"], "met": True, "rule": rule_text(config)}


class FidelityMeter:
    """Accumulates reconstruction figures over chunks of positions."""

    def __init__(self, channels: int):
        self.sse = 0.0
        self.sum_sq = 0.0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.n = 0
        self.nnz = 0
        self.n_coef = 0
        self.agree = 0
        self.n_images = 0

    def add(self, X: torch.Tensor, X_hat: torch.Tensor, U: torch.Tensor) -> None:
        self.sse += float(((X - X_hat).double() ** 2).sum())
        self.sum_sq += float((X.double() ** 2).sum())
        self.sum += X.double().sum(0).cpu()
        self.n += X.shape[0]
        self.nnz += int((U != 0).sum())
        self.n_coef += U.numel()

    _FIELDS = ("sse", "sum_sq", "n", "nnz", "n_coef", "agree", "n_images")

    def state(self) -> dict:
        """JSON-able running totals (kept per shard)."""
        return {**{f: getattr(self, f) for f in self._FIELDS}, "sum": self.sum.tolist()}

    @classmethod
    def merge(cls, states: list[dict]) -> "FidelityMeter":
        meter = cls(len(states[0]["sum"]))
        for st in states:
            for f in cls._FIELDS:
                setattr(meter, f, getattr(meter, f) + st[f])
            meter.sum += torch.tensor(st["sum"], dtype=torch.float64)
        return meter

    def result(self) -> dict[str, float]:
        sst = self.sum_sq - float((self.sum ** 2).sum()) / max(self.n, 1)
        return {
            "rel_error": math.sqrt(self.sse / max(self.sum_sq, 1e-12)),
            "r2": 1.0 - self.sse / max(sst, 1e-12),
            "l0_ratio": self.nnz / max(self.n_coef, 1),
            "top1_agreement": self.agree / max(self.n_images, 1),
            "n_positions": self.n,
        }


def to_sparse_rows(U: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense ``(P, K)`` → CSR pieces ``indptr (P+1,)``, ``indices``, ``values`` (row-major order)."""
    U = U.cpu()  # one copy per batch: the pieces go to disk
    rows, cols = U.nonzero(as_tuple=True)
    indptr = torch.zeros(U.shape[0] + 1, dtype=torch.int64)
    indptr[1:] = torch.bincount(rows, minlength=U.shape[0]).cumsum(0)
    return {"indptr": indptr, "indices": cols.int(), "values": U[rows, cols].float()}


def from_sparse_rows(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """CSR pieces → dense ``(P, K)``."""
    n = indptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n), (indptr[1:] - indptr[:-1]).long())
    dense = torch.zeros(n, k, dtype=values.dtype)
    dense[rows, indices.long()] = values
    return dense


def decompose(store: RunStore, handle: ModelHandle, source: ImageSource, progress: bool = True,
              ranks: Ranks | None = None) -> None:
    """Stage 4 into ``store/decompose``: sparse codes of all positions, shards of images per layer.
    Under torchrun each rank measures the fronts of its share of the layers and all ranks gather
    them (every rank then codes with the same λ); each rank codes its share of the shards."""
    ranks = ranks or Ranks()
    store.require("concepts")
    config = store.config
    used = load_images(store)["images"]
    by_id = {r.image_id: r for r in source.records}
    records = [by_id[i["image_id"]] for i in used]
    preds = torch.tensor([i["pred"] for i in used])
    with sharded_stage(store, "decompose", ranks) as summary:
        out = store.stage_dir("decompose")
        fronts = _fronts(store, handle, source, records, preds, progress, ranks)  # the same on every rank
        encoders = {layer: encoder_for(config, load_dictionary(store, layer), fronts[layer]["alpha"], handle.device)
                    for layer in config.layers}
        summary["alpha"] = {layer: enc.alpha for layer, enc in encoders.items()}
        summary["rule_met"] = {layer: fronts[layer]["met"] for layer in config.layers}
        summary["solver"] = {layer: enc.solver_ for layer, enc in encoders.items()}
        loop = ShardLoop(store, "decompose", ranks, range(len(records)), SHARD_IMAGES, progress)
        for name, rows in loop:
            _decompose_shard(store, handle, source, [records[r] for r in rows], preds[rows], encoders, name)
        if not ranks.is_main:
            return
        # Fidelity figures: summed over shards, so a resumed run reports the same numbers.
        figures = {}
        for layer in config.layers:
            meter = FidelityMeter.merge([store.shard_info("decompose", f"{i:05d}")[layer] for i in range(loop.n_shards)])
            figures[layer] = {**meter.result(), "K": int(encoders[layer].V.shape[0]), "alpha": encoders[layer].alpha}
        save_json(out / "fidelity.json", figures)
        summary["fidelity"] = figures


def _fronts(store: RunStore, handle: ModelHandle, source: ImageSource, records: list, preds: torch.Tensor,
            progress: bool, ranks: Ranks | None = None) -> dict[str, dict]:
    """Every layer's :func:`sparsity_front`, saved to ``decompose/front.json`` as soon as it is
    measured (a resumed stage reuses it: the stage directory is wiped when settings change).

    Under torchrun the layers still to measure are dealt out round-robin, each rank measures its
    own (a front is the same whichever process measures it), and every rank gets all of them."""
    ranks = ranks or Ranks()
    config = store.config
    path = store.stage_dir("decompose") / "front.json"
    fronts = load_json(path) if path.is_file() else {}
    todo = [layer for layer in config.layers if layer not in fronts]
    mine = ranks.mine(todo)
    if mine:
        images = load_front_images(source, records, preds, handle, mine, config)
        for layer in tqdm(mine, desc="sparsity front", disable=not progress or not ranks.is_main):
            fronts[layer] = sparsity_front(images, layer, load_dictionary(store, layer), handle, config)
            if ranks.world == 1:
                save_json(path, fronts)
    if ranks.world > 1 and todo:
        for part in ranks.gather(fronts):
            fronts.update(part)
        fronts = {layer: fronts[layer] for layer in config.layers}
        if ranks.is_main:
            save_json(path, fronts)
    return fronts


def load_front(store: RunStore) -> dict[str, dict]:
    """``{layer: {"points": [...], "alpha", "met", "rule"}}`` of a run's decompose stage
    (see :func:`sparsity_front`); empty for runs made before fronts were measured."""
    path = store.root / "decompose" / "front.json"
    return load_json(path) if path.is_file() else {}


def _decompose_shard(store, handle, source, records, preds, encoders, name) -> None:
    config = store.config
    meters = {layer: FidelityMeter(enc.V.shape[1]) for layer, enc in encoders.items()}
    parts: dict[str, list[dict[str, torch.Tensor]]] = {layer: [] for layer in encoders}
    ids: list[int] = []
    offset = 0
    for batch in iter_image_batches(source, records, handle, config.batch_size, config.loader_workers):
        n = len(batch.records)
        batch_preds = preds[offset : offset + n]
        offset += n
        ids.extend(r.image_id for r in batch.records)

        def code(layer: str, grid: torch.Tensor) -> torch.Tensor:
            """The layer's codes (kept) and its reconstruction, which replaces it."""
            U, recon = code_grid(encoders[layer], grid, meters[layer])
            parts[layer].append(to_sparse_rows(U))
            return recon

        with torch.no_grad():
            # One pass codes every layer and runs the model with each replaced (shared prefixes).
            _, replaced = handle.run_replacing_each(batch.pixels, list(encoders), code)
        for layer, logits in replaced.items():
            meters[layer].agree += int((logits.argmax(1).cpu() == batch_preds).sum())
            meters[layer].n_images += n
    tensors: dict[str, torch.Tensor] = {"image_id": torch.tensor(ids, dtype=torch.int64)}
    info = {}
    for layer, chunks in parts.items():
        # Concatenate the CSR pieces of the batches into one CSR for the shard.
        offsets = torch.cumsum(torch.tensor([0] + [int(c["indptr"][-1]) for c in chunks[:-1]]), 0)
        tensors[f"{layer}/indptr"] = torch.cat(
            [chunks[0]["indptr"][:1]] + [c["indptr"][1:] + o for c, o in zip(chunks, offsets)])
        tensors[f"{layer}/indices"] = torch.cat([c["indices"] for c in chunks])
        tensors[f"{layer}/values"] = torch.cat([c["values"] for c in chunks])
        info[layer] = meters[layer].state()
    save_tensors(store.shard_path("decompose", name), tensors)
    store.mark_shard("decompose", name, info)


class CodeReader:
    """Reads the sparse codes of one layer back, per image: ``codes(image_id) → U (H·W, K)``.

    Lazy: opening reads each shard's image ids and row pointers only; ``codes`` then reads just
    that image's rows (safetensors slices), so a reader over a large run holds no codes in memory.
    """

    def __init__(self, store: RunStore, layer: str):
        self.layer = layer
        self.K = int(load_dictionary(store, layer).shape[0])
        self._index: dict[int, tuple[str, torch.Tensor, int, int]] = {}
        shard_dir = store.root / "decompose" / "shards"
        paths = sorted(shard_dir.glob("*.safetensors"))
        if not paths:
            raise RunMismatchError(f"no decomposition shards in {shard_dir}: run `gig decompose` first")
        for path in paths:
            with open_tensors(path) as f:
                if f"{layer}/indptr" not in f.keys():
                    raise RunMismatchError(f"{path} holds no codes of layer {layer!r}: run `gig decompose` again")
                ids = f.get_tensor("image_id").tolist()
                indptr = f.get_tensor(f"{layer}/indptr")
            positions = (indptr.numel() - 1) // max(len(ids), 1)
            for j, image_id in enumerate(ids):
                self._index[int(image_id)] = (str(path), indptr, j * positions, positions)

    def codes(self, image_id: int) -> torch.Tensor:
        """Dense coefficients ``(H·W, K)`` of one image (row-major positions)."""
        if image_id not in self._index:
            raise RunMismatchError(f"no codes of layer {self.layer!r} for image {image_id}")
        path, indptr, start, n = self._index[image_id]
        ptr = indptr[start : start + n + 1]
        lo, hi = int(ptr[0]), int(ptr[-1])
        with open_tensors(path) as f:
            indices = f.get_slice(f"{self.layer}/indices")[lo:hi]
            values = f.get_slice(f"{self.layer}/values")[lo:hi]
        return from_sparse_rows(ptr - lo, indices, values, self.K)

    def image_ids(self) -> list[int]:
        return sorted(self._index)


def run_alpha(store: RunStore, layer: str) -> float:
    """The λ the run's decompose stage coded ``layer`` with (``decompose/fidelity.json``)."""
    fidelity = load_fidelity(store)
    if layer not in fidelity or "alpha" not in fidelity[layer]:
        raise RunMismatchError(f"no λ recorded for layer {layer!r} in {store.root / 'decompose' / 'fidelity.json'}")
    return float(fidelity[layer]["alpha"])


def encode_pixels(store: RunStore, handle: ModelHandle, pixels: torch.Tensor,
                  layers: list[str] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Codes of images that need not be the run's, as the stage codes the run's own: logits
    ``(N, classes)`` and ``{layer: (N, H·W, K)}`` for ``pixels (N, 3, S, S)``, with the run's
    dictionaries, λ and encoder settings (:func:`encoder_for`). ``layers``: default all of the run's."""
    layers = list(layers or store.config.layers)
    with torch.no_grad():
        logits, grids = handle.capture(pixels.to(handle.device), layers)
    codes = {}
    for layer in layers:
        n, c = grids[layer].shape[:2]
        encoder = encoder_for(store.config, load_dictionary(store, layer), run_alpha(store, layer), handle.device)
        codes[layer] = encoder.encode(grids[layer].permute(0, 2, 3, 1).reshape(-1, c)).reshape(n, -1, encoder.V.shape[0]).cpu()
    return logits.cpu(), codes


def load_fidelity(store: RunStore) -> dict:
    return load_json(store.root / "decompose" / "fidelity.json")

