"""Stage 4 — rebuild every PFV of a layer from its dictionary with Lasso.

``u_p = argmin_u ½‖x_p − Vᵀu‖² + λ‖u‖₁`` for every position ``p`` of every image (optionally
``u ≥ 0``). :class:`LassoEncoder` solves all positions at once with FISTA on the Gram matrix
(one batched tensor operation per iteration instead of one solver call per position); its
objective is tested against scikit-learn's ``Lasso``. λ is picked per layer on a calibration set
(the sampled PFVs) by bisection in log space, to reach a target relative reconstruction error.

Per layer the stage reports: relative L2 error ``‖X − X̃‖_F / ‖X‖_F``, R² (against the mean PFV),
l0 ratio (share of non-zero coefficients), and the model's top-1 agreement when that layer's
output is replaced by its reconstruction.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .collect import SHARD_IMAGES, iter_image_batches, load_images, load_samples
from .concepts import load_dictionary
from .distributed import Ranks, sharded_stage
from .errors import RunMismatchError
from .hooks import ModelHandle
from .images import ImageSource
from .store import RunStore, load_json, load_tensors, save_json, save_tensors


class LassoEncoder:
    """Batched Lasso coding against a fixed dictionary ``V (K, C)``.

    ``encode(X (P, C)) → U (P, K)`` minimising ``½‖x − uV‖² + λ‖u‖₁`` per row.
    """

    def __init__(self, dictionary: torch.Tensor, alpha: float, nonnegative: bool = False,
                 max_iter: int = 300, tol: float = 1e-5, chunk: int = 8192, device: str | torch.device | None = None):
        self.V = dictionary.float().to(device) if device is not None else dictionary.float()
        self.alpha = float(alpha)
        self.nonnegative = nonnegative
        self.max_iter = max_iter
        self.tol = tol
        self.chunk = chunk
        self.gram_ = self.V @ self.V.T
        # Lipschitz constant of the smooth part's gradient: the Gram matrix's largest eigenvalue.
        self.lipschitz_ = float(torch.linalg.eigvalsh(self.gram_.double()).max().clamp_min(1e-12))

    def encode(self, X: torch.Tensor) -> torch.Tensor:
        X = X.float().to(self.V.device)
        return torch.cat([self._fista(X[s : s + self.chunk]) for s in range(0, X.shape[0], self.chunk)]) \
            if X.shape[0] else X.new_zeros(0, self.V.shape[0])

    def _shrink(self, z: torch.Tensor, threshold: float) -> torch.Tensor:
        if self.nonnegative:
            return (z - threshold).clamp_min(0)
        return torch.sign(z) * (z.abs() - threshold).clamp_min(0)

    def _gradient(self, y: torch.Tensor, X: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # (yV − x)Vᵀ: through the Gram matrix when K ≤ 2C (P·K² flops), else through V (2·P·K·C).
        if self.V.shape[0] <= 2 * self.V.shape[1]:
            return y @ self.gram_ - b
        return (y @ self.V - X) @ self.V.T

    def _fista(self, X: torch.Tensor) -> torch.Tensor:
        step = 1.0 / self.lipschitz_
        b = X @ self.V.T  # (P, K)
        u = torch.zeros_like(b)
        y = u
        t = 1.0
        for _ in range(self.max_iter):
            u_next = self._shrink(y - step * self._gradient(y, X, b), self.alpha * step)
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            y = u_next + ((t - 1) / t_next) * (u_next - u)
            delta = (u_next - u).abs().max()
            u, t = u_next, t_next
            if float(delta) <= self.tol * max(float(u.abs().max()), 1e-12):
                break
        return u

    def objective(self, X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """Per-row objective ``½‖x − uV‖² + λ‖u‖₁``, shape ``(P,)``."""
        return 0.5 * ((X - U @ self.V) ** 2).sum(1) + self.alpha * U.abs().sum(1)


def relative_error(X: torch.Tensor, X_hat: torch.Tensor) -> float:
    return float((X - X_hat).norm() / X.norm().clamp_min(1e-12))


def calibrate_alpha(X: torch.Tensor, V: torch.Tensor, target_rel_error: float, nonnegative: bool = False,
                    max_iter: int = 300, n_bisect: int = 14) -> tuple[float, float]:
    """λ giving ``relative_error ≈ target`` on calibration PFVs ``X (N, C)``; returns ``(λ, error)``.

    The error grows with λ, so bisection in log λ between a λ that is too small (error below
    target) and one large enough to zero most coefficients.
    """
    scale = float((X @ V.T).abs().max())  # λ ≥ max |Vx| zeroes every coefficient
    lo, hi = scale * 1e-6, scale
    best = (lo, relative_error(X, LassoEncoder(V, lo, nonnegative, max_iter).encode(X) @ V))
    if best[1] >= target_rel_error:  # even tiny λ cannot reach it (too few concepts)
        return best
    for _ in range(n_bisect):
        mid = math.sqrt(lo * hi)
        err = relative_error(X, LassoEncoder(V, mid, nonnegative, max_iter).encode(X) @ V)
        if err <= target_rel_error:
            lo, best = mid, (mid, err)
        else:
            hi = mid
    return best


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
    Under torchrun rank 0 calibrates λ and shares it; each rank codes its share of the shards."""
    ranks = ranks or Ranks()
    store.require("concepts")
    config = store.config
    used = load_images(store)["images"]
    by_id = {r.image_id: r for r in source.records}
    records = [by_id[i["image_id"]] for i in used]
    preds = torch.tensor([i["pred"] for i in used])
    with sharded_stage(store, "decompose", ranks) as summary:
        out = store.stage_dir("decompose")
        calibrated = _calibrate(store, handle, progress) if ranks.is_main else None
        calibrated = ranks.share(calibrated)  # one λ per layer for every rank
        encoders = {}
        for layer in config.layers:
            alpha, err = calibrated[layer]
            encoders[layer] = LassoEncoder(load_dictionary(store, layer), alpha, config.nonnegative,
                                           config.lasso_max_iter, device=handle.device)
            summary.setdefault("alpha", {})[layer] = alpha
            summary.setdefault("calibration_rel_error", {})[layer] = err
        mine, n_shards = ranks.shards(range(len(records)), SHARD_IMAGES)
        bar = tqdm(total=sum(len(r) for _, r in mine), desc="decompose", unit="img",
                   disable=not progress or not ranks.is_main)
        for name, rows in mine:
            if not store.shard_done("decompose", name):
                _decompose_shard(store, handle, source, [records[r] for r in rows], preds[rows], encoders, name)
            bar.update(len(rows))
        bar.close()
        ranks.barrier()  # every rank's shards written
        if not ranks.is_main:
            return
        # Fidelity figures: summed over shards, so a resumed run reports the same numbers.
        figures = {}
        for layer in config.layers:
            meter = FidelityMeter.merge([store.shard_info("decompose", f"{i:05d}")[layer] for i in range(n_shards)])
            figures[layer] = {**meter.result(), "K": int(encoders[layer].V.shape[0]), "alpha": encoders[layer].alpha}
        save_json(out / "fidelity.json", figures)
        summary["fidelity"] = figures


def _calibrate(store: RunStore, handle: ModelHandle, progress: bool) -> dict[str, tuple[float, float]]:
    """``{layer: (λ, relative error)}`` calibrated on the layer's sampled PFVs."""
    config = store.config
    out = {}
    for layer in tqdm(config.layers, desc="calibrate λ", disable=not progress):
        V = load_dictionary(store, layer)
        calib = load_samples(store, layer)["pfv"]
        g = torch.Generator().manual_seed(config.seed)
        calib = calib[torch.randperm(calib.shape[0], generator=g)[: config.calibration_size]]
        out[layer] = calibrate_alpha(calib.to(handle.device), V.to(handle.device), config.target_rel_error,
                                     config.nonnegative, config.lasso_max_iter)
    return out


def _decompose_shard(store, handle, source, records, preds, encoders, name) -> None:
    config = store.config
    meters = {layer: FidelityMeter(enc.V.shape[1]) for layer, enc in encoders.items()}
    parts: dict[str, list[dict[str, torch.Tensor]]] = {layer: [] for layer in encoders}
    ids: list[int] = []
    offset = 0
    for batch in iter_image_batches(source, records, handle, config.batch_size, config.loader_workers):
        with torch.no_grad():
            _, grids = handle.capture(batch.pixels, config.layers)
            n = len(batch.records)
            batch_preds = preds[offset : offset + n]
            offset += n
            ids.extend(r.image_id for r in batch.records)
            for layer, enc in encoders.items():
                grid = grids[layer]
                b, c, h, w = grid.shape
                X = grid.permute(0, 2, 3, 1).reshape(-1, c)
                U = enc.encode(X)
                X_hat = U @ enc.V
                meters[layer].add(X, X_hat, U)
                recon = X_hat.reshape(b, h, w, c).permute(0, 3, 1, 2)
                logits = handle.run_from(batch.pixels, layer, recon)
                meters[layer].agree += int((logits.argmax(1).cpu() == batch_preds).sum())
                meters[layer].n_images += b
                parts[layer].append(to_sparse_rows(U))
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
    """Reads the sparse codes of one layer back, per image: ``codes(image_id) → U (H·W, K)``."""

    def __init__(self, store: RunStore, layer: str):
        self.layer = layer
        self.K = int(load_dictionary(store, layer).shape[0])
        self._index: dict[int, tuple[dict[str, torch.Tensor], int, int]] = {}
        shard_dir = store.root / "decompose" / "shards"
        paths = sorted(shard_dir.glob("*.safetensors"))
        if not paths:
            raise RunMismatchError(f"no decomposition shards in {shard_dir}: run `gig decompose` first")
        for path in paths:
            t = load_tensors(path)
            piece = {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith(layer + "/")}
            ids = t["image_id"].tolist()
            positions = (piece["indptr"].numel() - 1) // max(len(ids), 1)
            for j, image_id in enumerate(ids):
                self._index[image_id] = (piece, j * positions, positions)

    def codes(self, image_id: int) -> torch.Tensor:
        """Dense coefficients ``(H·W, K)`` of one image (row-major positions)."""
        piece, start, n = self._index[image_id]
        ptr = piece["indptr"][start : start + n + 1]
        lo, hi = int(ptr[0]), int(ptr[-1])
        return from_sparse_rows(ptr - lo, piece["indices"][lo:hi], piece["values"][lo:hi], self.K)

    def image_ids(self) -> list[int]:
        return sorted(self._index)


def load_fidelity(store: RunStore) -> dict:
    return load_json(store.root / "decompose" / "fidelity.json")

