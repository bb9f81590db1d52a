"""Static pictures for papers: a graph in the paper's style (SVG and PNG), and a concept's sheet.

The graph (as in the paper's Figures 1 and 3): one row per layer, the classifier on top; every
concept node is the ERF crop of its top-1 PFV (context dimmed) with its concept id and
importance under it, shared concepts framed in orange; edges get thicker and bluer with their
weight, the share of the class-logit change that flows through them (negative ones dashed red).
Nodes sit in their row in the order of :func:`gig.graph.node_rows`, which the report's viewer
uses too. This is gig's one graph painter: the graph stage, ``gig graph-image``, the report and
the explain pages all call :func:`draw_graph`.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.offsetbox import AnnotationBbox, OffsetImage
from matplotlib.patches import FancyBboxPatch
from PIL import Image

from .graph import node_rows

#: SVG output that depends only on the figure: no date, element ids from a fixed salt, so a
#: figure drawn twice from the same graph is byte-identical (the before/after checks rely on it).
SVG_METADATA = {"Date": None}
matplotlib.rcParams["svg.hashsalt"] = "gig"


def plain_text(text: str) -> str:
    """Text for matplotlib with mathtext switched off (a ``$`` in a class name stays a ``$``)."""
    return str(text).replace("$", r"\$")


def _draw_edges(ax, graph: dict, pos: dict[str, tuple[float, float]], top: float) -> None:
    """Edges weakest first (strong ones on top): blue for positive weights, dashed red for negative,
    dotted and faint where the edge's 95 % interval over the images contains 0 or where it is not
    significantly stronger than random directions (``beats_random``)."""
    blues, reds = matplotlib.colormaps["Blues"], matplotlib.colormaps["Reds"]
    for edge in sorted(graph["edges"], key=lambda e: abs(float(e["weight"] or 0.0))):
        if edge["source"] not in pos or edge["target"] not in pos:
            continue
        (x0, y0), (x1, y1) = pos[edge["source"]], pos[edge["target"]]
        w = float(edge["weight"] or 0.0)
        s = abs(w) / top
        cmap = blues if w >= 0 else reds
        uncertain = interval_contains_zero(edge) or edge.get("beats_random") is False
        ax.plot(
            [x0, x1],
            [y0, y1],
            color=cmap(0.3 + 0.7 * s),
            lw=0.4 + 5.0 * s,
            zorder=1,
            solid_capstyle="round",
            ls=":" if uncertain else ("-" if w >= 0 else (0, (3, 2))),
            alpha=0.5 if uncertain else 0.95,
        )


def interval_contains_zero(edge: dict) -> bool:
    """Whether an edge's 95 % interval (``ci``, graphs since 0.4) contains 0."""
    ci = edge.get("ci")
    return bool(ci) and ci[0] <= 0 <= ci[1]


def _draw_node(ax, node: dict, x: float, y: float, thumb: Path | None, label: str | None = None) -> None:
    """A class box, or a concept as its top-1 crop (a disc without one) with id, the user's
    label (``RUN/labels.yaml``) when it has one, and importance."""
    if node["layer"] == "classifier":
        label = "\n".join(textwrap.wrap(plain_text(node.get("name") or "target"), 16)[:3])
        ax.add_patch(
            FancyBboxPatch(
                (x - 0.42, y - 0.22),
                0.84,
                0.44,
                boxstyle="round,pad=0.02,rounding_size=0.08",
                fc="#fff4d6",
                ec="#7a5c00",
                lw=1.2,
                zorder=3,
            )
        )
        ax.text(x, y, label, ha="center", va="center", fontsize=8.5, zorder=4, fontweight="bold")
        return
    shared = bool(node.get("shared"))
    if thumb is not None and Path(thumb).exists():
        with Image.open(thumb) as im:
            image = np.asarray(im.convert("RGB").resize((96, 96)))
        ax.add_artist(
            AnnotationBbox(
                OffsetImage(image, zoom=0.62),
                (x, y),
                frameon=True,
                pad=0.12,
                zorder=3,
                bboxprops={"edgecolor": "#ff8c00" if shared else "#333333", "linewidth": 2.6 if shared else 0.8},
            )
        )
    else:
        ax.scatter(
            [x],
            [y],
            s=700,
            c="#ffd08a" if shared else "#f2f2f2",
            edgecolors="#ff8c00" if shared else "#333333",
            zorder=3,
        )
    name = f" {plain_text(textwrap.shorten(label, 18, placeholder='…'))}" if label else ""
    ax.text(
        x,
        y - 0.40,
        f"#{node['concept']}{name}  {float(node.get('importance') or 0.0):.2f}",
        ha="center",
        va="top",
        fontsize=7,
        zorder=4,
        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
    )


def _decorate(fig, ax, graph: dict, rows: dict[int, list[dict]], top: float, title: str | None) -> None:
    """Layer names, limits, title, the edge-weight colour bar and the shared-concept note."""
    levels = len(graph["layers"]) + 1
    ax.set_yticks(range(levels))
    ax.set_yticklabels(list(graph["layers"]) + ["classifier"], fontsize=9)
    ax.tick_params(axis="y", length=0)
    ax.set_xticks([])
    half = max(len(r) for r in rows.values()) / 2
    ax.set_xlim(-half - 0.1, half + 0.1)
    ax.set_ylim(-0.8, levels - 0.55)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    names = ", ".join(c["name"] for c in graph.get("classes", [])) or "all images"
    n = graph["n_images"]
    ax.set_title(
        plain_text(
            title
            or f"{graph['kind']} graph: {names}  ({n} image{'' if n == 1 else 's'}, "
            f"top-{graph.get('top_k', '?')} concepts per layer)"
        ),
        fontsize=10,
    )
    shown_blues = ListedColormap(matplotlib.colormaps["Blues"](np.linspace(0.3, 1.0, 256)))
    bar = fig.colorbar(
        ScalarMappable(cmap=shown_blues, norm=Normalize(0, top)), ax=ax, fraction=0.025, pad=0.01, shrink=0.5
    )
    bar.set_label("share of the class-logit change (edge weight)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if "intervals" in graph:
        uncertain = sum(interval_contains_zero(e) for e in graph["edges"])
        legend = f"dotted: {uncertain} edge(s) whose 95 % interval over the images contains 0"
        if graph.get("significance"):
            weak = sum(e.get("beats_random") is False for e in graph["edges"])
            legend += f"; {weak} not significantly stronger than random directions (Benjamini-Hochberg, FDR 5 %)"
        ax.text(
            0.0,
            -0.02,
            legend,
            transform=ax.transAxes,
            ha="left",
            va="top",
            fontsize=7,
        )
    if any(node.get("shared") for node in graph["nodes"]):
        ax.text(
            1.0,
            -0.02,
            "orange frame: shared concept",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=7,
            color="#ff8c00",
        )


def graph_figure(
    graph: dict,
    thumbnails: dict[str, Path] | None = None,
    title: str | None = None,
    labels: dict[str, str] | None = None,
):
    """``graph`` (gig.graph/1) as a matplotlib :class:`~matplotlib.figure.Figure` (no pyplot: any
    backend, nothing to close; Jupyter shows it inline). Nodes sit in the row
    slots of :func:`gig.graph.node_rows` (the viewer's order too); ``thumbnails``: ``{node id:
    crop PNG}`` (the concepts' top-1 ERF crops); ``labels``: ``{node id: name}`` (:func:`gig.labels.node_labels`)."""
    thumbnails = thumbnails or {}
    rows = node_rows(graph)
    widest = max((len(r) for r in rows.values()), default=1)
    fig = Figure(figsize=(max(7.5, 1.2 * widest + 2.6), 1.45 * (len(graph["layers"]) + 1) + 1.0))
    ax = fig.subplots()
    pos = {
        node["id"]: (i - (len(nodes) - 1) / 2, float(level))
        for level, nodes in rows.items()
        for i, node in enumerate(nodes)
    }
    top = max([abs(float(e["weight"] or 0.0)) for e in graph["edges"]] or [1.0]) or 1.0
    _draw_edges(ax, graph, pos, top)
    for node in graph["nodes"]:
        _draw_node(ax, node, *pos[node["id"]], thumbnails.get(node["id"]), (labels or {}).get(node["id"]))
    _decorate(fig, ax, graph, rows, top, title)
    fig.tight_layout()
    return fig


#: The PNG text key that holds a figure's :func:`figure_key`.
FIGURE_KEY = "gig-figure"
#: Graph fields no figure shows (which images a graph sums: the report's copies leave it out).
NOT_DRAWN = ("image_ids",)


def figure_key(
    graph: dict,
    thumbnails: dict[str, Path] | None = None,
    title: str | None = None,
    dpi: int = 130,
    labels: dict[str, str] | None = None,
) -> str:
    """What :func:`draw_graph` draws, as a hash: the graph, each thumbnail crop (by its collect
    hash, layer and sample: ``HASH/LAYER/sI.png``, wherever the cache lies), the title, the
    resolution and the labels. Two figures with one key are the same picture."""
    crops = {node: "/".join(Path(p).parts[-3:]) for node, p in (thumbnails or {}).items()}
    drawn = {k: v for k, v in graph.items() if k not in NOT_DRAWN}
    text = json.dumps([drawn, crops, title, dpi, labels or {}], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def saved_figure_key(png: Path) -> str | None:
    """The :func:`figure_key` a PNG of :func:`draw_graph` carries, or None (another PNG, none)."""
    try:
        with Image.open(png) as image:
            return image.text.get(FIGURE_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def draw_graph(
    graph: dict,
    out_stem: Path,
    thumbnails: dict[str, Path] | None = None,
    title: str | None = None,
    dpi: int = 130,
    labels: dict[str, str] | None = None,
) -> tuple[Path, Path]:
    """Draw ``graph`` (:func:`graph_figure`) to ``out_stem.svg`` and ``out_stem.png``; returns both
    paths. The PNG carries the figure's :func:`figure_key`, so a later reader (the report) can
    take these files instead of drawing the same picture again."""
    fig = graph_figure(graph, thumbnails, title, labels)
    svg, png = Path(f"{out_stem}.svg"), Path(f"{out_stem}.png")
    fig.savefig(svg, metadata=SVG_METADATA)
    fig.savefig(png, dpi=dpi, metadata={FIGURE_KEY: figure_key(graph, thumbnails, title, dpi, labels)})
    return svg, png


def concept_sheet(crops: list[Path], out: Path, title: str) -> Path:
    """One concept at a glance: its top-1 exemplar large, then the top-10 ERF crops in a row."""
    n = len(crops)
    fig = Figure(figsize=(max(6, 1.3 * n), 3.4))
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
    return out
