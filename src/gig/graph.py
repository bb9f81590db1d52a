"""Stage 6 — dataset-wide causal concept graphs from the per-image GIG walks.

Weights are in one unit at every layer: the fraction of an image's class-logit change ``Δz``
that flows through a node or an edge. A top-layer concept's importance is ``GIG_class[q] / Δz``;
the edge from lower concept ``q`` to upper concept ``t`` carries ``I[t] · GIG_t[q] / Δg_t``,
``t``'s importance times the share of ``t``'s readout change ``Δg_t`` that ``q`` accounts for,
and a lower concept's importance is the sum of its outgoing edges. So weights compose along
paths (the edges into a node add up to its importance, up to the completeness residual), and
are comparable across layers and images. A graph over several images averages the per-image
weights (0 where an image did not reach the node or edge). ``edge_weights`` also computes two
alternative definitions; every graph records how many of its shown edges they would keep
(``edge_rule_agreement``). Kinds: ``class`` (images whose target is one class), ``shared`` (several
classes; concepts in the top-k of two or more of them are marked shared), ``global`` (all images,
one "target logit" node on top), ``image`` (one image).

JSON schema ``gig.graph/1`` (see docs/graph-schema.md)::

    {"schema": "gig.graph/1", "kind": ..., "model": ..., "layers": [bottom..top],
     "classes": [{"index": c, "name": ...}], "image_ids": [...], "n_images": n,
     "nodes": [{"id": "_blocks.15:12", "layer": "_blocks.15", "level": 3, "concept": 12,
                "importance": 0.31, "count": 40, "top_classes": [[c, n], ...],
                "exemplars": [sample indices], "shared": false, "in_top_of": [c, ...]},
               {"id": "class:281", "layer": "classifier", "level": 4, "class": 281,
                "name": "tabby", "importance": 1.0}],
     "edges": [{"source": lower node id, "target": upper node id, "weight": share}]}
"""

from __future__ import annotations

from collections import Counter

import torch
from tqdm.auto import tqdm

from .attribution import load_attributions
from .collect import load_images
from .concepts import load_concept_cards
from .errors import ConfigError
from .store import RunStore, load_json, save_json

SCHEMA = "gig.graph/1"


#: Edge-weight definitions: ``flow`` (the default, see above); ``share`` (``GIG_t[q] / Δg_t`` alone,
#: the definition before flows: unbounded where ``Δg_t`` is small); ``flow-l1`` (``I[t] ·
#: GIG_t[q] / Σ_q' |GIG_t[q']|``: bounded by ``|I[t]|``, equal to ``flow`` when no attribution of
#: the path cancels another).
EDGE_RULES = ("flow", "share", "flow-l1")


def edge_weights(data: dict[str, torch.Tensor], rows: torch.Tensor, layers: list[str],
                 rule: str = "flow") -> dict[str, torch.Tensor]:
    """Mean edge weights over the images ``rows``: ``{lower: (K_upper, K_lower)}``; an image adds 0
    to edges into targets it did not reach. Never materialises ``(images, K_upper, K_lower)``."""
    if rule not in EDGE_RULES:
        raise ConfigError(f"unknown edge rule {rule!r}: use one of {', '.join(EDGE_RULES)}")
    edges = {}
    for position, lower in enumerate(layers[:-1]):
        upper = layers[position + 1]
        gig = data[f"{lower}/gig"][rows]  # (n, k, K_lo)
        if rule == "flow-l1":
            per_image = gig / gig.abs().sum(-1, keepdim=True).clamp_min(1e-12)
        else:
            per_image = gig / _safe(data[f"{lower}/delta"][rows])[..., None]
        if rule != "share":
            per_image = per_image * data[f"{upper}/importance"][rows][..., None]
        total = torch.zeros(data[f"{upper}/score"].shape[1], gig.shape[2])
        total.index_add_(0, data[f"{lower}/targets"][rows].flatten(), per_image.flatten(0, 1))
        edges[lower] = total / max(len(rows), 1)
    return edges


def _mean_over(data: dict[str, torch.Tensor], rows: torch.Tensor, layers: list[str], rule: str = "flow"):
    """Mean node importances ``{layer: (K,)}`` and edge weights ``{lower: (K_upper, K_lower)}``."""
    scores = {layer: data[f"{layer}/score"][rows].mean(0) for layer in layers}
    return scores, edge_weights(data, rows, layers, rule)


def _safe(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d.abs() < 1e-8, torch.full_like(d, 1e-8), d)


def _shown_edges(kept: dict[str, list[int]], edges: dict[str, torch.Tensor], layers: list[str],
                 edges_per_node: int) -> list[tuple[str, int, int, float]]:
    """The ``edges_per_node`` strongest non-zero edges into every kept upper node:
    ``(lower layer, lower concept, upper concept, weight)``."""
    shown = []
    for position, lower in enumerate(layers[:-1]):
        upper = layers[position + 1]
        for t in kept[upper]:
            weights = edges[lower][t]
            ranked = sorted(kept[lower], key=lambda q: -float(weights[q]))[:edges_per_node]
            shown += [(lower, q, t, float(weights[q])) for q in ranked if float(weights[q]) != 0.0]
    return shown


def rule_agreement(data: dict[str, torch.Tensor], rows: torch.Tensor, layers: list[str],
                   kept: dict[str, list[int]], edges_per_node: int) -> dict[str, float]:
    """For each alternative edge rule: the fraction of the shown ``flow`` edges it would show too
    (same nodes, same pruning); 1.0 means the picture does not depend on the choice."""
    base = {(l, q, t) for l, q, t, _ in _shown_edges(kept, edge_weights(data, rows, layers), layers, edges_per_node)}
    out = {}
    for rule in EDGE_RULES[1:]:
        other = {(l, q, t) for l, q, t, _ in
                 _shown_edges(kept, edge_weights(data, rows, layers, rule), layers, edges_per_node)}
        out[rule] = len(base & other) / len(base) if base else 1.0
    return out


def build_graph(store: RunStore, kind: str = "class", classes: list[int] | None = None,
                image_id: int | None = None, top_k: int | None = None,
                edges_per_node: int | None = None, class_names: list[str] | None = None,
                data: dict[str, torch.Tensor] | None = None) -> dict:
    """Build one graph as a JSON-able dict (see the module docstring for the schema).

    ``data``: the run's attributions if already loaded (:func:`load_attributions`), so that many
    graphs of one run read the shards once."""
    config = store.config
    top_k = top_k or config.top_k
    edges_per_node = edges_per_node or config.edges_per_node
    layers = config.layers
    data = load_attributions(store) if data is None else data
    ids = data["image_id"]
    images = {i["image_id"]: i for i in load_images(store)["images"]}
    targets = torch.tensor([images[int(i)]["target"] for i in ids])
    if kind == "image":
        if image_id is None or image_id not in images:
            raise ConfigError(f"image id {image_id} is not in this run ({len(images)} images)")
        rows = (ids == image_id).nonzero().flatten()
        classes = [images[image_id]["target"]]
    elif kind == "global":
        rows = torch.arange(len(ids))
        classes = []
    elif kind in ("class", "shared"):
        if not classes:
            raise ConfigError(f"a {kind} graph needs at least one class")
        rows = torch.isin(targets, torch.tensor(classes)).nonzero().flatten()
        if rows.numel() == 0:
            raise ConfigError(f"no image in this run has target class(es) {classes}")
    else:
        raise ConfigError(f"unknown graph kind {kind!r}: class, shared, global or image")

    scores, edges = _mean_over(data, rows, layers)
    in_top_of: dict[tuple[str, int], list[int]] = {}
    if kind == "shared":
        for c in classes:
            class_rows = rows[targets[rows] == c]
            class_scores, _ = _mean_over(data, class_rows, layers)
            for layer in layers:
                for q in class_scores[layer].topk(min(top_k, class_scores[layer].numel())).indices.tolist():
                    in_top_of.setdefault((layer, q), []).append(c)

    cards = {layer: load_concept_cards(store, layer)["concepts"] for layer in layers}
    names = class_names or []
    kept: dict[str, list[int]] = {}
    nodes: list[dict] = []
    for level, layer in enumerate(layers):
        chosen = scores[layer].topk(min(top_k, scores[layer].numel())).indices.tolist()
        if kind == "shared":  # every concept shared by two or more classes is kept too
            chosen += [q for (l, q), cs in in_top_of.items() if l == layer and len(cs) > 1 and q not in chosen]
        kept[layer] = chosen
        for q in chosen:
            card = cards[layer][q]
            nodes.append({
                "id": f"{layer}:{q}", "layer": layer, "level": level, "concept": q,
                "importance": float(scores[layer][q]), "count": card["count"],
                "top_classes": card["top_classes"], "exemplars": card["exemplars"],
                "shared": len(in_top_of.get((layer, q), [])) > 1,
                "in_top_of": in_top_of.get((layer, q), []),
            })
    out_edges: list[dict] = []
    top_layer = layers[-1]
    top_ids = [f"{top_layer}:{q}" for q in kept[top_layer]]
    if kind == "global":
        head = [{"id": "logit", "layer": "classifier", "level": len(layers), "class": None,
                 "name": "target logit", "importance": 1.0}]
        out_edges += [{"source": s, "target": "logit", "weight": float(scores[top_layer][q])}
                      for s, q in zip(top_ids, kept[top_layer])]
    else:
        head = []
        for c in classes:
            class_rows = rows[targets[rows] == c]
            class_score = data[f"{top_layer}/score"][class_rows].mean(0)
            head.append({"id": f"class:{c}", "layer": "classifier", "level": len(layers), "class": c,
                         "name": _name(names, c), "importance": 1.0, "n_images": int(class_rows.numel())})
            ranked = sorted(kept[top_layer], key=lambda q: -float(class_score[q]))[:edges_per_node]
            out_edges += [{"source": f"{top_layer}:{q}", "target": f"class:{c}", "weight": float(class_score[q])}
                          for q in ranked]
    nodes += head
    out_edges += [{"source": f"{lower}:{q}", "target": f"{layers[layers.index(lower) + 1]}:{t}", "weight": w}
                  for lower, q, t, w in _shown_edges(kept, edges, layers, edges_per_node)]
    return {
        "schema": SCHEMA, "kind": kind, "model": config.model, "layers": layers,
        "classes": [{"index": c, "name": _name(names, c)} for c in classes],
        "image_ids": [int(ids[r]) for r in rows], "n_images": int(rows.numel()),
        "top_k": top_k, "edges_per_node": edges_per_node, "edge_rule": "flow",
        "edge_rule_agreement": rule_agreement(data, rows, layers, kept, edges_per_node),
        "nodes": nodes, "edges": out_edges,
    }


def _name(names: list[str], c: int) -> str:
    return names[c] if 0 <= c < len(names) else f"class {c}"


def default_classes(store: RunStore, n: int = 3) -> list[int]:
    """The configured graph classes, else the ``n`` most frequent target classes of the run."""
    if store.config.graph_classes:
        return list(store.config.graph_classes)
    counts = Counter(i["target"] for i in load_images(store)["images"])
    return [c for c, _ in counts.most_common(n)]


def build_graphs(store: RunStore, class_names: list[str], progress: bool = True,
                 figure: bool = True, figure_fn=None) -> None:
    """Stage 6 into ``store/graph``: class graphs, the shared graph, the global graph, an index."""
    store.require("attribute")
    with store.stage("graph") as summary:
        out = store.stage_dir("graph")
        classes = default_classes(store)
        files = {"class": {}, "shared": None, "global": None}
        for c in tqdm(classes, desc="graph", unit="class", disable=not progress):
            graph = build_graph(store, "class", [c], class_names=class_names)
            path = out / f"class_{c}.json"
            save_json(path, graph)
            files["class"][str(c)] = path.name
            if figure and figure_fn is not None:
                figure_fn(store, graph, out / f"class_{c}")
        if len(classes) > 1:
            save_json(out / "shared.json", build_graph(store, "shared", classes, class_names=class_names))
            files["shared"] = "shared.json"
        save_json(out / "global.json", build_graph(store, "global", class_names=class_names))
        files["global"] = "global.json"
        save_json(out / "index.json", {"classes": classes, "files": files})
        summary.update({"classes": classes, "files": files})


def graph_index(store: RunStore) -> dict:
    return load_json(store.root / "graph" / "index.json")
