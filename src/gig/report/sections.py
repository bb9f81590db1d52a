"""The page data of gig's viewer, read from a run through :mod:`gig.artefacts`: graph entries,
concept cards (the atlas), localisation panels and the static class figures.

Each function assembles one part of the page; the report (:mod:`gig.report.builder`) and the
explain pages (:mod:`gig.explain`) put them together. Nothing here computes a graph, an ERF or a
code: graphs come from :func:`gig.graph.build_graph` / :func:`gig.graph.build_graph_set`, crops
from :func:`gig.erf.layer_crops`, codes from :class:`gig.artefacts.CodeReader`, run-wide
importances and neighbours from the graph stage's run sums (:func:`gig.artefacts.load_run_sums`), or,
for runs without them, from :class:`gig.graph.ScoreSums` / :class:`gig.graph.EdgeSums` over the
attribute shards (:func:`gig.artefacts.iter_attributions`), one shard at a time.
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..access import RunAccess
from ..artefacts import (
    CodeReader,
    RunSums,
    class_figure_stem,
    crop_paths,
    graph_index,
    iter_attributions,
    load_graph,
    load_labels,
    load_run_sums,
    load_stability,
)
from ..errors import RunMismatchError
from ..graph import (
    EDGE_FIELDS,
    NEIGHBOURS,
    SCORE_FIELDS,
    EdgeSums,
    ScoreSums,
    accumulate,
    default_classes,
    with_positions,
)
from ..labels import node_labels
from ..models import class_name
from ..store import RunStore
from ..visual import draw_graph, figure_key, saved_figure_key
from .page import Assets, heatmap_overlay, image_jpeg_bytes, jpeg_bytes, overlay_base, safe_json, slug


def n_images_text(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def short_path(path: str) -> str:
    """The file name of an image path (``embedded:NAME`` stays as it is)."""
    return path.rsplit("/", 1)[-1].rsplit("\\", 1)[-1] or path


def class_namer(names: list[str]) -> Callable[[int | None], str]:
    """``c → name`` (``class c`` past the list, ``target logit`` for ``None``)."""

    def name(c: int | None) -> str:
        if c is None:
            return "target logit"
        return class_name(names, c)

    return name


# ------------------------------------------------------------------------------------ graphs
def report_classes(
    store: RunStore, index: dict, targets: dict[int, int], max_classes: int, explicit: list[int] | None
) -> list[int]:
    """The classes with a class graph: explicit ones, else the run's graph classes then the most
    frequent targets, ``max_classes`` in all; only classes some image has as target."""
    run_classes = [int(c) for c in index.get("classes", [])]
    if explicit:
        classes = [int(c) for c in explicit]
    else:
        n = max(max_classes, len(run_classes))
        classes = list(dict.fromkeys(run_classes + default_classes(store, n=n)))[:n]
    present = set(targets.values())
    return [c for c in classes if c in present]


def graph_entry(
    key: str, mode: str, classes: list[int], label: str, graph: dict, file: str | None = None, **extra: Any
) -> dict:
    """One graph of the viewer's menus; the graph gets its nodes' row positions (:func:`gig.graph.with_positions`).
    Its list of image ids stays in the graph's own file: the page would otherwise grow with the
    run (50 000 ids in a global graph) for a list the viewer never shows."""
    shown = {k: v for k, v in with_positions(graph).items() if k != "image_ids"}
    return {"key": key, "mode": mode, "classes": classes, "file": file, "label": label, "graph": shown, **extra}


def _shared_combos(classes: list[int], shared_classes: int) -> list[list[int]]:
    pool = classes[: max(0, shared_classes)]
    return [list(c) for size in range(2, len(pool) + 1) for c in itertools.combinations(pool, size)]


def _shared_key(combo: list[int]) -> str:
    return "shared:" + ",".join(map(str, sorted(combo)))


def _saved_file(index: dict, kind: str, classes: list[int]) -> str | None:
    """The graph stage's file of a class graph or of a shared graph of ``classes``, else None."""
    if kind == "class":
        return index["files"]["class"].get(str(classes[0]))
    same = sorted(classes) == sorted(int(c) for c in index.get("classes", []))
    return index["files"].get("shared") if same else None


def run_graph_specs(store: RunStore, classes: list[int], shared_classes: int) -> dict:
    """The graphs :func:`run_graphs` shows that the graph stage did not save, as
    :func:`gig.graph.build_graph_set` specs keyed as :func:`run_graphs` reads them."""
    index = graph_index(store)
    specs = {f"class:{c}": ("class", [c]) for c in classes if not _saved_file(index, "class", [c])}
    for combo in _shared_combos(classes, shared_classes):
        if not _saved_file(index, "shared", combo):
            specs[_shared_key(combo)] = ("shared", combo)
    return specs


def graph_recurrence(store: RunStore) -> dict[int, dict]:
    """Per class of the graph stage: how much of its class graph comes back with refitted
    concepts (``gig stability --graphs``), ``{class: {"nodes", "edges", "refits", "control"}}``;
    empty where not measured."""
    graphs = (load_stability(store) or {}).get("graphs") or {}
    out = {}
    for name, mean in (graphs.get("mean") or {}).items():
        if not mean or not name.startswith("class_"):
            continue
        control = ((graphs.get("control") or {}).get("graphs") or {}).get(name)
        out[int(name.split("_", 1)[1])] = {
            "nodes": mean["nodes"],
            "edges": mean["edges"],
            "refits": len(graphs.get("refits") or []),
            "control": None if not control else {"nodes": control["nodes"], "edges": control["edges"]},
        }
    return out


def run_graphs(store: RunStore, classes: list[int], shared_classes: int, names: list[str], built: dict) -> list[dict]:
    """The class graphs, the shared graph of every subset of the first ``shared_classes``
    classes, and the global graph: the graph stage's files, else ``built`` (the graphs of
    :func:`run_graph_specs`, from the page's one :func:`gig.graph.build_graph_set`)."""
    index = graph_index(store)
    name = class_namer(names)
    entries = []
    recurrence = graph_recurrence(store)
    for c in classes:
        file = _saved_file(index, "class", [c])
        graph = load_graph(store, file) if file else built[f"class:{c}"]
        label = f"{name(c)} ({n_images_text(graph['n_images'])})"
        extra = {"recurrence": recurrence[c]} if c in recurrence else {}
        entries.append(graph_entry(f"class:{c}", "class", [c], label, graph, file, **extra))
    for combo in _shared_combos(classes, shared_classes):
        file = _saved_file(index, "shared", combo)
        graph = load_graph(store, file) if file else built[_shared_key(combo)]
        label = " + ".join(name(c) for c in sorted(combo))
        entries.append(graph_entry(_shared_key(combo), "shared", sorted(combo), label, graph, file))
    if index["files"].get("global"):
        file = index["files"]["global"]
        graph = load_graph(store, file)
        entries.append(graph_entry("global", "global", [], f"all images ({graph['n_images']})", graph, file))
    return entries


def on_demand_classes(attributed_targets: dict[int, int], inline: list[int]) -> list[int]:
    """Every target class of the run's attributed images that the page does not carry inline,
    most images first."""
    counts = Counter(attributed_targets.values())
    return [c for c, _ in counts.most_common() if c not in set(inline)]


def on_demand_graphs(classes: list[int], names: list[str], built: dict) -> list[dict]:
    """The viewer entries of the class graphs of :func:`on_demand_classes` (``built``, keyed
    ``class:C``); each is written to its own file and loaded when chosen."""
    name = class_namer(names)
    return [
        graph_entry(
            f"class:{c}",
            "class",
            [c],
            f"{name(c)} ({n_images_text(built[f'class:{c}']['n_images'])})",
            built[f"class:{c}"],
        )
        for c in classes
    ]


def write_on_demand(out: Path, entries: list[dict], concepts: dict[str, dict], names: list[str]) -> list[dict]:
    """Write every on-demand graph with its concepts' cards and class names to
    ``out/classes/class_C.js`` (a script that hands them to the viewer: ``file://`` pages may
    not fetch JSON); returns the viewer's menu of them ``[{key, label, file}]``."""
    if not entries:
        return []
    (out / "classes").mkdir(parents=True, exist_ok=True)
    name = class_namer(names)
    menu = []
    for entry in entries:
        cards = {n["id"]: concepts[n["id"]] for n in entry["graph"]["nodes"] if n["id"] in concepts}
        classes = referenced_classes([entry], cards, {}, [])
        payload = {"entry": entry, "concepts": cards, "classNames": {str(c): name(c) for c in sorted(classes)}}
        file = f"classes/class_{entry['classes'][0]}.js"
        (out / file).write_text(f"window.gigOnDemand({safe_json(payload)});\n", encoding="utf-8")
        menu.append({"key": entry["key"], "label": entry["label"], "file": file})
    return menu


def choose_images(
    images_info: list[dict], classes: list[int], attributed: set[int], n_images: int, explicit: list[int] | None
) -> list[int]:
    """Explicit ids, else up to two images per report class (most confident first), then the
    most confident of the rest, ``n_images`` in all."""
    if explicit:
        missing = [i for i in explicit if i not in attributed]
        if missing:
            raise RunMismatchError(f"image id(s) {missing} have no attribution in this run")
        return list(dict.fromkeys(int(i) for i in explicit))
    ranked = sorted(
        (i for i in images_info if int(i["image_id"]) in attributed), key=lambda i: -(i.get("target_prob") or 0.0)
    )
    chosen: list[int] = []
    for c in classes:
        chosen += [int(i["image_id"]) for i in ranked if int(i["target"]) == c][:2]
    chosen += [int(i["image_id"]) for i in ranked]
    return list(dict.fromkeys(chosen))[: max(0, n_images)]


def image_graphs(image_ids: list[int], by_image: dict[int, dict], names: list[str], built: dict) -> list[dict]:
    """The single-image graph of each of ``image_ids`` (images of the run), from ``built`` (keyed
    ``image:ID``)."""
    name = class_namer(names)
    entries = []
    for image_id in image_ids:
        info = by_image[image_id]
        graph = built[f"image:{image_id}"]
        entries.append(
            graph_entry(
                f"image:{image_id}",
                "image",
                [int(info["target"])],
                f"#{image_id} {short_path(info['path'])} → {name(int(info['target']))}",
                graph,
                image_id=image_id,
            )
        )
    return entries


# ---------------------------------------------------------------------------------- concepts
def atlas_order(importance: dict[str, torch.Tensor], per_layer: int) -> dict[str, list[int]]:
    """Per layer, concept ids by mean importance (most important first), the first ``per_layer``
    (all when 0)."""
    out = {}
    for layer, values in importance.items():
        order = values.argsort(descending=True).tolist()
        out[layer] = order[:per_layer] if per_layer > 0 else order
    return out


def concepts_shown(atlas_ids: dict[str, list[int]], graphs: list[dict]) -> dict[str, set[int]]:
    """The atlas's concepts and every concept node of the graphs, per layer."""
    shown = {layer: set(ids) for layer, ids in atlas_ids.items()}
    for g in graphs:
        for node in g["graph"]["nodes"]:
            if node["layer"] in shown:
                shown[node["layer"]].add(int(node["concept"]))
    return shown


def exemplar_samples(
    cards: dict[str, dict], shown: dict[str, set[int]], n_exemplars: int, into: dict[str, set[int]] | None = None
) -> dict[str, set[int]]:
    """``{layer: sample indices}``: the first ``n_exemplars`` exemplars of every concept shown,
    added to ``into`` where given (the page's crops of several kinds of card, made in one pass)."""
    wanted = into if into is not None else {}
    for layer, ids in shown.items():
        wanted.setdefault(layer, set()).update(
            s for q in ids for s in cards[layer]["concepts"][q]["exemplars"][:n_exemplars]
        )
    return wanted


def exemplar_urls(
    access: RunAccess,
    assets: Assets,
    wanted: dict[str, set[int]],
    log: Callable[[str], None] = lambda msg: None,
    progress: bool = False,
) -> dict[str, dict[int, str]]:
    """``{layer: {sample index: url}}``: the ERF crops of the ``wanted`` samples
    (:func:`exemplar_samples`) as JPEG assets, made in one pass over the images for all layers
    (:meth:`gig.access.RunAccess.layer_crops`); a crop made here is encoded from memory, a cached
    one read from its file."""
    order = {layer: sorted(samples) for layer, samples in wanted.items()}
    made: dict[Path, bytes] = {}

    def keep(path: Path, crop: Image.Image) -> None:
        made[path] = image_jpeg_bytes(crop)

    paths = access.layer_crops(order, on_made=keep, progress=progress)
    urls: dict[str, dict[int, str]] = {}
    for layer, samples in order.items():
        urls[layer] = {
            s: assets.add_bytes(f"img/erf/{slug(layer)}/s{s}.jpg", made.pop(p) if p in made else jpeg_bytes(p))
            for s, p in zip(samples, paths[layer])
        }
        log(f"{layer}: {len(samples)} ERF crops")
    return urls


def _top_pairs(values: torch.Tensor, ids: list[str], k: int = NEIGHBOURS) -> list[list]:
    """The ``k`` largest positive entries of ``values`` as ``[[id, weight], ...]``."""
    if values.numel() == 0:
        return []
    top = values.topk(min(k, values.numel()))
    return [[ids[int(i)], float(v)] for v, i in zip(top.values, top.indices) if float(v) > 0]


def _saved_pairs(index: torch.Tensor, weight: torch.Tensor, name: Callable[[int], str]) -> list[list]:
    """:func:`_top_pairs` from a concept's saved strongest neighbours (index, weight, largest first)."""
    return [[name(int(i)), float(v)] for i, v in zip(index[:NEIGHBOURS], weight[:NEIGHBOURS]) if float(v) > 0]


class RunNeighbours:
    """Dataset-wide strongest parents (lower layer) and children (upper layer, or classes at the
    top) of the concepts shown: the mean edge weights over all of the run's images and the mean
    top-layer shares per target class, with every concept's mean importance (``importance``,
    ``{layer: (K,)}``), which chooses the concepts shown.

    Read from the graph stage's run sums (:func:`gig.graph.load_run_sums`: no shard is opened)
    where the run has them; else two passes over the attribute shards, one shard at a time:
    :meth:`of_run` reads the importances, then :meth:`read_edges` the edges that touch a shown
    concept (:class:`gig.graph.EdgeSums`). Both give the same numbers (tested)."""

    def __init__(
        self,
        layers: list[str],
        run: ScoreSums | None,
        class_sums: torch.Tensor | None,
        class_counts: torch.Tensor | None,
        saved: RunSums | None = None,
    ):
        self.layers = layers
        self.saved = saved
        if saved is not None:
            self.importance = saved.importance()
            self.class_ids = saved.class_ids()
            self.class_matrix = None  # the run sums keep each concept's strongest classes
        else:
            self.importance = run.scores()
            self.class_ids = class_counts.nonzero().flatten().tolist()
            self.class_matrix = class_sums[self.class_ids] / class_counts[self.class_ids, None]  # (classes, K_top)
        self.parents: EdgeSums | None = None
        self.children: EdgeSums | None = None
        self.shown: dict[str, list[int]] = {}

    @classmethod
    def of_run(cls, store: RunStore, targets: dict[int, int]) -> "RunNeighbours":
        """The importances of every concept and the class shares: the run sums, else pass 1 over
        the run's shards."""
        layers = list(store.config.layers)
        saved = load_run_sums(store)
        if saved is not None:
            return cls(layers, None, None, None, saved)
        run = ScoreSums(layers)
        n_classes = max(targets.values(), default=-1) + 1
        class_sums, class_counts = None, torch.zeros(n_classes)
        for part in iter_attributions(store, SCORE_FIELDS):
            run.add(part, torch.arange(int(part["image_id"].numel())))
            target_vec = torch.tensor([targets[int(i)] for i in part["image_id"].tolist()], dtype=torch.long)
            top = part[f"{layers[-1]}/score"]  # (images, K_top)
            class_sums = torch.zeros(n_classes, top.shape[1]) if class_sums is None else class_sums
            class_sums.index_add_(0, target_vec, top)
            class_counts += torch.bincount(target_vec, minlength=n_classes)
        return cls(layers, run, class_sums if class_sums is not None else torch.zeros(n_classes, 0), class_counts)

    def read_edges(self, store: RunStore, shown: dict[str, set[int]], targets: dict[int, int]) -> "RunNeighbours":
        """Pass 2: the edges into (parents) and out of (children) every shown concept (none with
        the run sums, which hold every concept's)."""
        layers = self.layers
        self.shown = {layer: sorted(shown.get(layer, ())) for layer in layers}
        if self.saved is not None:
            return self
        pairs = list(zip(layers[:-1], layers[1:]))
        sums = {
            "parents": EdgeSums(layers, ("flow",), upper_ids={lo: self.shown[up] for lo, up in pairs}),
            "children": EdgeSums(layers, ("flow",), lower_ids={lo: self.shown[lo] for lo, _ in pairs}),
        }
        accumulate(iter_attributions(store, EDGE_FIELDS), sums, {key: ("all", None) for key in sums}, targets)
        self.parents, self.children = sums["parents"], sums["children"]
        return self

    def of(self, layer: str, q: int, K: dict[str, int]) -> tuple[list, list]:
        """``(parents, children)`` of shown concept ``q`` of ``layer`` as ``[[node id, weight], ...]``."""
        position = self.layers.index(layer)
        lower = self.layers[position - 1] if position > 0 else None
        upper = self.layers[position + 1] if position + 1 < len(self.layers) else None
        if self.saved is not None:
            return self._saved_of(layer, q, lower, upper)
        slot = self.shown[layer].index(q)
        parents = (
            _top_pairs(self.parents.edges()[lower][slot], [f"{lower}:{p}" for p in range(K[lower])]) if lower else []
        )
        if upper:
            children = _top_pairs(self.children.edges()[layer][:, slot], [f"{upper}:{p}" for p in range(K[upper])])
        else:
            children = (
                _top_pairs(self.class_matrix[:, q], [f"class:{c}" for c in self.class_ids]) if self.class_ids else []
            )
        return parents, children

    def _saved_of(self, layer: str, q: int, lower: str | None, upper: str | None) -> tuple[list, list]:
        """:meth:`of` from the run sums."""
        saved = self.saved
        parents = _saved_pairs(*(t[q] for t in saved.parents[lower]), lambda p: f"{lower}:{p}") if lower else []
        if upper:
            children = _saved_pairs(*(t[q] for t in saved.children[layer]), lambda c: f"{upper}:{c}")
        else:
            children = _saved_pairs(*(t[q] for t in saved.classes), lambda c: f"class:{c}")
        return parents, children


def concept_cards(
    store: RunStore,
    cards: dict[str, dict],
    samples: dict[str, dict],
    shown: dict[str, set[int]],
    urls: dict[str, dict[int, str]],
    importance: dict[str, torch.Tensor],
    neighbours: RunNeighbours,
    n_exemplars: int,
) -> dict[str, dict]:
    """``{"LAYER:q": card}`` for every concept shown: exemplars (crop url, image, class, cosine),
    members, classes, parents, children, importance and rank, and the user's label if any."""
    labels = load_labels(store)
    stability = (load_stability(store) or {}).get("layers", {})
    K = {layer: len(c["concepts"]) for layer, c in cards.items()}
    out: dict[str, dict] = {}
    for layer, ids in shown.items():
        rank = {q: r + 1 for r, q in enumerate(importance[layer].argsort(descending=True).tolist())}
        for q in sorted(ids):
            card = cards[layer]["concepts"][q]
            sims = card.get("exemplar_similarity", [])
            exemplars = [
                {
                    "s": int(s),
                    "url": urls[layer].get(int(s)),
                    "image": int(samples[layer]["image_id"][s]),
                    "cls": int(samples[layer]["target"][s]),
                    "sim": sims[j] if j < len(sims) else None,
                }
                for j, s in enumerate(card["exemplars"][:n_exemplars])
            ]
            parents, children = neighbours.of(layer, q, K)
            out[f"{layer}:{q}"] = {
                "layer": layer,
                "concept": q,
                "count": card["count"],
                "importance": float(importance[layer][q]),
                "rank": rank[q],
                "top_classes": card["top_classes"],
                "exemplars": exemplars,
                "parents": parents,
                "children": children,
                **_stability_of(stability.get(layer), q),
                **labels.get(layer, {}).get(q, {}),
            }
    return out


def _stability_of(layer: dict | None, q: int) -> dict:
    """A concept's mean matched cosine over the refits of ``gig stability`` (none where not run)."""
    if not layer or q >= len(layer["similarity"]):
        return {}
    return {"stability": layer["similarity"][q]}


# ------------------------------------------------------------------------------ localisation
def localisation_panel(
    entry: dict,
    view: Image.Image,
    layers: list[str],
    walk_row: dict[str, Any],
    codes: dict[str, torch.Tensor],
    concepts: dict[str, dict],
    assets: Assets,
    size: int,
    erf_crops: dict[str, str] | None = None,
) -> dict:
    """One image's localisation panel: per layer (top first) its top concepts with their GIG map
    and |coefficient| map over the image (and the image's own ERF crop of the concept, when given).

    ``walk_row``: ``{"LAYER/top": (k,), "LAYER/importance": (k,), "LAYER/maps": (k, H, W)}`` of
    this image (a row of the attribute stage, or of :func:`gig.explain.explain`); ``codes``:
    ``{layer: (H·W, K)}``; ``entry``: the image's fields (id, path, classes, ...)."""
    key = str(entry["id"])
    entry = {
        **entry,
        "url": assets.add_image(f"img/images/{slug(key)}.jpg", view.resize((2 * size, 2 * size), Image.BICUBIC)),
        "layers": [],
    }
    base = overlay_base(view, size)
    for layer in reversed(layers):
        maps = np.asarray(walk_row[f"{layer}/maps"])  # (k, H, W)
        h, w = maps.shape[1:]
        cells = []
        for j, (q, imp) in enumerate(zip(walk_row[f"{layer}/top"].tolist(), walk_row[f"{layer}/importance"].tolist())):
            stem = f"img/loc/{slug(key)}/{slug(layer)}_{q}"
            coef = codes[layer][:, q].abs().reshape(h, w).numpy()
            node = f"{layer}:{q}"
            cells.append(
                {
                    "concept": q,
                    "id": node,
                    "importance": imp,
                    "gig": assets.add_image(f"{stem}_gig.jpg", heatmap_overlay(base, maps[j])),
                    "coef": assets.add_image(f"{stem}_coef.jpg", heatmap_overlay(base, coef)),
                    "erf": (erf_crops or {}).get(node),
                    "top1": concepts.get(node, {}).get("exemplars", [{}])[0].get("url"),
                    "name": concepts.get(node, {}).get("name"),
                }
            )
        entry["layers"].append({"layer": layer, "cells": cells})
    return entry


#: The attribution fields of a localisation panel.
PANEL_FIELDS = ("top", "importance", "maps")


def run_panels(
    store: RunStore,
    image_ids: list[int],
    by_image: dict[int, dict],
    access: RunAccess,
    concepts: dict[str, dict],
    assets: Assets,
    size: int,
    data: dict[str, torch.Tensor],
) -> dict[str, dict]:
    """The localisation panels of some of the run's images: ``data``, their rows of
    :data:`PANEL_FIELDS` (read in the page's graph pass), and their codes through
    :class:`gig.artefacts.CodeReader`: ``{str(image id): panel}``."""
    if not image_ids:
        return {}
    layers = list(store.config.layers)
    readers = {layer: CodeReader(store, layer) for layer in layers}
    row_of = {int(i): r for r, i in enumerate(data["image_id"].tolist())}
    fields = ("path", "label", "label_name", "pred", "target", "target_prob")
    panels = {}
    for image_id in image_ids:
        info, row = by_image[image_id], row_of[image_id]
        walk_row = {k: v[row] for k, v in data.items() if k.endswith(("/top", "/importance", "/maps"))}
        panels[str(image_id)] = localisation_panel(
            {"id": image_id, **{k: info.get(k) for k in fields}},
            access.display_image(image_id),
            layers,
            walk_row,
            {layer: readers[layer].codes(image_id) for layer in layers},
            concepts,
            assets,
            size,
        )
    return panels


# ----------------------------------------------------------------------------------- figures
def _figure_thumbnails(store: RunStore, graph: dict, concepts: dict[str, dict]) -> dict[str, Path]:
    """``{node id: crop}``: the top-1 ERF crop of every concept node of ``graph`` that has one."""
    shown = [node for node in graph["nodes"] if concepts.get(node["id"], {}).get("exemplars")]
    thumbs = {}
    for layer in dict.fromkeys(node["layer"] for node in shown):  # one lookup of the folders per layer
        nodes = [node for node in shown if node["layer"] == layer]
        paths = crop_paths(store, layer, [concepts[node["id"]]["exemplars"][0]["s"] for node in nodes])
        thumbs.update({node["id"]: path for node, path in zip(nodes, paths)})
    return thumbs


def class_figures(
    store: RunStore, graphs: list[dict], concepts: dict[str, dict], out: Path, assets: Assets
) -> list[dict]:
    """The static figure (SVG, PNG) of every class graph, thumbnails the concepts' top-1 crops.
    Where the graph stage drew the same picture (the same :func:`gig.visual.figure_key`: graph,
    crops, labels), its files are taken as they are, not drawn again; otherwise the page also
    links the stage's figures of that class, which then differ (e.g. labels named since)."""
    figures = []
    for g in (g for g in graphs if g["mode"] == "class"):
        c = g["classes"][0]
        thumbs = _figure_thumbnails(store, g["graph"], concepts)
        labels = node_labels(store, g["graph"])
        stage = class_figure_stem(store, c)
        fig = {"label": g["label"], "pipeline": []}
        if saved_figure_key(stage.with_suffix(".png")) == figure_key(g["graph"], thumbs, labels=labels) and (
            stage.with_suffix(".svg").is_file()
        ):
            for ext in ("svg", "png"):  # the graph stage's picture is this one
                fig[ext] = assets.add_file(f"figures/class_{c}.{ext}", stage.with_suffix(f".{ext}"))
            figures.append(fig)
            continue
        stem = out / "figures" / f"class_{c}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        svg, png = draw_graph(g["graph"], stem, thumbs, labels=labels)
        fig["svg"], fig["png"] = (
            assets.add_file(f"figures/{svg.name}", svg),
            assets.add_file(f"figures/{png.name}", png),
        )
        if assets.inline:  # figures/ then only holds what index.html already inlines
            svg.unlink()
            png.unlink()
        for ext in ("svg", "png"):
            original = stage.with_suffix(f".{ext}")
            if original.is_file():
                fig["pipeline"].append(
                    {"ext": ext, "url": assets.add_file(f"figures/pipeline_{original.name}", original)}
                )
        figures.append(fig)
    if assets.inline and (out / "figures").is_dir() and not any((out / "figures").iterdir()):
        (out / "figures").rmdir()
    return figures


def referenced_classes(
    graphs: list[dict], concepts: dict[str, dict], images: dict[str, dict], extra: list[int]
) -> set[int]:
    """Every class id the page mentions (its names go into the page's data)."""
    referenced = set(extra)
    for g in graphs:
        for node in g["graph"]["nodes"]:
            if node.get("class") is not None:
                referenced.add(int(node["class"]))
            referenced.update(int(c) for c, _ in node.get("top_classes", []))
            referenced.update(int(c) for c in node.get("in_top_of", []))
    for c in concepts.values():
        referenced.update(int(x) for x, _ in c["top_classes"])
        referenced.update(int(e["cls"]) for e in c["exemplars"])
    for i in images.values():
        referenced.update(int(x) for x in (i["target"], i.get("pred")) if x is not None)
    return referenced


def viewer_data(
    run: dict,
    graphs: list[dict],
    concepts: dict[str, dict],
    images: dict[str, dict],
    class_names: dict[str, str],
    shared_pool: list[int],
    on_demand: list[dict] | None = None,
) -> dict:
    """The page's JSON block (``gig.report/1``): what report.js reads; ``onDemand`` lists the
    graphs in files of their own (:func:`write_on_demand`)."""
    return {
        "schema": "gig.report/1",
        "run": run,
        "classNames": class_names,
        "graphs": graphs,
        "onDemand": on_demand or [],
        "sharedPool": shared_pool,
        "concepts": concepts,
        "images": {k: {kk: vv for kk, vv in v.items() if kk != "layers"} for k, v in images.items()},
        "localised": {
            k: {
                c["id"]: {m: c[m] for m in ("gig", "coef", "erf") if c.get(m)}
                for layer in v["layers"]
                for c in layer["cells"]
            }
            for k, v in images.items()
        },
    }
