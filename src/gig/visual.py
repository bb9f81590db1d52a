"""Static pictures for papers: a class graph in the paper's style (SVG and PNG).

Rows of concept nodes per layer, classifier on top; each node shows the ERF crop of its top-1
exemplar PFV when the crops are available, and edges are drawn with width and colour by weight.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.offsetbox import AnnotationBbox, OffsetImage  # noqa: E402
from PIL import Image  # noqa: E402


def node_positions(graph: dict) -> dict[str, tuple[float, float]]:
    """``{node id: (x, y)}``: one row per level, nodes spread evenly, ordered by importance."""
    rows: dict[int, list[dict]] = {}
    for node in graph["nodes"]:
        rows.setdefault(node["level"], []).append(node)
    pos = {}
    for level, nodes in rows.items():
        nodes.sort(key=lambda n: -n.get("importance", 0.0))
        for i, node in enumerate(nodes):
            pos[node["id"]] = ((i + 1) / (len(nodes) + 1), float(level))
    return pos


def draw_graph(graph: dict, out_stem: Path, thumbnails: dict[str, Path] | None = None,
               title: str | None = None) -> list[Path]:
    """Draw ``graph`` to ``out_stem.svg`` and ``out_stem.png``; returns the written paths."""
    thumbnails = thumbnails or {}
    pos = node_positions(graph)
    levels = len(graph["layers"]) + 1
    fig, ax = plt.subplots(figsize=(10, 1.8 * levels))
    weights = [abs(e["weight"]) for e in graph["edges"]] or [1.0]
    top = max(weights) or 1.0
    cmap = plt.get_cmap("Blues")
    for edge in graph["edges"]:
        if edge["source"] not in pos or edge["target"] not in pos:
            continue
        (x0, y0), (x1, y1) = pos[edge["source"]], pos[edge["target"]]
        strength = abs(edge["weight"]) / top
        ax.plot([x0, x1], [y0, y1], color=cmap(0.3 + 0.7 * strength), lw=0.5 + 4 * strength, zorder=1,
                alpha=0.9 if edge["weight"] >= 0 else 0.4, ls="-" if edge["weight"] >= 0 else "--")
    for node in graph["nodes"]:
        x, y = pos[node["id"]]
        thumb = thumbnails.get(node["id"])
        if thumb is not None and Path(thumb).exists():
            image = Image.open(thumb).convert("RGB")
            box = AnnotationBbox(OffsetImage(image, zoom=0.45), (x, y), frameon=True,
                                 bboxprops={"edgecolor": "orange" if node.get("shared") else "black"})
            ax.add_artist(box)
            ax.text(x, y - 0.42, f"{node['concept']}", ha="center", va="top", fontsize=7)
        else:
            label = node.get("name") if node["layer"] == "classifier" else f"{node['concept']}"
            ax.scatter([x], [y], s=300, c="orange" if node.get("shared") else "white", edgecolors="black", zorder=2)
            ax.text(x, y, str(label), ha="center", va="center", fontsize=7, zorder=3)
    ax.set_yticks(range(levels))
    ax.set_yticklabels(graph["layers"] + ["classifier"])
    ax.set_xticks([])
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.7, levels - 0.3)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    names = ", ".join(c["name"] for c in graph.get("classes", []))
    ax.set_title(title or f"{graph['kind']} graph {names} ({graph['n_images']} images)")
    fig.tight_layout()
    paths = [Path(f"{out_stem}.svg"), Path(f"{out_stem}.png")]
    fig.savefig(paths[0])
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def concept_sheet(crops: list[Path], out: Path, title: str) -> Path:
    """One concept at a glance: its top-1 exemplar large, then the top-10 ERF crops in a row."""
    n = len(crops)
    fig = plt.figure(figsize=(max(6, 1.3 * n), 3.4))
    grid = fig.add_gridspec(2, max(n, 1), height_ratios=[1.6, 1])
    top = fig.add_subplot(grid[0, :])
    top.imshow(Image.open(crops[0]).convert("RGB"))
    top.set_title(title, fontsize=9)
    top.axis("off")
    for i, crop in enumerate(crops):
        ax = fig.add_subplot(grid[1, i])
        ax.imshow(Image.open(crop).convert("RGB"))
        ax.set_title(f"#{i + 1}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
