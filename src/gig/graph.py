"""Stage 6 — dataset-wide causal concept graphs from the per-image GIG walks.

Edge weights are *shares*: ``GIG[t, q] / Δg_t``, the part of target ``t``'s change (its logit,
or its readout at the upper layer) that concept ``q`` of the layer below accounts for. A graph
over several images averages the shares (0 where an image did not reach the edge), and node
importances likewise. Kinds: ``class`` (images whose target is one class), ``shared`` (several
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

from .attribution import load_attributions
from .collect import load_images
from .concepts import load_concept_cards
from .store import RunStore, load_json, save_json

SCHEMA = "gig.graph/1"


def _mean_over(data: dict[str, torch.Tensor], rows: torch.Tensor, layers: list[str]):
    """Mean node scores ``{layer: (K,)}`` and edge shares ``{lower: (K_upper, K_lower)}``."""
    scores = {layer: data[f"{layer}/score"][rows].mean(0) for layer in layers}
    edges = {}
    for position, lower in enumerate(layers[:-1]):
        upper = layers[position + 1]
        k_upper = data[f"{upper}/score"].shape[1]
        share = data[f"{lower}/gig"][rows] / _safe(data[f"{lower}/delta"][rows])[..., None]  # (n, k, K_lo)
        targets = data[f"{lower}/targets"][rows]  # (n, k)
        # Sum each image's rows into its targets' rows; targets an image did not reach add 0.
        total = torch.zeros(k_upper, share.shape[2])
        total.index_add_(0, targets.flatten(), share.flatten(0, 1))
        edges[lower] = total / max(len(rows), 1)
    return scores, edges


def _safe(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d.abs() < 1e-8, torch.full_like(d, 1e-8), d)


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
            raise ValueError(f"image id {image_id} is not in this run ({len(images)} images)")
        rows = (ids == image_id).nonzero().flatten()
        classes = [images[image_id]["target"]]
    elif kind == "global":
        rows = torch.arange(len(ids))
        classes = []
    elif kind in ("class", "shared"):
        if not classes:
            raise ValueError(f"a {kind} graph needs at least one class")
        rows = torch.isin(targets, torch.tensor(classes)).nonzero().flatten()
        if rows.numel() == 0:
            raise ValueError(f"no image in this run has target class(es) {classes}")
    else:
        raise ValueError(f"unknown graph kind {kind!r}: class, shared, global or image")

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
    for position, lower in enumerate(layers[:-1]):
        upper = layers[position + 1]
        for t in kept[upper]:
            weights = edges[lower][t]
            ranked = sorted(kept[lower], key=lambda q: -float(weights[q]))[:edges_per_node]
            out_edges += [{"source": f"{lower}:{q}", "target": f"{upper}:{t}", "weight": float(weights[q])}
                          for q in ranked if float(weights[q]) != 0.0]
    return {
        "schema": SCHEMA, "kind": kind, "model": config.model, "layers": layers,
        "classes": [{"index": c, "name": _name(names, c)} for c in classes],
        "image_ids": [int(ids[r]) for r in rows], "n_images": int(rows.numel()),
        "top_k": top_k, "edges_per_node": edges_per_node,
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
        for c in classes:
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
