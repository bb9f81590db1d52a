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
                "exemplars": [sample indices], "shared": false, "in_top_of": [c, ...],
                "position": slot in its row (see node_rows)},
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
from .models import class_name
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


def _graph_rows(kind: str, ids: torch.Tensor, targets: torch.Tensor, classes: list[int] | None,
                image_id: int | None) -> tuple[torch.Tensor, list[int]]:
    """The attribution rows a graph averages over, and its classes."""
    if kind == "image":
        rows = (ids == image_id).nonzero().flatten() if image_id is not None else torch.zeros(0, dtype=torch.long)
        if rows.numel() == 0:
            raise ConfigError(f"image id {image_id} is not in this run ({len(ids)} images with attributions)")
        return rows, [int(targets[rows[0]])]
    if kind == "global":
        return torch.arange(len(ids)), []
    if kind in ("class", "shared"):
        if not classes:
            raise ConfigError(f"a {kind} graph needs at least one class")
        rows = torch.isin(targets, torch.tensor(classes)).nonzero().flatten()
        if rows.numel() == 0:
            raise ConfigError(f"no image in this run has target class(es) {classes}")
        return rows, list(classes)
    raise ConfigError(f"unknown graph kind {kind!r}: class, shared, global or image")


def _shared_tops(data: dict[str, torch.Tensor], rows: torch.Tensor, targets: torch.Tensor, classes: list[int],
                 layers: list[str], top_k: int) -> dict[tuple[str, int], list[int]]:
    """``{(layer, concept): [classes whose own top-k holds it]}`` (for shared graphs)."""
    in_top_of: dict[tuple[str, int], list[int]] = {}
    for c in classes:
        class_scores, _ = _mean_over(data, rows[targets[rows] == c], layers)
        for layer in layers:
            for q in class_scores[layer].topk(min(top_k, class_scores[layer].numel())).indices.tolist():
                in_top_of.setdefault((layer, q), []).append(c)
    return in_top_of


def _concept_nodes(store: RunStore, scores: dict[str, torch.Tensor], in_top_of: dict, top_k: int,
                   shared_kind: bool) -> tuple[dict[str, list[int]], list[dict]]:
    """The kept concepts per layer (top-k by mean importance, plus every shared one in a shared
    graph) and their nodes."""
    kept: dict[str, list[int]] = {}
    nodes: list[dict] = []
    for level, layer in enumerate(store.config.layers):
        cards = load_concept_cards(store, layer)["concepts"]
        chosen = scores[layer].topk(min(top_k, scores[layer].numel())).indices.tolist()
        if shared_kind:  # every concept shared by two or more classes is kept too
            chosen += [q for (l, q), cs in in_top_of.items() if l == layer and len(cs) > 1 and q not in chosen]
        kept[layer] = chosen
        nodes += [{"id": f"{layer}:{q}", "layer": layer, "level": level, "concept": q,
                   "importance": float(scores[layer][q]), "count": cards[q]["count"],
                   "top_classes": cards[q]["top_classes"], "exemplars": cards[q]["exemplars"],
                   "shared": len(in_top_of.get((layer, q), [])) > 1, "in_top_of": in_top_of.get((layer, q), [])}
                  for q in chosen]
    return kept, nodes


def _head(data: dict[str, torch.Tensor], rows: torch.Tensor, targets: torch.Tensor, classes: list[int],
          kept_top: list[int], top_layer: str, scores_top: torch.Tensor, names: list[str],
          edges_per_node: int, global_kind: bool) -> tuple[list[dict], list[dict]]:
    """The classifier row (one node per class, or one "target logit" node) and its edges."""
    top_ids = [f"{top_layer}:{q}" for q in kept_top]
    if global_kind:
        head = [{"id": "logit", "layer": "classifier", "level": None, "class": None,
                 "name": "target logit", "importance": 1.0}]
        return head, [{"source": s, "target": "logit", "weight": float(scores_top[q])} for s, q in zip(top_ids, kept_top)]
    head, edges = [], []
    for c in classes:
        class_rows = rows[targets[rows] == c]
        class_score = data[f"{top_layer}/score"][class_rows].mean(0)
        head.append({"id": f"class:{c}", "layer": "classifier", "level": None, "class": c,
                     "name": class_name(names, c), "importance": 1.0, "n_images": int(class_rows.numel())})
        ranked = sorted(kept_top, key=lambda q: -float(class_score[q]))[:edges_per_node]
        edges += [{"source": f"{top_layer}:{q}", "target": f"class:{c}", "weight": float(class_score[q])} for q in ranked]
    return head, edges


def build_graph(store: RunStore, kind: str = "class", classes: list[int] | None = None,
                image_id: int | None = None, top_k: int | None = None,
                edges_per_node: int | None = None, class_names: list[str] | None = None,
                data: dict[str, torch.Tensor] | None = None, targets: dict[int, int] | None = None) -> dict:
    """Build one graph as a JSON-able dict (see the module docstring for the schema).

    ``data``: attributions if already loaded (:func:`load_attributions`, so that many graphs of
    one run read the shards once), or the walk of images that are not the run's
    (:func:`gig.explain.explain`), whose target classes ``targets`` (``{image id: class}``) then
    gives; by default the targets are the run's (collect stage)."""
    config = store.config
    top_k = top_k or config.top_k
    edges_per_node = edges_per_node or config.edges_per_node
    layers = config.layers
    data = load_attributions(store) if data is None else data
    ids = data["image_id"]
    if targets is None:
        targets = {int(i["image_id"]): int(i["target"]) for i in load_images(store)["images"]}
    target_vec = torch.tensor([targets[int(i)] for i in ids], dtype=torch.long)
    rows, classes = _graph_rows(kind, ids, target_vec, classes, image_id)
    scores, edges = _mean_over(data, rows, layers)
    in_top_of = _shared_tops(data, rows, target_vec, classes, layers, top_k) if kind == "shared" else {}
    kept, nodes = _concept_nodes(store, scores, in_top_of, top_k, kind == "shared")
    names = class_names or []
    head, out_edges = _head(data, rows, target_vec, classes, kept[layers[-1]], layers[-1], scores[layers[-1]],
                            names, edges_per_node, kind == "global")
    for node in head:
        node["level"] = len(layers)
    out_edges += [{"source": f"{lower}:{q}", "target": f"{layers[layers.index(lower) + 1]}:{t}", "weight": w}
                  for lower, q, t, w in _shown_edges(kept, edges, layers, edges_per_node)]
    return with_positions({
        "schema": SCHEMA, "kind": kind, "model": config.model, "layers": layers,
        "classes": [{"index": c, "name": class_name(names, c)} for c in classes],
        "image_ids": [int(ids[r]) for r in rows], "n_images": int(rows.numel()),
        "top_k": top_k, "edges_per_node": edges_per_node, "edge_rule": "flow",
        "edge_rule_agreement": rule_agreement(data, rows, layers, kept, edges_per_node),
        "nodes": nodes + head, "edges": out_edges,
    })


def _barycentre_rows(graph: dict) -> dict[int, list[dict]]:
    """Nodes per level, the top row (classifier) in the JSON's order, every row below ordered by
    the weighted mean slot of the upper nodes it feeds (edge weight as weight), so strong paths
    run straight down; nodes with no edge up go last, by importance."""
    rows: dict[int, list[dict]] = {}
    for node in graph["nodes"]:
        rows.setdefault(int(node["level"]), []).append(node)
    ups: dict[str, list[tuple[str, float]]] = {}
    for edge in graph["edges"]:
        ups.setdefault(edge["source"], []).append((edge["target"], abs(float(edge["weight"] or 0.0))))
    x: dict[str, float] = {}

    def key(node: dict) -> tuple:
        links = [(x[t], w) for t, w in ups.get(node["id"], []) if t in x]
        if not links:
            return (1, -float(node.get("importance") or 0.0))
        total = sum(w for _, w in links)
        centre = (sum(px * w for px, w in links) / total if total > 0
                  else sum(px for px, _ in links) / len(links))
        return (0, centre, -float(node.get("importance") or 0.0))

    for level in sorted(rows, reverse=True):
        if level != max(rows):
            rows[level] = sorted(rows[level], key=key)
        for i, node in enumerate(rows[level]):
            x[node["id"]] = i - (len(rows[level]) - 1) / 2
    return rows


def node_rows(graph: dict) -> dict[int, list[dict]]:
    """``{level: [node, ...]}`` in row order: by the nodes' ``position`` when the graph has them
    (every graph built since gig 0.2), else by the barycentre rule that sets them. The one node
    order of gig: the static figure (:func:`gig.visual.draw_graph`) and the report's viewer
    (``report.js``, which reads ``position``) both follow it."""
    if graph["nodes"] and all("position" in n for n in graph["nodes"]):
        rows: dict[int, list[dict]] = {}
        for node in sorted(graph["nodes"], key=lambda n: n["position"]):
            rows.setdefault(int(node["level"]), []).append(node)
        return rows
    return _barycentre_rows(graph)


def with_positions(graph: dict) -> dict:
    """``graph`` with every node's slot in its row (``position``, 0 = leftmost) set by :func:`node_rows`."""
    slot = {n["id"]: i for nodes in node_rows(graph).values() for i, n in enumerate(nodes)}
    return {**graph, "nodes": [{**n, "position": slot[n["id"]]} for n in graph["nodes"]]}


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
