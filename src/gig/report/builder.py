"""Build the offline HTML report of a run: ``RUN/report/index.html``.

The page has four parts, all read from the run's artefacts through :mod:`gig.artefacts`
(:mod:`gig.report.sections` for graphs, atlas, localisation and figures;
:mod:`gig.report.metrics` for the metrics and the evaluation; :mod:`gig.report.page` renders):

* **graph viewer** — the causal concept graphs (per class, several classes, global, one image),
  drawn by the bundled cytoscape.js from the graph JSON (``gig.graph/1``) embedded verbatim in the
  page: the page draws exactly the JSON's nodes and edges, in their rows' ``position`` order;
* **concept atlas** — per layer, the most important concepts with their top-1 and top-10 nearest
  PFVs as ERF crops (context dimmed), member counts, member classes, strongest parents/children,
  and the user's labels (``RUN/labels.yaml``);
* **localisation** — for a selection of images, where each top concept sits: its GIG map (or its
  sparse coefficient) upsampled to the model's crop, over the image;
* **metrics** — reconstruction figures, completeness residuals, stage timings, and the evaluation
  (``RUN/evaluate/``: summary.json, markdown tables, plots) when it has run.

Images are written as files under ``RUN/report/`` and referenced by relative URLs (the page opens
from disk), or inlined as data URIs with ``single_file=True``.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..access import RunAccess
from ..artefacts import (
    evaluate_dir,
    graph_index,
    iter_attributions,
    load_concept_cards,
    load_images,
    load_run_sums,
    load_samples,
    report_dir,
)
from ..config import _class_ids, _int, check_fields, settings_hash
from ..graph import ImageRows, build_graph_set
from ..models import output_noun
from ..store import RunStore, as_store
from . import sections as sec
from .metrics import ablation_section, evaluation_section, metrics_section
from .page import Assets, output_size, render_page


@dataclass
class ReportOptions:
    """What goes into the report. Every field is also a ``gig report`` option; checked when made
    (a :class:`gig.errors.ConfigError` names each bad field) and saved with its hash in the page's
    data block (``run.options``)."""

    #: concepts per layer in the atlas (the most important ones); 0 = every concept
    atlas_per_layer: int = 30
    #: nearest PFVs shown per concept (top-1 first), at most the run's exemplars (10)
    exemplars: int = 10
    #: classes with a class graph in the viewer: the run's graph classes, then the most frequent
    max_classes: int = 8
    #: explicit classes (overrides the automatic choice)
    classes: list[int] | None = None
    #: the first ``shared_classes`` classes get a shared graph for every subset of 2 or more
    shared_classes: int = 4
    #: images with a single-image graph and a localisation panel
    n_images: int = 12
    #: explicit image ids (overrides the automatic choice)
    image_ids: list[int] | None = None
    #: side of the localisation heatmaps and image crops, in pixels
    heatmap_size: int = 160
    #: inline every image, script and style into index.html (one file, larger)
    single_file: bool = False
    #: every other class of the run gets its graph in a file of its own (``classes/``), loaded
    #: when chosen in the viewer, with its concepts' top-1 crops; off in a single-file page
    on_demand: bool = True

    def __post_init__(self) -> None:
        check_fields(self, _REPORT_RULES, "report option")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_optional_ids = (lambda v: v is None or _class_ids(v), "null or a list of non-negative integers")
_REPORT_RULES = {
    "atlas_per_layer": (_int(0), "an integer ≥ 0 (0 = every concept)"),
    "exemplars": (_int(1), "an integer ≥ 1"),
    "max_classes": (_int(0), "an integer ≥ 0"),
    "classes": _optional_ids,
    "shared_classes": (_int(0), "an integer ≥ 0"),
    "n_images": (_int(0), "an integer ≥ 0"),
    "image_ids": _optional_ids,
    "heatmap_size": (_int(16), "an integer ≥ 16 (pixels)"),
    "single_file": (lambda v: isinstance(v, bool), "true or false"),
    "on_demand": (lambda v: isinstance(v, bool), "true or false"),
}


def _fresh_output(out: Path) -> None:
    """Create ``out`` and remove the files of an earlier build (index.html is overwritten)."""
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("img", "figures", "eval", "static", "classes"):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)


def build_report(
    run_dir: str | Path | RunStore,
    out: str | Path | None = None,
    options: ReportOptions | None = None,
    model=None,
    source=None,
    class_names: list[str] | None = None,
    progress: bool = False,
) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``RUN/report``); returns ``index.html``'s
    path. ``model`` (a :class:`gig.models.ModelBundle`), ``source`` and ``class_names`` override
    the run's model, images and class names (as for :class:`gig.pipeline.Pipeline`)."""
    started = time.perf_counter()
    opts = options or ReportOptions()
    store = as_store(run_dir).require("graph")  # a run directory, or a run opened already
    out = Path(out) if out is not None else report_dir(store)
    _fresh_output(out)
    assets, access = Assets(out, opts.single_file), RunAccess(store, model, source)
    names = list(class_names) if class_names is not None else list(access.bundle.class_names)
    log = (lambda msg: print(f"report: {msg}", flush=True)) if progress else (lambda msg: None)
    chosen = _choose_graphs(store, opts, names, progress, log)
    shown = _show_concepts(store, access, assets, out, opts, chosen, names, log, progress)
    images = sec.run_panels(
        store, chosen.image_ids, chosen.by_image, access, shown.concepts, assets, opts.heatmap_size, chosen.panel_rows
    )
    log(f"localisation: {len(images)} images")
    name = sec.class_namer(names)
    context = _page_context(store, opts, chosen, shown, images, name, out, assets, started)
    index = render_page(out, assets, context, name)
    size = output_size(out)
    log(
        f"wrote {index} in {time.perf_counter() - started:.1f} s: index.html {size['index_mb']} MB, "
        f"{size['total_mb']} MB in {size['files']} files"
    )
    return index


@dataclass
class _ChosenGraphs:
    """The report's graphs and what they were chosen from."""

    images_info: list[dict]  # the run's images ({"image_id", "path", "target", …})
    by_image: dict[int, dict]  # the same by image id
    targets: dict[int, int]  # image id → target class
    classes: list[int]  # the classes with a class graph in the page, the shared graphs' first
    image_ids: list[int]  # the images with a single-image graph and a localisation panel
    graphs: list[dict]  # viewer entries (sections.graph_entry) embedded in the page
    extra: list[dict]  # the other classes' graphs, loaded on demand
    panel_rows: dict[str, torch.Tensor]  # the localisation panels' attribution rows (sections.PANEL_FIELDS)


def _choose_graphs(
    store: RunStore, opts: ReportOptions, names: list[str], progress: bool, log: Callable[[str], None]
) -> _ChosenGraphs:
    """The classes and images the report shows, their graphs, and the class graphs loaded on
    demand (none in a single-file page or without ``on_demand``). Every graph the graph stage did
    not save is built in one two-pass read of the shards, which also reads the localisation
    panels' rows: with the graph stage's run sums, the report opens each shard twice."""
    images_info = load_images(store)["images"]
    by_image = {int(i["image_id"]): i for i in images_info}
    targets = {i: int(info["target"]) for i, info in by_image.items()}
    attributed = _attributed_images(store)
    classes = sec.report_classes(store, graph_index(store), targets, opts.max_classes, opts.classes)
    image_ids = sec.choose_images(images_info, classes, attributed, opts.n_images, opts.image_ids)
    on_demand = (
        sec.on_demand_classes({i: targets[i] for i in attributed}, classes)
        if opts.on_demand and not opts.single_file
        else []
    )
    specs = {
        **sec.run_graph_specs(store, classes, opts.shared_classes),
        **{f"image:{i}": ("image", i) for i in image_ids},
        **{f"class:{c}": ("class", [c]) for c in on_demand},
    }
    # Every image shown has its single-image graph, so the panels' rows come with the graph pass.
    rows = ImageRows(sec.PANEL_FIELDS, image_ids)
    built = build_graph_set(store, specs, names, progress, rows_of=rows) if specs else {}
    graphs = sec.run_graphs(store, classes, opts.shared_classes, names, built)
    graphs += sec.image_graphs(image_ids, by_image, names, built)
    log(f"{len(graphs)} graphs")
    extra = sec.on_demand_graphs(on_demand, names, built)
    log(f"{len(extra)} more class graphs, loaded on demand")
    return _ChosenGraphs(images_info, by_image, targets, classes, image_ids, graphs, extra, rows.data)


def _attributed_images(store: RunStore) -> set[int]:
    """The run's images with attributions: from the graph stage's run sums, else one pass over
    the shards' image ids."""
    sums = load_run_sums(store)
    if sums is not None:
        return {int(i) for i in sums.image_ids.tolist()}
    return {int(i) for part in iter_attributions(store, fields=()) for i in part["image_id"].tolist()}


@dataclass
class _ShownConcepts:
    """The concepts the report shows: the atlas's and the graphs' nodes, with their cards."""

    cards: dict[str, dict]  # the run's concept cards, by layer
    importance: dict[str, torch.Tensor]  # every concept's mean importance (K,), by layer
    neighbours: sec.RunNeighbours  # importances, class shares and the shown concepts' edges
    atlas_ids: dict[str, list[int]]  # the atlas's concepts by layer, most important first
    concepts: dict[str, dict]  # the page's concept cards, by "LAYER:q"
    on_demand: list[dict]  # the viewer's menu of on-demand class graphs ({key, label, file})


def _show_concepts(
    store: RunStore,
    access: RunAccess,
    assets: Assets,
    out: Path,
    opts: ReportOptions,
    chosen: _ChosenGraphs,
    names: list[str],
    log: Callable[[str], None],
    progress: bool = False,
) -> _ShownConcepts:
    """The concept cards of the atlas and of the graphs' nodes (with exemplar crops), and the
    on-demand class graphs written to ``out/classes/`` with their concepts' top-1 cards."""
    layers = list(store.config.layers)
    graphs, extra, targets = chosen.graphs, chosen.extra, chosen.targets
    cards = {layer: load_concept_cards(store, layer) for layer in layers}
    samples = {layer: load_samples(store, layer) for layer in layers}
    neighbours = sec.RunNeighbours.of_run(store, targets)  # the graph stage's run sums, else a pass over the shards
    importance = neighbours.importance
    atlas_ids = sec.atlas_order(importance, opts.atlas_per_layer)
    shown = sec.concepts_shown(atlas_ids, graphs)
    extra_shown = {
        layer: ids - shown[layer] for layer, ids in sec.concepts_shown({l: [] for l in layers}, extra).items()
    }
    neighbours.read_edges(
        store, {layer: shown[layer] | extra_shown[layer] for layer in layers}, targets
    )  # with no run sums, a second pass
    # The crops of the shown cards and the on-demand cards' top-1 crops, made in one pass.
    wanted = sec.exemplar_samples(cards, shown, max(1, opts.exemplars))
    urls = sec.exemplar_urls(access, assets, sec.exemplar_samples(cards, extra_shown, 1, into=wanted), log, progress)
    concepts = sec.concept_cards(store, cards, samples, shown, urls, importance, neighbours, max(1, opts.exemplars))
    extra_concepts = sec.concept_cards(store, cards, samples, extra_shown, urls, importance, neighbours, 1)
    on_demand = sec.write_on_demand(out, extra, {**concepts, **extra_concepts}, names)
    return _ShownConcepts(cards, importance, neighbours, atlas_ids, concepts, on_demand)


def _page_context(
    store: RunStore,
    opts: ReportOptions,
    chosen: _ChosenGraphs,
    shown: _ShownConcepts,
    images: dict,
    name: Callable[[int], str],
    out: Path,
    assets: Assets,
    started: float,
) -> dict:
    """The page template's context: the viewer's data block, the run, the atlas, the graphs'
    figures, the metrics, evaluation and ablation sections (their plots written as assets)."""
    layers = list(store.config.layers)
    graphs, concepts, atlas_ids = chosen.graphs, shown.concepts, shown.atlas_ids
    run = {
        "path": str(store.root),
        "model": store.config.model,
        "layers": layers,
        "n_images": len(chosen.images_info),
        "top_k": store.config.top_k,
        "edges_per_node": store.config.edges_per_node,
        "output_noun": output_noun(store.config),  # "class", or "output" for a probe head
        "K": {layer: len(shown.cards[layer]["concepts"]) for layer in layers},
        "options": {**opts.to_dict(), "hash": settings_hash(opts)},
    }
    referenced = sec.referenced_classes(graphs, concepts, images, shown.neighbours.class_ids)
    page_data = sec.viewer_data(
        run,
        graphs,
        concepts,
        images,
        {str(c): name(c) for c in sorted(referenced)},
        chosen.classes[: max(0, opts.shared_classes)],
        shown.on_demand,
    )
    atlas = [
        {"layer": layer, "K": run["K"][layer], "concepts": [concepts[f"{layer}:{q}"] for q in atlas_ids[layer]]}
        for layer in reversed(layers)
    ]
    return {
        "page_data": page_data,
        "run": run,
        "atlas": atlas,
        "images": list(images.values()),
        "graphs": graphs,
        "figures": sec.class_figures(store, graphs, concepts, out, assets),
        "metrics": metrics_section(store, assets),
        "evaluation": evaluation_section(evaluate_dir(store), assets),
        "ablation": ablation_section(store, shown.importance),
        "atlas_cap": opts.atlas_per_layer,
        "atlas_ids": {f"{layer}:{q}" for layer in layers for q in atlas_ids[layer]},
        "build_seconds": round(time.perf_counter() - started, 1),
    }
