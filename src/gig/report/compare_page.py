"""The offline page of ``gig compare``: ``DIR/index.html`` in the report's style.

Per layer pair: the matching's figures, the best-matched concepts with the top exemplar crop of
each run side by side, and the active concepts without counterpart; per graph both runs built:
the nodes and edges kept (with both weights and the difference's interval), lost and gained. The
page holds no script: all text from the runs reaches it through jinja2's autoescaping, and the
crops are files under ``DIR/crops/`` (or data URIs with ``single_file``).
"""

from __future__ import annotations

from pathlib import Path

from ..access import RunAccess
from ..artefacts import load_concept_cards
from .page import Assets, render_page

#: rows shown per table (matched concepts, unmatched ones of each run, graph changes)
ROWS = 24


def _crops(access: RunAccess, layer: str, concepts: list[int], assets: Assets, tag: str) -> dict[int, str]:
    """``{concept: URL}`` of each concept's top-1 exemplar crop (ERF), computed once per layer."""
    if not concepts:
        return {}
    cards = {c["id"]: c for c in load_concept_cards(access.store, layer)["concepts"]}
    top1 = {q: int(cards[q]["exemplars"][0]) for q in concepts if cards.get(q, {}).get("exemplars")}
    paths = access.crops(layer, list(top1.values()))
    return {q: assets.add_file(f"crops/{tag}/{layer}/s{s}.png", p) for (q, s), p in zip(top1.items(), paths)}


def _layer_view(pair: dict, access_a: RunAccess, access_b: RunAccess, assets: Assets) -> dict:
    rows = [c for c in pair["concepts"] if c["counterpart"]]
    rows.sort(key=lambda c: -c["similarity"])
    matched = rows[:ROWS]
    lost = pair["unmatched_a"][:ROWS]
    gained = pair["unmatched_b"][:ROWS]
    crops_a = _crops(access_a, pair["layer_a"], [c["concept"] for c in matched] + lost, assets, "a")
    crops_b = _crops(access_b, pair["layer_b"], [c["match"] for c in matched] + gained, assets, "b")
    best = {c["concept"]: c for c in pair["concepts"]}
    return {
        **{k: v for k, v in pair.items() if k != "concepts"},
        "matched": [{**c, "crop_a": crops_a.get(c["concept"]), "crop_b": crops_b.get(c["match"])} for c in matched],
        "n_matched": sum(c["counterpart"] for c in pair["concepts"]),
        "lost": [{"concept": q, "crop": crops_a.get(q), "similarity": best[q]["similarity"]} for q in lost],
        "gained": [{"concept": r, "crop": crops_b.get(r)} for r in gained],
    }


def _graph_view(name: str, diff: dict, class_name) -> dict:
    title = "global graph" if name == "global" else name
    if name.startswith("class_") and name[6:].isdigit():
        title = f"class {name[6:]}: {class_name(int(name[6:]))}"
    # Kept nodes whose weight changed significantly first, then by the size of the change.
    kept = sorted(diff["nodes"]["kept"], key=lambda k: (not k.get("changed", False), -abs(k["difference"])))
    edges = [k for k in diff["edges"]["kept"] if k.get("changed")]
    edges.sort(key=lambda k: -abs(k["difference"]))
    return {
        "name": name,
        "title": title,
        "node_recurrence": diff["node_recurrence"],
        "edge_recurrence": diff["edge_recurrence"],
        "counts": {part: {k: len(v) for k, v in diff[part].items()} for part in ("nodes", "edges")},
        "kept_nodes": kept[:ROWS],
        "lost_nodes": diff["nodes"]["lost"][:ROWS],
        "gained_nodes": diff["nodes"]["gained"][:ROWS],
        "changed_edges": edges[:ROWS],
    }


def write_compare_page(
    result: dict, access_a: RunAccess, access_b: RunAccess, out: Path, single_file: bool = False
) -> Path:
    """Write ``out/index.html`` for a :func:`gig.compare.compare_runs` result; returns its path."""
    out = Path(out)
    assets = Assets(out, inline=single_file)
    layers = [_layer_view(pair, access_a, access_b, assets) for pair in result["layers"]]
    graphs = [_graph_view(name, diff, access_a.class_name) for name, diff in result["graphs"].items()]
    context = {
        "page_data": {"schema": result["schema"]},
        "result": result,
        "layers": layers,
        "graphs": graphs,
    }
    return render_page(out, assets, context, access_a.class_name, template="compare.html.j2")
