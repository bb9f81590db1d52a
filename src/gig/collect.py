"""Stage 1 — collect pointwise feature vectors (PFVs), sampled by their contribution to the logit.

For each image and layer, each position ``p`` is scored by ``max(0, Σ_c x[c,p] · ∂z_t/∂x[c,p])``
(gradient × activation summed over channels, clipped at 0; ``z_t`` the target-class logit), and
``samples_per_image`` positions are drawn without replacement with probability proportional to
the score (uniform when every score is 0). The draw of image ``i`` at layer ``l`` uses its own
generator seeded by ``(seed, i, l)``, so it does not depend on batching or on resuming.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .artefacts import images_path, load_images, load_samples, samples_path  # noqa: F401  (re-exported: moved to gig.artefacts)
from .config import Config, resolve_samples_per_image
from .distributed import Ranks, ShardLoop, sharded_stage
from .errors import ConfigError, InputError
from .hooks import ModelHandle
from .images import ImageRecord, ImageSource, skip_reason, used_records
from .store import RunStore, load_tensors, save_json, save_tensors

SHARD_IMAGES = 64


@dataclass
class ImageBatch:
    records: list[ImageRecord]
    pixels: torch.Tensor  # (N, 3, S, S), preprocessed


def iter_image_batches(
    source: ImageSource,
    records: list[ImageRecord],
    handle: ModelHandle,
    batch_size: int,
    workers: int = 0,
) -> Iterator[ImageBatch]:
    """Load, preprocess and batch images in order; unreadable ones are skipped (``source.skipped``).

    ``workers > 0`` decodes and preprocesses in that many DataLoader processes, ahead of the
    compute that consumes the batches (on a GPU, decoding would otherwise idle it); the batches
    are the same as with ``workers=0``."""
    pending: list[tuple[ImageRecord, torch.Tensor]] = []
    for record, pixels in _decoded(source, records, handle, workers):
        pending.append((record, pixels))
        if len(pending) == batch_size:
            yield ImageBatch([r for r, _ in pending], torch.stack([t for _, t in pending]))
            pending = []
    if pending:
        yield ImageBatch([r for r, _ in pending], torch.stack([t for _, t in pending]))


class _Decode(torch.utils.data.Dataset):
    """Record ``i`` → ``(i, pixels (3, S, S) or None, why it failed or None)`` in a worker."""

    def __init__(self, source: ImageSource, records: list[ImageRecord], preprocess):
        self.source, self.records, self.preprocess = source, records, preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(self.source.load(self.records[i])), None
        except Exception as exc:  # noqa: BLE001 - a bad file must never end the run
            return i, None, skip_reason(exc)


def _decoded(source, records, handle, workers: int) -> Iterator[tuple[ImageRecord, torch.Tensor]]:
    if workers <= 0 or len(records) <= 1:
        for record, image in source.iter_loaded(records):
            yield record, handle.bundle.preprocess(image)
        return
    loader = torch.utils.data.DataLoader(
        _Decode(source, records, handle.bundle.preprocess),
        batch_size=None,
        num_workers=min(workers, len(records)),
        prefetch_factor=4,
    )
    for i, pixels, reason in loader:  # in record order
        if pixels is None:
            source.note_skipped(records[i], reason)
        else:
            yield records[i], pixels


def contribution_scores(grids: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``(N, C, H, W)`` activations and gradients → ``(N, H·W)`` clipped contribution scores."""
    return {name: (grids[name] * grads[name]).sum(dim=1).clamp_min(0).flatten(1) for name in grids}


def sample_positions(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``k`` distinct positions with probability ∝ ``scores (P,)``; uniform if all zero."""
    n = scores.shape[0]
    k = min(k, n)
    positive = np.flatnonzero(scores > 0)
    if positive.size == 0:
        return rng.choice(n, size=k, replace=False)
    if positive.size <= k:  # every scored position, then uniform over the rest
        rest = np.setdiff1d(np.arange(n), positive)
        extra = rng.choice(rest, size=k - positive.size, replace=False) if k > positive.size else []
        return np.concatenate([positive, np.asarray(extra, dtype=int)])
    p = scores[positive] / scores[positive].sum()
    return positive[rng.choice(positive.size, size=k, replace=False, p=p)]


def select_targets(logits: torch.Tensor, records: list[ImageRecord], mode: str) -> torch.Tensor:
    """Target class per image: the prediction, or the label where ``mode == 'label'`` and known."""
    pred = logits.argmax(dim=1)
    if mode == "predicted":
        return pred
    if mode != "label":
        raise ConfigError(f"target must be 'predicted' or 'label', not {mode!r}")
    labels = [r.label if r.label is not None else int(p) for r, p in zip(records, pred)]
    return torch.tensor(labels, dtype=torch.long)


def collect(
    store: RunStore, handle: ModelHandle, source: ImageSource, progress: bool = True, ranks: Ranks | None = None
) -> None:
    """Run stage 1 into ``store/collect``; resumes at the first unfinished shard. Under torchrun
    each rank computes its share of the shards (:mod:`gig.distributed`) and rank 0 merges."""
    ranks = ranks or Ranks()
    config: Config = store.config
    layers = config.layers
    handle.check_layers(layers)
    records = used_records(source, config.max_images)
    if not records:
        raise InputError(f"no images in {config.images}")
    shapes = handle.layer_shapes(layers)
    per_image = {
        layer: resolve_samples_per_image(config, len(records), c, h * w) for layer, (c, h, w) in shapes.items()
    }
    with sharded_stage(store, "collect", ranks) as summary:
        summary["samples_per_image"] = per_image
        loop = ShardLoop(store, "collect", ranks, records, SHARD_IMAGES, progress)
        for name, shard_records in loop:
            _collect_shard(store, handle, source, shard_records, name, loop.bar, per_image)
        if ranks.is_main:
            _merge(store, loop.n_shards, summary)


def _require_finite(logits: torch.Tensor, grids: dict[str, torch.Tensor], records) -> None:
    """NaN or infinite activations would surface much later as a clustering library's error or
    a NaN in a graph: stop here, naming the layer and the images."""
    for name, values in [*grids.items(), ("logits", logits)]:
        bad = ~torch.isfinite(values.detach()).flatten(1).all(dim=1)
        if bool(bad.any()):
            paths = [records[i].path for i in torch.nonzero(bad.cpu()).flatten().tolist()]
            raise InputError(
                f"non-finite (NaN or infinite) values in {name} for {len(paths)} image(s), "
                f"e.g. {paths[0]}: check the weights and the preprocessing"
            )


def _collect_shard(store, handle, source, records, name, bar, per_image: dict[str, int]) -> None:
    config = store.config
    layers = config.layers
    per_layer: dict[str, dict[str, list]] = {
        l: {"pfv": [], "image_id": [], "pos": [], "target": [], "score": []} for l in layers
    }
    images: list[dict] = []
    source.skipped.clear()
    for batch in iter_image_batches(source, records, handle, config.batch_size, config.loader_workers):
        logits, grids = handle.capture(batch.pixels, layers, keep_graph=True)
        _require_finite(logits, grids, batch.records)
        targets = select_targets(logits.detach(), batch.records, config.target)
        chosen = logits.gather(1, targets.to(logits.device)[:, None]).sum()
        grads = dict(zip(layers, torch.autograd.grad(chosen, [grids[l] for l in layers])))
        values = {l: g.detach() for l, g in grids.items()}
        scores = contribution_scores(values, grads)
        probs = logits.detach().softmax(dim=1)
        for i, record in enumerate(batch.records):
            images.append(
                {
                    "image_id": record.image_id,
                    "path": record.path,
                    "label": record.label,
                    "label_name": record.label_name,
                    "pred": int(probs[i].argmax()),
                    "target": int(targets[i]),
                    "target_prob": float(probs[i, targets[i]]),
                }
            )
        for li, layer in enumerate(layers):
            c, h, w = values[layer].shape[1:]
            score = scores[layer].cpu().numpy()
            flat = values[layer].flatten(2)  # (N, C, P)
            for i, record in enumerate(batch.records):
                rng = np.random.default_rng([config.seed, record.image_id, li])
                picks = sample_positions(score[i], per_image[layer], rng)
                store_l = per_layer[layer]
                store_l["pfv"].append(flat[i][:, picks].T.cpu())
                store_l["image_id"].extend([record.image_id] * len(picks))
                store_l["pos"].extend([[int(p // w), int(p % w)] for p in picks])
                store_l["target"].extend([int(targets[i])] * len(picks))
                store_l["score"].extend(score[i][picks].tolist())
        bar.update(len(batch.records))
    skipped = [{"path": p, "reason": r} for p, r in source.skipped]
    bar.update(len(skipped))
    tensors = {}
    for layer, d in per_layer.items():
        if d["pfv"]:
            tensors[f"{layer}/pfv"] = torch.cat(d["pfv"]).float()
            tensors[f"{layer}/image_id"] = torch.tensor(d["image_id"], dtype=torch.int64)
            tensors[f"{layer}/pos"] = torch.tensor(d["pos"], dtype=torch.int64).reshape(-1, 2)
            tensors[f"{layer}/target"] = torch.tensor(d["target"], dtype=torch.int64)
            tensors[f"{layer}/score"] = torch.tensor(d["score"], dtype=torch.float32)
    if tensors:
        save_tensors(store.shard_path("collect", name), tensors)
    store.mark_shard("collect", name, {"images": images, "skipped": skipped})


def _merge(store: RunStore, n_shards: int, summary: dict) -> None:
    layers = store.config.layers
    merged: dict[str, list[torch.Tensor]] = {}
    images: list[dict] = []
    skipped: list[dict] = []
    for index in range(n_shards):
        name = f"{index:05d}"
        info = store.shard_info("collect", name)
        images.extend(info["images"])
        skipped.extend(info["skipped"])
        path = store.shard_path("collect", name)
        if path.exists():
            for key, value in load_tensors(path).items():
                merged.setdefault(key, []).append(value)
    if not images:
        example = f", e.g. {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else ""
        raise InputError(f"none of the {len(skipped)} images of {store.config.images} could be read{example}")
    for layer in layers:
        tensors = {k.split("/", 1)[1]: torch.cat(v) for k, v in merged.items() if k.startswith(layer + "/")}
        if not bool(tensors["pfv"].any()):
            # Zero everywhere (a dead layer, or one cut off by its biases): its concepts would be
            # copies of the zero vector with no members, and its graph nodes empty.
            raise InputError(
                f"layer {layer!r} is zero at every sampled position of all {len(images)} images: "
                "nothing to decompose; analyse another layer (see `gig layers`)"
            )
        save_tensors(samples_path(store, layer), tensors)
    save_json(images_path(store), {"images": images, "skipped": skipped})
    summary.update(
        {
            "images_used": len(images),
            "images_skipped": len(skipped),
            "pfv_per_layer": {l: int(torch.cat(merged[f"{l}/pfv"]).shape[0]) for l in layers},
        }
    )
