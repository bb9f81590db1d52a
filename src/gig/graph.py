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
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from .attribution import iter_attributions
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


#: The attribution fields a graph reads (:func:`gig.attribution.iter_attributions`): no maps.
GRAPH_FIELDS = ("score", "gig", "delta", "importance", "targets")


def edge_sums(data: dict[str, torch.Tensor], rows: torch.Tensor, layers: list[str],
              rule: str = "flow") -> dict[str, torch.Tensor]:
    """Summed edge weights over the images ``rows``: ``{lower: (K_upper, K_lower)}``; an image adds
    0 to edges into targets it did not reach. Never materialises ``(images, K_upper, K_lower)``."""
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
        edges[lower] = total
    return edges


def edge_weights(data: dict[str, torch.Tensor], rows: torch.Tensor, layers: list[str],
                 rule: str = "flow") -> dict[str, torch.Tensor]:
    """Mean edge weights over the images ``rows``: ``{lower: (K_upper, K_lower)}`` (:func:`edge_sums`
    over the number of images)."""
    return {lower: total / max(len(rows), 1) for lower, total in edge_sums(data, rows, layers, rule).items()}


def _safe(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d.abs() < 1e-8, torch.full_like(d, 1e-8), d)


class GroupSums:
    """Node-importance and edge-weight sums of one group of images (a class, all images, one
    image), added shard by shard, so a graph of any number of images holds ``(K,)`` and
    ``(K_upper, K_lower)`` sums, never the images' attributions."""

    def __init__(self, layers: list[str]):
        self.layers = layers
        self.n = 0
        self.image_ids: list[int] = []
        self.score_sums: dict[str, torch.Tensor] = {}
        self.edge_totals: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, data: dict[str, torch.Tensor], rows: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        self.n += int(rows.numel())
        self.image_ids += [int(i) for i in data["image_id"][rows]]
        for layer in self.layers:
            _add_into(self.score_sums, layer, data[f"{layer}/score"][rows].sum(0))
        for rule in EDGE_RULES:
            for lower, total in edge_sums(data, rows, self.layers, rule).items():
                _add_into(self.edge_totals.setdefault(rule, {}), lower, total)

    @classmethod
    def merged(cls, groups: list["GroupSums"]) -> "GroupSums":
        out = cls(groups[0].layers)
        for g in groups:
            out.n += g.n
            out.image_ids += g.image_ids
            for layer, v in g.score_sums.items():
                _add_into(out.score_sums, layer, v)
            for rule, totals in g.edge_totals.items():
                for lower, v in totals.items():
                    _add_into(out.edge_totals.setdefault(rule, {}), lower, v)
        out.image_ids.sort()
        return out

    def scores(self) -> dict[str, torch.Tensor]:
        """Mean node importances ``{layer: (K,)}``."""
        return {layer: v / max(self.n, 1) for layer, v in self.score_sums.items()}

    def edges(self, rule: str = "flow") -> dict[str, torch.Tensor]:
        """Mean edge weights ``{lower: (K_upper, K_lower)}`` under ``rule``."""
        return {lower: v / max(self.n, 1) for lower, v in self.edge_totals.get(rule, {}).items()}


def _add_into(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value.clone()


def group_sums(parts: Iterable[dict[str, torch.Tensor]], groups: dict, targets: dict[int, int],
               layers: list[str]) -> dict:
    """One pass over the attribution ``parts`` (shards, or a walk's output): ``{key: GroupSums}``
    for every ``groups[key]``, which is ``("class", c)``, ``("image", id)`` or ``("all", None)``."""
    sums = {key: GroupSums(layers) for key in groups}
    for part in parts:
        ids = part["image_id"]
        part_targets = torch.tensor([targets[int(i)] for i in ids], dtype=torch.long)
        for key, (kind, value) in groups.items():
            if kind == "all":
                rows = torch.arange(len(ids))
            else:
                rows = ((part_targets if kind == "class" else ids) == value).nonzero().flatten()
            sums[key].add(part, rows)
    return sums


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


def rule_agreement(group: GroupSums, layers: list[str], kept: dict[str, list[int]],
                   edges_per_node: int) -> dict[str, float]:
    """For each alternative edge rule: the fraction of the shown ``flow`` edges it would show too
    (same nodes, same pruning); 1.0 means the picture does not depend on the choice."""
    base = {(l, q, t) for l, q, t, _ in _shown_edges(kept, group.edges(), layers, edges_per_node)}
    out = {}
    for rule in EDGE_RULES[1:]:
        other = {(l, q, t) for l, q, t, _ in _shown_edges(kept, group.edges(rule), layers, edges_per_node)}
        out[rule] = len(base & other) / len(base) if base else 1.0
    return out


def _groups(kind: str, classes: list[int] | None, image_id: int | None) -> dict:
    """The image groups a graph of ``kind`` sums over (see :func:`group_sums`)."""
    if kind == "image":
        return {"image": ("image", image_id)}
    if kind == "global":
        return {"all": ("all", None)}
    if kind in ("class", "shared"):
        if not classes:
            raise ConfigError(f"a {kind} graph needs at least one class")
        return {c: ("class", c) for c in classes}
    raise ConfigError(f"unknown graph kind {kind!r}: class, shared, global or image")


def _shared_tops(per_class: dict[int, GroupSums], layers: list[str], top_k: int) -> dict[tuple[str, int], list[int]]:
    """``{(layer, concept): [classes whose own top-k holds it]}`` (for shared graphs)."""
    in_top_of: dict[tuple[str, int], list[int]] = {}
    for c, group in per_class.items():
        class_scores = group.scores()
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


def _head(per_class: dict[int, GroupSums], kept_top: list[int], top_layer: str, scores_top: torch.Tensor,
          names: list[str], edges_per_node: int, global_kind: bool) -> tuple[list[dict], list[dict]]:
    """The classifier row (one node per class, or one "target logit" node) and its edges."""
    top_ids = [f"{top_layer}:{q}" for q in kept_top]
    if global_kind:
        head = [{"id": "logit", "layer": "classifier", "level": None, "class": None,
                 "name": "target logit", "importance": 1.0}]
        return head, [{"source": s, "target": "logit", "weight": float(scores_top[q])} for s, q in zip(top_ids, kept_top)]
    head, edges = [], []
    for c, group in per_class.items():
        class_score = group.scores()[top_layer]
        head.append({"id": f"class:{c}", "layer": "classifier", "level": None, "class": c,
                     "name": class_name(names, c), "importance": 1.0, "n_images": group.n})
        ranked = sorted(kept_top, key=lambda q: -float(class_score[q]))[:edges_per_node]
        edges += [{"source": f"{top_layer}:{q}", "target": f"class:{c}", "weight": float(class_score[q])} for q in ranked]
    return head, edges


def run_targets(store: RunStore) -> dict[int, int]:
    """``{image id: target class}`` of the run's images (collect stage)."""
    return {int(i["image_id"]): int(i["target"]) for i in load_images(store)["images"]}


def build_graph(store: RunStore, kind: str = "class", classes: list[int] | None = None,
                image_id: int | None = None, top_k: int | None = None,
                edges_per_node: int | None = None, class_names: list[str] | None = None,
                data: dict[str, torch.Tensor] | None = None, targets: dict[int, int] | None = None) -> dict:
    """Build one graph as a JSON-able dict (see the module docstring for the schema).

    ``data``: attributions if already loaded (:func:`load_attributions`), or the walk of images
    that are not the run's (:func:`gig.explain.explain`), whose target classes ``targets``
    (``{image id: class}``) then gives; by default the targets are the run's (collect stage) and
    the attributions are read shard by shard, only the graph's images and no maps."""
    groups = _groups(kind, classes, image_id)
    targets = run_targets(store) if targets is None else targets
    if data is not None:
        parts: Iterable[dict] = [data]
    else:
        wanted = ([image_id] if kind == "image" else
                  [i for i, t in targets.items() if t in set(classes or [])] if kind in ("class", "shared") else None)
        parts = iter_attributions(store, GRAPH_FIELDS, wanted)
    sums = group_sums(parts, groups, targets, store.config.layers)
    if kind == "image":  # headed by the image's own target class
        if sums["image"].n == 0:
            raise ConfigError(f"image id {image_id} is not in this run's attributions")
        sums = {targets[int(image_id)]: sums["image"]}
    return graph_from_sums(store, kind, sums, top_k, edges_per_node, class_names)


def graph_from_sums(store: RunStore, kind: str, sums: dict, top_k: int | None = None,
                    edges_per_node: int | None = None, class_names: list[str] | None = None) -> dict:
    """One graph from its groups' sums: ``{class: GroupSums}`` for a class, shared or image graph
    (an image graph's one class is the image's target), ``{"all": GroupSums}`` for the global one."""
    config = store.config
    top_k = top_k or config.top_k
    edges_per_node = edges_per_node or config.edges_per_node
    layers = config.layers
    per_class = {} if kind == "global" else sums
    group = GroupSums.merged(list(sums.values()))
    if group.n == 0:
        raise ConfigError(f"no image in this run has target class(es) {list(per_class)}")
    scores, edges = group.scores(), group.edges()
    in_top_of = _shared_tops(per_class, layers, top_k) if kind == "shared" else {}
    kept, nodes = _concept_nodes(store, scores, in_top_of, top_k, kind == "shared")
    head, out_edges = _head(per_class, kept[layers[-1]], layers[-1], scores[layers[-1]],
                            class_names or [], edges_per_node, kind == "global")
    for node in head:
        node["level"] = len(layers)
    out_edges += [{"source": f"{lower}:{q}", "target": f"{layers[layers.index(lower) + 1]}:{t}", "weight": w}
                  for lower, q, t, w in _shown_edges(kept, edges, layers, edges_per_node)]
    return with_positions({
        "schema": SCHEMA, "kind": kind, "model": config.model, "layers": layers,
        "classes": [{"index": c, "name": class_name(class_names or [], c)} for c in per_class],
        "image_ids": group.image_ids, "n_images": group.n,
        "top_k": top_k, "edges_per_node": edges_per_node, "edge_rule": "flow",
        "edge_rule_agreement": rule_agreement(group, layers, kept, edges_per_node),
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
        # one pass over the shards sums every graph's groups: memory is one shard plus the sums
        groups = {**_groups("class", classes, None), **_groups("global", None, None)}
        shards = iter_attributions(store, GRAPH_FIELDS)
        sums = group_sums(tqdm(shards, desc="graph: sums", unit="shard", disable=not progress), groups,
                          run_targets(store), store.config.layers)
        for c in tqdm(classes, desc="graph", unit="class", disable=not progress):
            graph = graph_from_sums(store, "class", {c: sums[c]}, class_names=class_names)
            path = out / f"class_{c}.json"
            save_json(path, graph)
            files["class"][str(c)] = path.name
            if figure and figure_fn is not None:
                figure_fn(store, graph, out / f"class_{c}")
        if len(classes) > 1:
            save_json(out / "shared.json",
                      graph_from_sums(store, "shared", {c: sums[c] for c in classes}, class_names=class_names))
            files["shared"] = "shared.json"
        save_json(out / "global.json", graph_from_sums(store, "global", {"all": sums["all"]}, class_names=class_names))
        files["global"] = "global.json"
        save_json(out / "index.json", {"classes": classes, "files": files})
        summary.update({"classes": classes, "files": files})


def graph_index(store: RunStore) -> dict:
    return load_json(store.root / "graph" / "index.json")
