"""A page of gig's viewer for graphs that are not the report's: the explain pages and the
notebook's inline views. Same template, script and concept cards as the report; only the graph
viewer, the cards of the graphs' concepts (from the run's atlas) and, when given, localisation
panels."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..access import RunAccess
from ..artefacts import load_concept_cards, load_images, load_samples
from ..models import output_noun
from ..store import RunStore
from . import sections as sec
from .page import Assets, render_page

#: ``(concept cards, assets) → {image key: localisation panel}`` (see :func:`sections.localisation_panel`).
PanelMaker = Callable[[dict, Assets], dict]


def write_viewer(
    store: RunStore,
    access: RunAccess,
    graphs: list[dict],
    out: Path,
    names: list[str],
    panels: PanelMaker | None = None,
    single_file: bool = False,
    exemplars: int = 10,
    heading: str = "explanation",
    n_images: int | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> Path:
    """Write ``out/index.html`` showing ``graphs`` (viewer entries, :func:`sections.graph_entry`)
    with their concepts' cards and the localisation ``panels``; returns its path."""
    started = time.perf_counter()
    layers = list(store.config.layers)
    out.mkdir(parents=True, exist_ok=True)
    assets = Assets(out, single_file)
    name = sec.class_namer(names)
    cards, shown, concepts = _graph_concepts(store, access, assets, graphs, exemplars, log)
    images = panels(concepts, assets) if panels else {}
    run = {
        "path": str(store.root),
        "model": store.config.model,
        "layers": layers,
        "n_images": n_images if n_images is not None else len(images),
        "top_k": store.config.top_k,
        "edges_per_node": store.config.edges_per_node,
        "output_noun": output_noun(store.config),  # "class", or "output" for a probe head
        "K": {layer: len(cards[layer]["concepts"]) for layer in layers},
    }
    referenced = sec.referenced_classes(graphs, concepts, images, [])
    page_data = sec.viewer_data(run, graphs, concepts, images, {str(c): name(c) for c in sorted(referenced)}, [])
    atlas = [
        {"layer": layer, "K": run["K"][layer], "concepts": [concepts[f"{layer}:{q}"] for q in sorted(shown[layer])]}
        for layer in reversed(layers)
    ]
    return render_page(
        out,
        assets,
        {
            "page_data": page_data,
            "run": run,
            "atlas": atlas,
            "images": list(images.values()),
            "graphs": graphs,
            "figures": None,
            "metrics": None,
            "evaluation": None,
            "atlas_cap": 0,
            "page_kind": heading,
            "atlas_ids": {f"{layer}:{q}" for layer in layers for q in shown[layer]},
            "build_seconds": round(time.perf_counter() - started, 1),
        },
        name,
    )


def _graph_concepts(
    store: RunStore,
    access: RunAccess,
    assets: Assets,
    graphs: list[dict],
    exemplars: int,
    log: Callable[[str], None],
) -> tuple[dict[str, dict], dict[str, set[int]], dict[str, dict]]:
    """The concepts ``graphs`` show: ``(the run's concept cards by layer (its atlas), the
    concepts shown by layer, the page's concept cards by ``"LAYER:q"``)``, the cards with
    ``exemplars`` exemplar crops (assets) and their neighbours in the run's graphs."""
    layers = list(store.config.layers)
    targets = {int(i["image_id"]): int(i["target"]) for i in load_images(store)["images"]}
    cards = {layer: load_concept_cards(store, layer) for layer in layers}
    shown = sec.concepts_shown({layer: [] for layer in layers}, graphs)
    urls = sec.exemplar_urls(access, assets, sec.exemplar_samples(cards, shown, exemplars), log)
    neighbours = sec.RunNeighbours.of_run(store, targets).read_edges(store, shown, targets)
    importance = neighbours.importance
    concepts = sec.concept_cards(
        store,
        cards,
        {layer: load_samples(store, layer) for layer in layers},
        shown,
        urls,
        importance,
        neighbours,
        exemplars,
    )
    return cards, shown, concepts
