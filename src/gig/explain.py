"""Explain images that are not in a run with the run's concepts: ``gig explain RUN IMAGE...``.

For each new image: its PFVs at every analysed layer are coded with the run's dictionaries and
λ (:func:`gig.decompose.encoder_for`, the decompose stage's own coder), the top-down GIG walk of
the attribute stage runs on it (:func:`gig.attribution.walk`, the same function), and its
single-image graph is built by :func:`gig.graph.build_graph` from that walk. The target is the
predicted class unless one is given ("why not *dog*?").

Written to ``DIR``::

    DIR/index.html            one offline page, the report's viewer: the images' graphs, their
                              concepts' cards (top-1/top-10 exemplars from the run's atlas and
                              the image's own ERF crop of the concept), localisation maps
    DIR/image_I.json          the single-image graph (gig.graph/1, kind "image") of image I
    DIR/image_I.svg, .png     its static figure (gig.visual.draw_graph)
    DIR/explanations.json     per image: file, prediction, target, probabilities, graph file
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from .access import RunAccess
from .attribution import run_gig, walk
from .decompose import encode_pixels
from .erf import erf_crop, image_erf_maps
from .errors import ConfigError, InputError
from .graph import build_graph
from .images import load_rgb
from .labels import node_labels
from .store import RunStore, save_json
from .visual import draw_graph

#: The JSON shape of ``explanations.json``.
SCHEMA = "gig.explain/1"


@dataclass
class Explanation:
    """One image explained by a run's concepts.

    ``walk``: the attribute stage's fields for this image (``LAYER/top (k,)``,
    ``LAYER/importance (k,)``, ``LAYER/maps (k, H, W)``, ``LAYER/score (K,)``, GIG rows ...);
    ``codes``: ``{layer: (H·W, K)}`` sparse codes of every position; ``pixels``: the image as
    the model took it ``(3, S, S)`` and ``view``: the crop the model sees (PIL), both made once
    by :func:`explain` and reused by the page (:func:`write_explanations`)."""

    name: str
    image: Image.Image
    pred: int
    target: int
    probabilities: torch.Tensor  # (classes,)
    graph: dict
    walk: dict[str, torch.Tensor]
    codes: dict[str, torch.Tensor] = field(repr=False)
    pred_name: str = ""
    target_name: str = ""
    pixels: torch.Tensor | None = field(default=None, repr=False)
    view: Image.Image | None = field(default=None, repr=False)

    def top_concepts(self, layer: str) -> list[tuple[int, float]]:
        """``[(concept, share of the target logit's change), ...]`` of ``layer``, most important first."""
        return list(zip(self.walk[f"{layer}/top"].tolist(), self.walk[f"{layer}/importance"].tolist()))


class _MemoryCodes:
    """The codes of the images being explained, in :class:`gig.decompose.CodeReader`'s shape."""

    def __init__(self, codes: dict[int, torch.Tensor]):
        self._codes = codes

    def codes(self, image_id: int) -> torch.Tensor:
        return self._codes[image_id]


def _as_images(images: Sequence[str | Path | Image.Image]) -> list[tuple[str, Image.Image]]:
    """``(name, RGB image)`` per input: files are read with :func:`gig.images.load_rgb` (errors
    name the file); PIL images are taken as they are."""
    if not images:
        raise InputError("explain needs at least one image")
    out = []
    for i, item in enumerate(images):
        if isinstance(item, Image.Image):
            out.append((f"image {i}", item.convert("RGB")))
        else:
            out.append((str(item), load_rgb(item)))
    return out


def _given_targets(target: int | Sequence[int] | None, n_images: int) -> list[int | None]:
    """One entry per image: the class given for it, or ``None`` (its prediction)."""
    given = [target] * n_images if target is None or isinstance(target, int) else [int(t) for t in target]
    if len(given) != n_images:
        raise ConfigError(f"target: {len(given)} classes given for {n_images} images")
    return given


def _targets(given: list[int | None], preds: torch.Tensor, n_classes: int) -> list[int]:
    """The target class of each image of a batch: the given class, else the prediction."""
    bad = [t for t in given if t is not None and not 0 <= t < n_classes]
    if bad:
        raise ConfigError(f"target: class(es) {bad} outside the model's 0..{n_classes - 1}")
    return [int(p) if t is None else int(t) for t, p in zip(given, preds.tolist())]


def explain(
    run_dir: str | Path | RunStore,
    images: Sequence[str | Path | Image.Image],
    target: int | Sequence[int] | None = None,
    model=None,
    class_names: list[str] | None = None,
    handle=None,
    access: RunAccess | None = None,
) -> list[Explanation]:
    """Explain ``images`` (files or PIL images, not necessarily of the run) with the run's
    concepts: codes, the GIG walk and the single-image graph of each (see the module docstring).

    ``target``: a class for every image, one class per image, or ``None`` for each image's
    predicted class. ``model``: a :class:`gig.models.ModelBundle` when the run was made from
    Python with a user model; by default the run's configured model is loaded. ``access``: an
    opened run (:class:`gig.access.RunAccess`) to reuse with :func:`write_explanations`, so the
    model is loaded once and one handle is built (with one gradient copy of it,
    :meth:`gig.hooks.ModelHandle.measuring`, kept on the handle for the next call). Each image
    is preprocessed once; images are processed ``batch_size`` (the run's) at a time."""
    from .report.sections import class_namer

    access = access or RunAccess(run_dir, model)
    store = access.store
    store.require("attribute")
    loaded = _as_images(images)  # a missing or unreadable file fails before the model loads
    handle = handle or access.handle
    layers = list(store.config.layers)
    fast = handle.measuring(layers)  # the folded copy GIG runs on, made once per handle
    gigs = {layer: run_gig(store, fast, layer) for layer in layers}
    names = list(class_names) if class_names is not None else list(access.bundle.class_names)
    class_name = class_namer(names)
    targets_given = _given_targets(target, len(loaded))
    out: list[Explanation] = []
    step = store.config.batch_size
    for start in range(0, len(loaded), step):
        batch, given = loaded[start : start + step], targets_given[start : start + step]
        out += _explain_batch(access, handle, gigs, batch, start, given, names, class_name)
    return out


def _explain_batch(
    access: RunAccess,
    handle,
    gigs: dict,
    batch: list[tuple[str, Image.Image]],
    start: int,
    given: list[int | None],
    names: list[str],
    class_name: Callable[[int], str],
) -> list[Explanation]:
    """One batch of :func:`explain`: its images preprocessed once (``pixels (B, 3, S, S)``), coded
    at every layer, walked together (image ids ``start, start + 1, ...``: 0, 1, ... over all
    images) and each one's single-image graph built; ``given``: each image's class or None."""
    store = access.store
    layers = list(store.config.layers)
    pixels = access.bundle.preprocess_batch([im for _, im in batch])
    views = [access.bundle.display_image(im) for _, im in batch]
    logits, codes = encode_pixels(store, handle, pixels)
    targets = _targets(given, logits.argmax(1), logits.shape[1])
    ids = [start + i for i in range(len(batch))]  # image ids of the explanation: 0, 1, ... over all images
    readers = {layer: _MemoryCodes({image_id: codes[layer][i] for i, image_id in enumerate(ids)}) for layer in layers}
    data = walk(pixels, ids, targets, layers, readers, gigs, store.config.top_k)
    out = []
    for i, (name, image) in enumerate(batch):
        graph = build_graph(
            store, "image", image_id=ids[i], data=data, targets=dict(zip(ids, targets)), class_names=names
        )
        pred = int(logits[i].argmax())
        out.append(
            Explanation(
                name,
                image,
                pred,
                targets[i],
                logits[i].softmax(0),
                graph,
                {k: v[i] for k, v in data.items()},
                {layer: codes[layer][i] for layer in layers},
                class_name(pred),
                class_name(targets[i]),
                pixels[i],
                views[i],
            )
        )
    return out


def own_erf_crops(
    handle, bundle, explanation: Explanation, pixels: torch.Tensor, layers: list[str], size: int = 96
) -> dict[str, Image.Image]:
    """``{"LAYER:q": crop}``: for each top concept of each layer, the image's own ERF crop at the
    position where the concept's GIG map peaks (where it adds most to the target), else where
    its coefficient is largest."""
    view = explanation.view if explanation.view is not None else bundle.display_image(explanation.image)
    positions = {}
    for layer in layers:
        maps = explanation.walk[f"{layer}/maps"].flatten(1)  # (k, H·W)
        top = explanation.walk[f"{layer}/top"]
        coef = explanation.codes[layer][:, top].abs().T  # (k, H·W)
        peak = torch.where(maps.amax(1, keepdim=True) > 0, maps, coef).argmax(1)  # (k,)
        w = explanation.walk[f"{layer}/maps"].shape[2]
        positions[layer] = torch.stack([peak // w, peak % w], 1)
    erfs = image_erf_maps(handle, pixels[0], positions)  # one forward for every layer
    return {
        f"{layer}:{q}": erf_crop(view, erfs[layer][j].numpy(), size=size)
        for layer in layers
        for j, q in enumerate(explanation.walk[f"{layer}/top"].tolist())
    }


def write_explanations(
    run_dir: str | Path,
    explanations: list[Explanation],
    out: str | Path,
    model=None,
    class_names: list[str] | None = None,
    heatmap_size: int = 160,
    exemplars: int = 10,
    single_file: bool = False,
    log: Callable[[str], None] = lambda msg: None,
    access: RunAccess | None = None,
) -> Path:
    """Write ``explanations`` to ``out`` (see the module docstring); returns ``index.html``.
    ``access``: the opened run :func:`explain` used (its model is not loaded again, nor its
    handle built again). The concept cards' run-wide figures come from the graph stage's run
    sums (:func:`gig.graph.load_run_sums`): no attribute shard is read where the run has them."""
    from .report.viewer import write_viewer

    access = access or RunAccess(run_dir, model)
    store = access.store
    out = Path(out)
    names = list(class_names) if class_names is not None else list(access.bundle.class_names)
    graphs = _graph_entries(explanations)
    out.mkdir(parents=True, exist_ok=True)
    _write_graphs(store, explanations, out)
    panels = partial(_panels, access, explanations, out, heatmap_size)
    return write_viewer(
        store, access, graphs, out, names, panels, single_file, exemplars, "explain", len(explanations), log
    )


def _graph_entries(explanations: list[Explanation]) -> list[dict]:
    """The viewer's entry of each explained image's graph (``image:I``), titled by its file and
    target, and its prediction where that differs."""
    from .report import sections as sec

    return [
        sec.graph_entry(
            f"image:{i}",
            "image",
            [e.target],
            f"{Path(e.name).name} → {e.target_name or e.target}"
            + ("" if e.target == e.pred else f" (predicted: {e.pred_name or e.pred})"),
            e.graph,
            image_id=i,
        )
        for i, e in enumerate(explanations)
    ]


def _write_graphs(store: RunStore, explanations: list[Explanation], out: Path) -> None:
    """``out/image_I.json`` (each image's graph) and ``out/explanations.json`` (per image: file,
    prediction, target, probabilities, graph file)."""
    summary = []
    for i, e in enumerate(explanations):
        save_json(out / f"image_{i}.json", e.graph)
        summary.append(
            {
                "index": i,
                "file": e.name,
                "pred": e.pred,
                "pred_name": e.pred_name,
                "target": e.target,
                "target_name": e.target_name,
                "target_prob": float(e.probabilities[e.target]),
                "pred_prob": float(e.probabilities[e.pred]),
                "graph": f"image_{i}.json",
            }
        )
    save_json(out / "explanations.json", {"schema": SCHEMA, "run": str(store.root), "images": summary})


def _panels(
    access: RunAccess, explanations: list[Explanation], out: Path, heatmap_size: int, concepts: dict, assets
) -> dict:
    """Own ERF crops, localisation panels and static figures of every explained image (the
    viewer's panel maker: ``concepts`` and ``assets`` come from :func:`write_viewer`)."""
    from .report import sections as sec

    store = access.store
    out_panels = {}
    for i, e in enumerate(explanations):
        pixels = (e.pixels if e.pixels is not None else access.bundle.preprocess(e.image))[None]
        view = e.view if e.view is not None else access.bundle.display_image(e.image)
        crops = own_erf_crops(access.handle, access.bundle, e, pixels, list(store.config.layers))
        erf_urls = {node: assets.add_image(f"img/own/{i}/{sec.slug(node)}.jpg", c) for node, c in crops.items()}
        entry = {
            "id": i,
            "path": e.name,
            "label": None,
            "label_name": None,
            "pred": e.pred,
            "target": e.target,
            "target_prob": float(e.probabilities[e.target]),
        }
        out_panels[str(i)] = sec.localisation_panel(
            entry,
            view,
            list(store.config.layers),
            e.walk,
            e.codes,
            concepts,
            assets,
            heatmap_size,
            erf_urls,
        )
        thumbs = {n: _png(out / "img" / "own" / str(i), n, c) for n, c in crops.items()}
        draw_graph(e.graph, out / f"image_{i}", thumbs, labels=node_labels(store, e.graph))
    return out_panels


def _png(folder: Path, node: str, crop: Image.Image) -> Path:
    """A crop saved as PNG for the static figure's thumbnails."""
    from .report.page import slug

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{slug(node)}.png"
    crop.save(path)
    return path
