"""Causal tests of a run's concepts: remove concepts from a layer's reconstruction and measure.

A run codes every position ``p`` of layer ``a`` as ``X̃_p = U_p V + b`` (codes ``U (P, K)``,
dictionary ``V (K, C)``, ``b (C,)`` the decoder bias of a layer whose basis has one, else 0).
*Ablating* a set ``S`` of concepts zeroes their coefficients, ``X̃^{−S} = U_{:, ∉S} V_{∉S} + b``
(every concept removed: ``b``, the zero code), and runs the real network above ``a`` from that grid
(:meth:`gig.hooks.ModelHandle.run_from`). Effects are always read against the reconstruction
``X̃`` (not the original activations), the same end point as the GIG path ``b → X̃``:

* class logits and probabilities: ``Δ = value(X̃^{−S}) − value(X̃)`` (negative: the removal lowers it);
* the readouts of the later layers' concepts, :class:`gig.readouts.ConceptReadout`
  (``max_p ⟨x_p, v_r⟩ / ‖v_r‖``), the targets GIG attributes between layers.

:func:`ablate` does this for a run's images (their stored codes) or for new photos (coded with
the run's dictionary and λ, :func:`gig.decompose.encode_pixels`) and writes
``RUN/graph/ablation/LAYER_c1-c2.json`` (schema ``gig.ablation/1``, :meth:`AblationResult.to_dict`).

:func:`ablation_correlation` asks whether GIG's predictions are causal: for every transition
``lower → upper`` of the per-image walk (and ``top → class``), each tested lower concept ``q`` is
removed alone and the *drop* of each upper target's readout, ``g_t(X̃) − g_t(X̃^{−q})``, is
compared with the GIG the walk stored for it, ``GIG_t[q]``, by Spearman rank correlation, with a
random-ordering baseline. The two agree exactly when the network above the layer is linear in
the grid; otherwise GIG integrates the gradient along ``b + α U V`` while an ablation is a finite
difference at the end point, so a rank correlation below 1 measures that gap. Written to
``RUN/graph/ablation/correlation.json`` (schema ``gig.ablation-correlation/1``) with the raw pairs
in ``correlation_pairs.safetensors``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .access import RunAccess
from .artefacts import (  # noqa: F401  (readers and paths re-exported: moved to gig.artefacts)
    ABLATION_SCHEMA,
    CORRELATION_PAIRS,
    CodeReader,
    ablation_path,
    correlation_path,
    load_ablations,
    load_correlation,
    load_dictionary,
    load_walk,
)
from .decompose import encode_pixels
from .errors import ConfigError, InputError
from .hooks import ModelHandle
from .labels import check_concepts, check_layer
from .models import class_name
from .readouts import ConceptReadout
from .store import RunStore, save_json, save_tensors

SCHEMA = ABLATION_SCHEMA
CORRELATION_SCHEMA = "gig.ablation-correlation/1"


# ---------------------------------------------------------------------------- the run
def open_run(run: str | Path | RunStore, model=None, device: str | None = None, fast: bool = True) -> RunAccess:
    """The run's store and model, read-only (:class:`gig.access.RunAccess`). ``model``: a
    :class:`~gig.models.ModelBundle` or ``nn.Module`` to use instead of loading ``config.model``
    (needed for runs of a user module). ``fast`` folds batch norms as the attribute stage does."""
    return RunAccess(run, model=model, device=device, fast=fast)


def grid_shape(handle: ModelHandle, layer: str, pixels: torch.Tensor) -> tuple[int, int, int]:
    """``(C, H, W)`` of ``layer``'s grid for images like ``pixels (N, 3, S, S)``."""
    with torch.no_grad():
        _, grids = handle.capture(pixels[:1], [layer])
    return tuple(int(d) for d in grids[layer].shape[1:])


def run_codes(store: RunStore, layer: str, image_ids: Sequence[int]) -> torch.Tensor:
    """Stored codes ``(N, H·W, K)`` of run images at ``layer``."""
    reader = CodeReader(store, layer)
    return torch.stack([reader.codes(int(i)) for i in image_ids])


# ---------------------------------------------------------------------------- the core
def _read(
    handle: ModelHandle,
    pixels: torch.Tensor,
    layer: str,
    grid: torch.Tensor,
    read: str | None,
    vectors: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Logits ``(M, classes)`` (``read`` None) or every concept readout ``(M, K_b)`` of layer ``read``."""
    out = handle.run_from(pixels, layer, grid.to(memory_format=handle.memory_format), read=read)
    if read is None:
        return out.float().cpu()
    return ConceptReadout(read, vectors[read]).all(out.float()).cpu()


def _variant_grids(
    codes: torch.Tensor,
    V: torch.Tensor,
    keep: torch.Tensor,
    shape: tuple[int, int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grids ``(N·(1+M), C, H, W)``, image-major: the reconstruction of ``codes (N, P, K)``, then
    one with each row of ``keep (M, K)`` (1 = kept) applied to the coefficients; ``bias (C,)``,
    a decoder bias, is added to every grid (the zero code's output)."""
    c, h, w = shape
    masks = torch.cat([torch.ones(1, keep.shape[1]), keep.float()])  # (1+M, K)
    x = torch.einsum("npk,mk,kc->nmpc", codes.float(), masks, V.float())  # (N, 1+M, P, C)
    if bias is not None:
        x = x + bias.float()
    return x.reshape(-1, h, w, c).permute(0, 3, 1, 2).contiguous()


def ablate_codes(
    handle: ModelHandle,
    layer: str,
    pixels: torch.Tensor,
    codes: torch.Tensor,
    dictionary: torch.Tensor,
    removals: torch.Tensor,
    reads: Sequence[str | None],
    read_vectors: dict[str, torch.Tensor] | None = None,
    max_batch: int = 64,
    shape: tuple[int, int, int] | None = None,
    bias: torch.Tensor | None = None,
) -> dict[str | None, torch.Tensor]:
    """The network's outputs with ``layer`` replaced by the reconstruction and by ablations of it.

    ``pixels (N, 3, S, S)``, ``codes (N, P, K)``, ``dictionary V (K, C)``, ``removals (M, K)``
    bool (True: that concept's coefficients are zeroed in variant ``m``), ``bias (C,)`` the
    layer's decoder bias (None: none). ``reads``: ``None`` for
    the logits, or later layer names whose concept readouts (``read_vectors[layer] (K_b, C_b)``)
    are returned. Returns ``{read: (N, 1+M, D)}``: index 0 along the second axis is the
    reconstruction ``U V + bias``, index ``1 + m`` variant ``m``. At most ``max_batch`` grids per
    forward; the network below ``layer`` runs once per image and forward.
    """
    read_vectors = read_vectors or {}
    shape = shape or grid_shape(handle, layer, pixels)
    keep = ~removals.bool()
    n, variants = codes.shape[0], 1 + keep.shape[0]
    out: dict[str | None, list[torch.Tensor]] = {r: [] for r in reads}
    with torch.no_grad():
        if variants <= max_batch:  # several images per forward, all variants of each
            step = max(1, max_batch // variants)
            for lo in range(0, n, step):
                grids = _variant_grids(codes[lo : lo + step], dictionary, keep, shape, bias).to(handle.device)
                for r in reads:
                    values = _read(handle, pixels[lo : lo + step], layer, grids, r, read_vectors)
                    out[r].append(values.reshape(-1, variants, values.shape[-1]))
        else:  # one image at a time, its variants in chunks
            for i in range(n):
                grids = _variant_grids(codes[i : i + 1], dictionary, keep, shape, bias)
                parts = {r: [] for r in reads}
                for lo in range(0, variants, max_batch):
                    chunk = grids[lo : lo + max_batch].to(handle.device)
                    for r in reads:
                        parts[r].append(_read(handle, pixels[i : i + 1], layer, chunk, r, read_vectors))
                for r in reads:
                    out[r].append(torch.cat(parts[r])[None])
    return {r: torch.cat(v) for r, v in out.items()}


# ---------------------------------------------------------------------------- ablate
@dataclass
class AblationResult:
    """Outputs of ``N`` images with ``layer`` replaced by its reconstruction (index 0 of the
    second axis) and by the reconstruction without ``concepts`` (index 1).

    ``logits (N, 2, classes)``; ``original_logits (N, classes)`` (the unreplaced network, for
    reference); ``readouts {later layer: (N, 2, K_b)}`` concept readouts; ``targets (N,)`` the
    class followed per image; ``removed_mass (N,)`` ``Σ_p Σ_{q∈S} |U[p, q]|`` (0: nothing to remove)."""

    run: str
    layer: str
    concepts: list[int]
    image_ids: list[int | None]
    paths: list[str]
    targets: torch.Tensor
    logits: torch.Tensor
    original_logits: torch.Tensor
    readouts: dict[str, torch.Tensor]
    removed_mass: torch.Tensor
    class_names: list[str] = field(default_factory=list)
    source: str = "run"
    path: Path | None = None

    @property
    def delta_logits(self) -> torch.Tensor:
        """``(N, classes)``: ablated − reconstruction."""
        return self.logits[:, 1] - self.logits[:, 0]

    @property
    def probs(self) -> torch.Tensor:
        """``(N, 2, classes)`` softmax of :attr:`logits`."""
        return self.logits.softmax(-1)

    @property
    def delta_probs(self) -> torch.Tensor:
        """``(N, classes)``: ablated − reconstruction."""
        p = self.probs
        return p[:, 1] - p[:, 0]

    def delta_readouts(self, layer: str) -> torch.Tensor:
        """``(N, K_b)``: ablated − reconstruction readout of every concept of ``layer``."""
        return self.readouts[layer][:, 1] - self.readouts[layer][:, 0]

    def class_name(self, c: int) -> str:
        return class_name(self.class_names, c)

    def to_dict(self, top: int = 5) -> dict:
        """The JSON form (schema ``gig.ablation/1``, see docs/ablation-and-labels.md)."""
        return {
            "schema": SCHEMA,
            "run": self.run,
            "layer": self.layer,
            "concepts": self.concepts,
            "source": self.source,
            "n_images": len(self.image_ids),
            "readout_layers": list(self.readouts),
            "convention": "delta = ablated − reconstruction (U·V); probabilities are softmax of the logits",
            "mean": self._mean_dict(top),
            "images": [self._image_dict(i, top) for i in range(len(self.image_ids))],
        }

    def _values(self, what: torch.Tensor, i: int, c: int) -> dict:
        return {
            "reconstruction": float(what[i, 0, c]),
            "ablated": float(what[i, 1, c]),
            "delta": float(what[i, 1, c] - what[i, 0, c]),
        }

    def _image_dict(self, i: int, top: int) -> dict:
        t = int(self.targets[i])
        probs, d = self.probs, self.delta_probs[i]
        changed = d.abs().topk(min(top, d.numel())).indices.tolist()
        return {
            "image_id": self.image_ids[i],
            "path": self.paths[i],
            "target": t,
            "target_name": self.class_name(t),
            "removed_mass": float(self.removed_mass[i]),
            "pred": {
                "original": int(self.original_logits[i].argmax()),
                "reconstruction": int(self.logits[i, 0].argmax()),
                "ablated": int(self.logits[i, 1].argmax()),
            },
            "target_logit": {"original": float(self.original_logits[i, t]), **self._values(self.logits, i, t)},
            "target_prob": {"original": float(self.original_logits[i].softmax(-1)[t]), **self._values(probs, i, t)},
            "classes": [
                {
                    "class": c,
                    "name": self.class_name(c),
                    "delta_prob": float(d[c]),
                    "delta_logit": float(self.delta_logits[i, c]),
                }
                for c in changed
            ],
            "readouts": {b: _top_readouts(v[i], self.delta_readouts(b)[i], top) for b, v in self.readouts.items()},
        }

    def _mean_dict(self, top: int) -> dict:
        idx = torch.arange(len(self.targets))
        t = self.targets
        logit, prob = self.logits[idx, :, t], self.probs[idx, :, t]  # (N, 2)
        dp, dl = self.delta_probs.mean(0), self.delta_logits.mean(0)
        changed = dp.abs().topk(min(top, dp.numel())).indices.tolist()

        def mean_of(v: torch.Tensor) -> dict:
            return {
                "reconstruction": float(v[:, 0].mean()),
                "ablated": float(v[:, 1].mean()),
                "delta": float((v[:, 1] - v[:, 0]).mean()),
                "delta_sd": _sd(v[:, 1] - v[:, 0]),
            }

        return {
            "target_logit": mean_of(logit),
            "target_prob": mean_of(prob),
            "prediction_changed": float((self.logits[:, 0].argmax(-1) != self.logits[:, 1].argmax(-1)).float().mean()),
            "removed_mass": float(self.removed_mass.mean()),
            "classes": [
                {"class": c, "name": self.class_name(c), "delta_prob": float(dp[c]), "delta_logit": float(dl[c])}
                for c in changed
            ],
            "readouts": {
                b: {
                    **_top_readouts(v.mean(0), self.delta_readouts(b).mean(0), top),
                    "delta": [round(float(x), 6) for x in self.delta_readouts(b).mean(0)],
                }
                for b, v in self.readouts.items()
            },
        }

    def _repr_html_(self) -> str:
        """The result as a table in Jupyter: per image and on average, the target's probability
        on the reconstruction and without the concepts."""
        import html

        doc = self.to_dict()
        head = (
            f"<p><b>{html.escape(self.layer)}</b> without concept(s) {', '.join(map(str, self.concepts))}: "
            f"{len(self.image_ids)} image(s); Δ = ablated − reconstruction</p>"
        )
        cells = lambda row: "".join(f"<td>{html.escape(str(c))}</td>" for c in row)  # noqa: E731
        rows = [
            cells(
                [
                    im["image_id"] if im["image_id"] is not None else Path(im["path"]).name,
                    im["target_name"],
                    f"{im['target_prob']['reconstruction']:.3f}",
                    f"{im['target_prob']['ablated']:.3f}",
                    f"{im['target_prob']['delta']:+.3f}",
                ]
            )
            for im in doc["images"]
        ]
        m = doc["mean"]["target_prob"]
        rows.append(cells(["mean", "", f"{m['reconstruction']:.3f}", f"{m['ablated']:.3f}", f"{m['delta']:+.3f}"]))
        return (
            head
            + "<table><tr><th>image</th><th>target</th><th>p reconstruction</th><th>p ablated</th><th>Δp</th></tr>"
            + "".join(f"<tr>{r}</tr>" for r in rows)
            + "</table>"
        )

    def save(self, path: str | Path | None = None, top: int = 5) -> Path:
        """Write :meth:`to_dict` (atomically) to ``path``, default :func:`ablation_path`."""
        path = (
            Path(path)
            if path is not None
            else ablation_path(
                RunStore.open(self.run), self.layer, self.concepts, None if self.source == "run" else self.paths
            )
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        save_json(path, self.to_dict(top))
        self.path = path
        return path


def _sd(x: torch.Tensor) -> float:
    return float(x.std()) if x.numel() > 1 else 0.0


def _top_readouts(values: torch.Tensor, delta: torch.Tensor, top: int) -> dict:
    """The ``top`` concepts whose readout changed most: ``values (2, K_b)``, ``delta (K_b,)``."""
    order = delta.abs().topk(min(top, delta.numel())).indices.tolist()
    return {
        "top": [
            {
                "concept": r,
                "reconstruction": float(values[0, r]),
                "ablated": float(values[1, r]),
                "delta": float(delta[r]),
            }
            for r in order
        ]
    }


def later_layers(store: RunStore, layer: str, all_layers: bool = False) -> list[str]:
    """The analysed layers after ``layer``: the next one, or every later one."""
    layers = list(store.config.layers)
    after = layers[layers.index(layer) + 1 :]
    return after if all_layers else after[:1]


def ablate(
    run: str | Path | RunStore | RunAccess,
    layer: str,
    concepts: Sequence[int],
    image_ids: Sequence[int] | None = None,
    images: Sequence[str | Path] | None = None,
    *,
    targets: int | Sequence[int] | None = None,
    all_layers: bool = False,
    model=None,
    device: str | None = None,
    batch_size: int = 16,
    max_batch: int = 64,
    save: bool = True,
    top: int = 5,
    progress: bool = False,
) -> AblationResult:
    """Remove ``concepts`` of ``layer`` from the reconstruction of each image and measure.

    Images: ``image_ids`` of the run (default: every image of the run), or ``images``, paths of
    photos outside it (coded with the run's dictionary and λ). ``targets``: the class followed,
    one per image or one for all (default: the run's target for run images, the model's
    prediction for photos).
    Concept readouts are measured at the next analysed layer, or at every later one with
    ``all_layers``. With ``save`` the result goes to :func:`ablation_path` (``result.path``).
    """
    ctx = run if isinstance(run, RunAccess) else open_run(run, model, device)
    store = ctx.store
    check_layer(store, layer)
    concepts = check_concepts(store, layer, concepts)
    if image_ids is not None and images is not None:
        raise ConfigError("give image_ids (run images) or images (photo paths), not both")
    V = load_dictionary(store, layer)
    reads = [None, *later_layers(store, layer, all_layers)]
    vectors = {b: load_dictionary(store, b) for b in reads if b is not None}
    infos = _image_infos(ctx, image_ids, images, targets)
    photos = images is not None
    cat = _ablate_batches(ctx, layer, concepts, infos, V, reads, vectors, photos, batch_size, max_batch, progress)
    result = AblationResult(
        run=str(store.root),
        layer=layer,
        concepts=concepts,
        image_ids=[i["image_id"] for i in infos],
        paths=[i["path"] for i in infos],
        targets=torch.tensor([i["target"] for i in infos]),
        logits=cat["logits"],
        original_logits=cat["original"],
        readouts={r: cat[f"read:{r}"] for r in reads if r is not None},
        removed_mass=cat["mass"],
        class_names=ctx.class_names,
        source="photos" if photos else "run",
    )
    if save:
        result.save(top=top)
    return result


def _ablate_batches(
    ctx: RunAccess,
    layer: str,
    concepts: list[int],
    infos: list[dict],
    V: torch.Tensor,
    reads: list[str | None],
    vectors: dict[str, torch.Tensor],
    photos: bool,
    batch_size: int,
    max_batch: int,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """:func:`ablate`'s measurements, ``batch_size`` images at a time, concatenated over the
    images ``infos`` (a ``None`` target is set to the model's prediction on the way):
    ``original (N, D)`` the model's logits, ``mass (N,)`` the removed concepts' summed ``|code|``,
    ``logits (N, D)`` with ``concepts`` removed from ``layer``, and ``read:LAYER (N, ...)``
    the readouts of each later layer in ``reads``, with ``V (K, C)`` and ``vectors`` the
    dictionaries."""
    from tqdm.auto import tqdm

    removal = torch.zeros(1, V.shape[0], dtype=torch.bool)
    removal[0, concepts] = True
    parts: dict[str, list[torch.Tensor]] = {}
    shape = None
    for lo in tqdm(range(0, len(infos), batch_size), desc="ablate", unit="batch", disable=not progress):
        chunk = infos[lo : lo + batch_size]
        pixels, codes = _pixels_and_codes(ctx, layer, chunk, photos)
        shape = shape or grid_shape(ctx.handle, layer, pixels)
        with torch.no_grad():
            original = ctx.handle.model(pixels.to(ctx.handle.device)).float().cpu()
        out = ablate_codes(
            ctx.handle, layer, pixels, codes, V, removal, reads, vectors, max_batch, shape, ctx.decoder_bias(layer)
        )
        _append(
            parts,
            {
                "original": original,
                "mass": codes[:, :, concepts].abs().sum((1, 2)),
                **{("logits" if r is None else f"read:{r}"): v for r, v in out.items()},
            },
        )
        for info, row in zip(chunk, original):
            if info["target"] is None:
                info["target"] = int(row.argmax())
    return {k: torch.cat(v) for k, v in parts.items()}


def _append(parts: dict[str, list[torch.Tensor]], values: dict[str, torch.Tensor]) -> None:
    for k, v in values.items():
        parts.setdefault(k, []).append(v)


def _image_infos(ctx: RunAccess, image_ids, images, targets) -> list[dict]:
    """``[{"image_id", "path", "target"}]`` of the images to ablate (target None: the prediction)."""
    if images is not None:
        if not images:
            raise InputError("no photos given to ablate")
        infos = [{"image_id": None, "path": str(p), "target": None} for p in images]
    else:
        known = ctx.images()
        ids = list(known) if image_ids is None else [int(i) for i in image_ids]
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ConfigError(
                f"image id(s) {unknown[:5]} are not in this run ({len(known)} images, ids {min(known)}..{max(known)})"
            )
        infos = [{"image_id": i, "path": known[i]["path"], "target": known[i]["target"]} for i in ids]
    if targets is not None:
        targets = [targets] * len(infos) if isinstance(targets, int) else list(targets)
        if len(targets) != len(infos):
            raise ConfigError(f"targets: {len(targets)} given for {len(infos)} images")
        for info, t in zip(infos, targets):
            if int(t) < 0 or (ctx.class_names and int(t) >= len(ctx.class_names)):
                raise ConfigError(f"target class {t} is not a class of the model ({len(ctx.class_names)} classes)")
            info["target"] = int(t)
    return infos


def _pixels_and_codes(ctx: RunAccess, layer: str, infos: list[dict], photos: bool):
    """``pixels (B, 3, S, S)`` and codes ``(B, P, K)`` of a chunk of images."""
    if photos:
        pixels = ctx.photo_pixels([i["path"] for i in infos])
        return pixels, encode_pixels(ctx.store, ctx.handle, pixels, [layer])[1][layer]
    ids = [i["image_id"] for i in infos]
    return ctx.run_pixels(ids), run_codes(ctx.store, layer, ids)


# ---------------------------------------------------------------------------- GIG vs ablation
def transitions_of(layers: Sequence[str]) -> list[tuple[str, str | None]]:
    """``[(lower, upper), …, (top, None)]``: every step of the walk, ``None`` = the class logit."""
    return list(zip(layers[:-1], layers[1:])) + [(layers[-1], None)]


def transition_name(lower: str, upper: str | None) -> str:
    return f"{lower}->{upper if upper is not None else 'class'}"


def _walk_rows(data: dict[str, torch.Tensor], row: int, lower: str, upper: str | None, target_class: int):
    """What the walk stored for one image and transition: upper ``targets (k,)``, predicted GIG
    ``(k, K_lower)``, the targets' importance ``(k,)`` and readout change ``Δg (k,)``."""
    if upper is None:
        return (
            torch.tensor([target_class]),
            data[f"{lower}/class_gig"][row][None],
            torch.ones(1),
            data[f"{lower}/class_delta"][row].reshape(1),
        )
    return (
        data[f"{lower}/targets"][row],
        data[f"{lower}/gig"][row],
        data[f"{upper}/importance"][row],
        data[f"{lower}/delta"][row],
    )


def _candidates(
    codes: torch.Tensor, predicted: torch.Tensor, top_n: int | None, n_others: int, generator: torch.Generator
) -> torch.Tensor:
    """Lower concepts to ablate for one image: its ``top_n`` active concepts by ``Σ_t |GIG_t|``
    plus ``n_others`` drawn at random from its other active ones (``top_n`` None: every active
    one). Concepts with no coefficient in the image have GIG 0 and no effect: left out, since
    their ties would inflate a rank correlation."""
    active = (codes != 0).any(0).nonzero().flatten()
    if top_n is None or active.numel() <= top_n + n_others:
        return active
    score = predicted[:, active].abs().sum(0)
    order = score.argsort(descending=True)
    rest = order[top_n:]
    picked = rest[torch.randperm(rest.numel(), generator=generator)[:n_others]]
    return active[torch.cat([order[:top_n], picked]).sort().values]


def measure_transition(
    ctx: RunAccess,
    data: dict[str, torch.Tensor],
    row: int,
    lower: str,
    upper: str | None,
    pixels: torch.Tensor,
    codes: torch.Tensor,
    target_class: int,
    top_n: int | None,
    n_others: int,
    seed: int,
    max_batch: int = 64,
    shape=None,
) -> dict[str, torch.Tensor]:
    """One image, one transition: each candidate lower concept ablated alone, and all at once.

    Returns ``concepts (M,)``, ``predicted (k, M)`` the stored GIG ``GIG_t[q]``, ``measured (k, M)``
    the readout drop ``g_t(X̃) − g_t(X̃^{−q})``, ``importance (k,)``, ``delta (k,)`` the stored
    ``Δg_t = g_t(X̃) − g_t(b)``, ``delta_check (k,)`` the same measured now, with every concept
    removed (the zero code: the grid ``b``, the layer's decoder bias, 0 without one), and
    ``targets (k,)``.
    """
    image_id = int(data["image_id"][row])
    targets, gig, importance, delta = _walk_rows(data, row, lower, upper, target_class)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + image_id)
    chosen = _candidates(codes, gig, top_n, n_others, generator)
    K = codes.shape[1]
    removals = torch.zeros(chosen.numel() + 1, K, dtype=torch.bool)
    removals[torch.arange(chosen.numel()), chosen] = True
    removals[-1] = True  # every concept: the zero code (b_dec, or the zero grid), the GIG path's start
    vectors = {upper: ctx.dictionary(upper)} if upper is not None else {}
    out = ablate_codes(
        ctx.handle,
        lower,
        pixels[None],
        codes[None],
        ctx.dictionary(lower),
        removals,
        [upper],
        vectors,
        max_batch,
        shape,
        ctx.decoder_bias(lower),
    )[upper][0]  # (1 + M + 1, D)
    values = out[:, targets]  # (1 + M + 1, k)
    return {
        "image_id": torch.full((targets.numel(),), image_id),
        "targets": targets,
        "concepts": chosen,
        "predicted": gig[:, chosen],
        "measured": (values[0] - values[1:-1]).T,
        "importance": importance,
        "delta": delta,
        "delta_check": values[0] - values[-1],
        "gig_sum": gig.sum(-1),
    }


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than 3 pairs or a
    constant side."""
    from scipy.stats import rankdata

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    rx, ry = rankdata(x) - (x.size + 1) / 2, rankdata(y) - (y.size + 1) / 2
    return float((rx * ry).sum() / math.sqrt((rx * rx).sum() * (ry * ry).sum()))


def _groups(measures: list[dict]) -> list[dict]:
    """One group per (image, upper target): GIG ``x`` and ablation drop ``y`` over the tested
    concepts, the flow scale ``I_t / Δg_t`` and the edge keys ``(t, q)``."""
    groups = []
    for m in measures:
        for j, t in enumerate(m["targets"].tolist()):
            scale = float(m["importance"][j]) / _nonzero(float(m["delta"][j]))
            groups.append(
                {
                    "x": m["predicted"][j].double().numpy(),
                    "y": m["measured"][j].double().numpy(),
                    "scale": scale,
                    "keys": [(t, q) for q in m["concepts"].tolist()],
                }
            )
    return groups


def _nonzero(d: float) -> float:
    return d if abs(d) >= 1e-8 else math.copysign(1e-8, d)


def _correlations(groups: list[dict], rng: np.random.Generator | None = None) -> dict:
    """Spearman per group, pooled over every pair (as flows ``I_t · value / Δg_t``, the graph's
    edge unit), and over the edges ``(t, q)`` (flows averaged over the images that tested them);
    with ``rng`` the GIG values are permuted within each group first (the random baseline)."""
    rhos, px, py = [], [], []
    edges: dict[tuple[int, int], list[float]] = {}
    for g in groups:
        x = g["x"] if rng is None else g["x"][rng.permutation(g["x"].size)]
        rhos.append(spearman(x, g["y"]))
        px.append(x * g["scale"])
        py.append(g["y"] * g["scale"])
        for key, a, b in zip(g["keys"], px[-1], py[-1]):
            e = edges.setdefault(key, [0.0, 0.0, 0])
            e[0], e[1], e[2] = e[0] + a, e[1] + b, e[2] + 1
    pooled = spearman(np.concatenate(px), np.concatenate(py)) if px else math.nan
    ex = np.array([e[0] / e[2] for e in edges.values()])
    ey = np.array([e[1] / e[2] for e in edges.values()])
    return {"per_target": np.array(rhos), "pooled": pooled, "edges": spearman(ex, ey), "n_edges": len(edges)}


def _stats(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if not v.size:
        return {"mean": None, "sd": None, "median": None, "n": 0}
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "median": float(np.median(v)),
        "n": int(v.size),
    }


def _top_overlap(groups: list[dict], k: int = 5, rng: np.random.Generator | None = None) -> float | None:
    """Mean share of the ``k`` largest ``|GIG|`` among the ``k`` largest ``|drop|`` per group."""
    shares = []
    for g in groups:
        if g["x"].size <= k:
            continue
        x = g["x"] if rng is None else g["x"][rng.permutation(g["x"].size)]
        top_x, top_y = set(np.argsort(-np.abs(x))[:k]), set(np.argsort(-np.abs(g["y"]))[:k])
        shares.append(len(top_x & top_y) / k)
    return float(np.mean(shares)) if shares else None


def transition_summary(measures: list[dict], n_random: int = 20, seed: int = 0) -> dict:
    """The agreement of GIG and ablation over one transition's :func:`measure_transition` results.

    ``spearman``: per (image, target) group (mean, sd, median, n), pooled over all pairs, and over
    edges; ``random``: the same with GIG permuted within each group, mean ± sd over ``n_random``
    seeds; ``sign_agreement`` of GIG and drop (pairs with a non-zero GIG); ``top5_overlap``;
    ``completeness``: the stored ``|Σ_q GIG_t[q] − Δg_t| / |Δg_t|`` (median), the same ``Δg_t``
    measured again now by ablating every concept (median and max relative difference: the run's
    codes and model reproduce the stored walk), and the median of ``Σ drop / Σ GIG`` over the tested
    concepts (1 where ablations add up as GIG does)."""
    groups = _groups(measures)
    real = _correlations(groups)
    randoms = [_correlations(groups, np.random.default_rng([seed, s])) for s in range(n_random)]
    per_random = [
        float(np.nanmean(r["per_target"])) if np.isfinite(r["per_target"]).any() else math.nan for r in randoms
    ]
    x = np.concatenate([g["x"] for g in groups]) if groups else np.zeros(0)
    y = np.concatenate([g["y"] for g in groups]) if groups else np.zeros(0)
    signed = np.abs(x) > 1e-12
    delta = torch.cat([m["delta"] for m in measures]).double()
    check = torch.cat([m["delta_check"] for m in measures]).double()
    gig_sum = torch.cat([m["gig_sum"] for m in measures]).double()
    sums = [(g["y"].sum() / g["x"].sum()) for g in groups if abs(g["x"].sum()) > 1e-12]
    rel = lambda a: (a.abs() / delta.abs().clamp_min(1e-8)).median().item()  # noqa: E731
    return {
        "n_images": len(measures),
        "n_targets": len(groups),
        "n_pairs": int(x.size),
        "concepts_per_target": float(np.mean([g["x"].size for g in groups])) if groups else 0.0,
        "spearman": {
            "per_target": _stats(real["per_target"]),
            "pooled": _nan_none(real["pooled"]),
            "edges": _nan_none(real["edges"]),
            "n_edges": real["n_edges"],
        },
        "random": {
            "per_target": _stats(per_random),
            "pooled": _stats([r["pooled"] for r in randoms]),
            "edges": _stats([r["edges"] for r in randoms]),
            "n_seeds": n_random,
        },
        "sign_agreement": float((np.sign(x[signed]) == np.sign(y[signed])).mean()) if signed.any() else None,
        "top5_overlap": _top_overlap(groups),
        "top5_overlap_random": _top_overlap(groups, rng=np.random.default_rng([seed, 10**6])),
        "completeness": {
            "stored_residual_median": rel(gig_sum - delta),
            "delta_check_median": rel(check - delta),
            "delta_check_max": float((check - delta).abs().div(delta.abs().clamp_min(1e-8)).max()),
            "ablation_sum_ratio_median": float(np.median(sums)) if sums else None,
        },
    }


def _nan_none(v: float) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def ablation_correlation(
    run: str | Path | RunStore | RunAccess,
    *,
    image_ids: Sequence[int] | None = None,
    max_images: int | None = None,
    top_n: int | None = 16,
    n_others: int = 16,
    n_random: int = 20,
    seed: int = 0,
    model=None,
    device: str | None = None,
    max_batch: int = 64,
    chunk: int = 8,
    save: bool = True,
    progress: bool = False,
) -> dict:
    """GIG edge weight vs measured ablation effect, per transition of the run's walk.

    For each attributed image (``image_ids``, else the first ``max_images``, else all) and each
    transition ``lower → upper`` (and ``top → class``): the image's ``top_n`` active lower concepts
    by ``|GIG|`` and ``n_others`` random other active ones (``top_n`` None: all active ones) are
    ablated one at a time (:func:`measure_transition`); :func:`transition_summary` compares the
    drops with GIG. Returns (and with ``save`` writes to :func:`correlation_path`, raw pairs beside
    it in ``correlation_pairs.safetensors``) ``{"schema", "run", "n_images", "image_ids",
    "selection", "attribute_stage", "seconds", "transitions": {"LOWER->UPPER" | "TOP->class": summary}}``.
    """
    started = time.perf_counter()
    ctx = run if isinstance(run, RunAccess) else open_run(run, model, device)
    store = ctx.store
    data = load_walk(store)
    rows = _walk_rows_for(data, image_ids, max_images)
    measures = _measure_walk(ctx, data, rows, top_n, n_others, seed, max_batch, chunk, progress)
    result = {
        "schema": CORRELATION_SCHEMA,
        "run": str(store.root),
        "n_images": len(rows),
        "image_ids": [int(data["image_id"][r]) for r in rows],
        "selection": {"top_n": top_n, "n_others": n_others, "seed": seed, "n_random": n_random},
        "attribute_stage": store.stage_state("attribute"),
        "convention": "drop = readout(U·V) − readout(U·V without the concept); GIG from the stored walk",
        "transitions": {name: transition_summary(m, n_random, seed) for name, m in measures.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    if save:
        _save_correlation(store, result, measures)
    return result


def _measure_walk(
    ctx: RunAccess,
    data: dict[str, torch.Tensor],
    rows: list[int],
    top_n: int | None,
    n_others: int,
    seed: int,
    max_batch: int,
    chunk: int,
    progress: bool,
) -> dict[str, list[dict]]:
    """:func:`measure_transition` for every walk row in ``rows`` and every transition of the
    run's walk, ``chunk`` images at a time: ``{"LOWER->UPPER" | "TOP->class": [result per image]}``."""
    from tqdm.auto import tqdm

    store = ctx.store
    targets = {i: info["target"] for i, info in ctx.images().items()}
    steps = transitions_of(list(store.config.layers))
    measures: dict[str, list[dict]] = {transition_name(*t): [] for t in steps}
    shapes: dict[str, tuple[int, int, int]] = {}
    bar = tqdm(total=len(rows), desc="ablation vs GIG", unit="img", disable=not progress)
    for lo in range(0, len(rows), chunk):
        part = rows[lo : lo + chunk]
        ids = [int(data["image_id"][r]) for r in part]
        pixels = ctx.run_pixels(ids)
        for lower, upper in steps:
            shapes.setdefault(lower, grid_shape(ctx.handle, lower, pixels))
            codes = run_codes(store, lower, ids)
            for j, r in enumerate(part):
                measures[transition_name(lower, upper)].append(
                    measure_transition(
                        ctx,
                        data,
                        r,
                        lower,
                        upper,
                        pixels[j],
                        codes[j],
                        targets[ids[j]],
                        top_n,
                        n_others,
                        seed,
                        max_batch,
                        shapes[lower],
                    )
                )
        bar.update(len(part))
    bar.close()
    return measures


def _walk_rows_for(data: dict[str, torch.Tensor], image_ids, max_images: int | None) -> list[int]:
    ids = data["image_id"].tolist()
    if image_ids is None:
        return list(range(len(ids)))[:max_images]
    where = {i: r for r, i in enumerate(ids)}
    missing = [i for i in image_ids if int(i) not in where]
    if missing:
        raise ConfigError(f"image id(s) {missing[:5]} have no GIG walk in this run ({len(ids)} attributed images)")
    return [where[int(i)] for i in image_ids][:max_images]


def _save_correlation(store: RunStore, result: dict, measures: dict[str, list[dict]]) -> Path:
    """``correlation.json`` and the raw pairs ``correlation_pairs.safetensors`` (per transition:
    ``image_id``, ``target``, ``concept``, ``predicted``, ``measured``, ``scale`` = ``I_t / Δg_t``)."""
    path = correlation_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, ms in measures.items():
        cols: dict[str, list[torch.Tensor]] = {}
        for m in ms:
            k, n = m["predicted"].shape
            scale = m["importance"] / torch.tensor([_nonzero(float(d)) for d in m["delta"]])
            _append(
                cols,
                {
                    "image_id": m["image_id"][:, None].expand(k, n),
                    "target": m["targets"][:, None].expand(k, n),
                    "concept": m["concepts"][None].expand(k, n),
                    "predicted": m["predicted"],
                    "measured": m["measured"],
                    "scale": scale[:, None].expand(k, n),
                },
            )
        for key, parts in cols.items():
            tensors[f"{name}/{key}"] = torch.cat([p.reshape(-1) for p in parts]).contiguous()
    save_tensors(path.with_name(CORRELATION_PAIRS), tensors)
    save_json(path, result)
    return path
