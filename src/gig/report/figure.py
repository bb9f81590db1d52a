"""Static figures of the report: a class graph in the paper's style, and metric plots.

The class graph (as in the paper's Figures 1 and 3): one row per layer, the classifier on top;
every concept node is the ERF crop of its top-1 PFV (context dimmed) with its concept id and
importance under it, shared concepts framed in orange; edges get thicker and bluer with their
weight, the share of the class-logit change that flows through them (negative ones dashed red). Nodes are ordered within a row by the weighted mean position
of the nodes they feed (a barycentre pass from the top), so the strong paths run straight down.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap, Normalize  # noqa: E402
from matplotlib.offsetbox import AnnotationBbox, OffsetImage  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402
from PIL import Image  # noqa: E402


def _plain(text: str) -> str:
    """Text for matplotlib with mathtext switched off (a ``$`` in a class name stays a ``$``)."""
    return str(text).replace("$", r"\$")


def ordered_rows(graph: dict) -> dict[int, list[dict]]:
    """Nodes per level, each row ordered by the weighted mean x of the upper nodes it feeds.

    The top row (classifier) keeps the order of the JSON; a row below follows its edges up
    (nodes with no edge up go last, by importance). Same rule as the page's layout (report.js).
    """
    rows: dict[int, list[dict]] = {}
    for node in graph["nodes"]:
        rows.setdefault(int(node["level"]), []).append(node)
    ups: dict[str, list[tuple[str, float]]] = {}
    for edge in graph["edges"]:
        ups.setdefault(edge["source"], []).append((edge["target"], abs(float(edge["weight"] or 0.0))))
    x: dict[str, float] = {}
    for level in sorted(rows, reverse=True):
        nodes = rows[level]
        if level == max(rows):
            order = list(nodes)
        else:
            def key(node):
                links = [(x[t], w) for t, w in ups.get(node["id"], []) if t in x]
                total = sum(w for _, w in links)
                if not links:
                    return (1, -float(node.get("importance") or 0.0))
                centre = sum(px * w for px, w in links) / total if total > 0 else float(np.mean([px for px, _ in links]))
                return (0, centre, -float(node.get("importance") or 0.0))

            order = sorted(nodes, key=key)
        rows[level] = order
        for i, node in enumerate(order):
            x[node["id"]] = i - (len(order) - 1) / 2
    return rows


def draw_class_figure(graph: dict, out_stem: Path, thumbnails: dict[str, Path] | None = None,
                      title: str | None = None, dpi: int = 130) -> tuple[Path, Path]:
    """Draw ``graph`` (gig.graph/1) to ``out_stem.svg`` and ``out_stem.png``."""
    thumbnails = thumbnails or {}
    rows = ordered_rows(graph)
    levels = len(graph["layers"]) + 1
    widest = max((len(r) for r in rows.values()), default=1)
    width = max(7.5, 1.2 * widest + 2.6)
    fig, ax = plt.subplots(figsize=(width, 1.45 * levels + 1.0))
    pos = {}
    for level, nodes in rows.items():
        for i, node in enumerate(nodes):
            pos[node["id"]] = (i - (len(nodes) - 1) / 2, float(level))

    weights = [abs(float(e["weight"] or 0.0)) for e in graph["edges"]] or [1.0]
    top = max(weights) or 1.0
    blues, reds = plt.get_cmap("Blues"), plt.get_cmap("Reds")
    shown_blues = ListedColormap(blues(np.linspace(0.3, 1.0, 256)))
    for edge in sorted(graph["edges"], key=lambda e: abs(float(e["weight"] or 0.0))):
        if edge["source"] not in pos or edge["target"] not in pos:
            continue
        (x0, y0), (x1, y1) = pos[edge["source"]], pos[edge["target"]]
        w = float(edge["weight"] or 0.0)
        s = abs(w) / top
        cmap = blues if w >= 0 else reds
        ax.plot([x0, x1], [y0, y1], color=cmap(0.3 + 0.7 * s), lw=0.4 + 5.0 * s, zorder=1,
                solid_capstyle="round", ls="-" if w >= 0 else (0, (3, 2)), alpha=0.95)

    for node in graph["nodes"]:
        x, y = pos[node["id"]]
        if node["layer"] == "classifier":
            label = "\n".join(textwrap.wrap(_plain(node.get("name") or "target"), 16)[:3])
            ax.add_patch(FancyBboxPatch((x - 0.42, y - 0.22), 0.84, 0.44, boxstyle="round,pad=0.02,rounding_size=0.08",
                                        fc="#fff4d6", ec="#7a5c00", lw=1.2, zorder=3))
            ax.text(x, y, label, ha="center", va="center", fontsize=8.5, zorder=4, fontweight="bold")
            continue
        thumb = thumbnails.get(node["id"])
        shared = bool(node.get("shared"))
        if thumb is not None and Path(thumb).exists():
            with Image.open(thumb) as im:
                image = np.asarray(im.convert("RGB").resize((96, 96)))
            box = AnnotationBbox(OffsetImage(image, zoom=0.62), (x, y), frameon=True, pad=0.12, zorder=3,
                                 bboxprops={"edgecolor": "#ff8c00" if shared else "#333333",
                                            "linewidth": 2.6 if shared else 0.8})
            ax.add_artist(box)
        else:
            ax.scatter([x], [y], s=700, c="#ffd08a" if shared else "#f2f2f2",
                       edgecolors="#ff8c00" if shared else "#333333", zorder=3)
        ax.text(x, y - 0.40, f"#{node['concept']}  {float(node.get('importance') or 0.0):.2f}", ha="center",
                va="top", fontsize=7, zorder=4, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})

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
    ax.set_title(_plain(title or f"{graph['kind']} graph: {names}  ({n} image{'' if n == 1 else 's'}, "
                        f"top-{graph.get('top_k', '?')} concepts per layer)"), fontsize=10)
    sm = plt.cm.ScalarMappable(cmap=shown_blues, norm=Normalize(0, top))
    bar = fig.colorbar(sm, ax=ax, fraction=0.025, pad=0.01, shrink=0.5)
    bar.set_label("share of the class-logit change (edge weight)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if any(node.get("shared") for node in graph["nodes"]):
        ax.text(1.0, -0.02, "orange frame: shared concept", transform=ax.transAxes, ha="right", va="top",
                fontsize=7, color="#ff8c00")
    fig.tight_layout()
    svg, png = Path(f"{out_stem}.svg"), Path(f"{out_stem}.png")
    fig.savefig(svg)
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
    return svg, png


def _svg_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    return buf.getvalue()


def reconstruction_figure(rows: list[dict]) -> bytes:
    """Bars per layer: relative L2 error, R², l0 ratio, top-1 agreement (SVG bytes)."""
    keys = [("rel_error", "rel. L2 error"), ("r2", "R²"), ("l0_ratio", "l0 ratio"), ("top1_agreement", "top-1 agreement")]
    names = [_plain(r["name"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    width = 0.8 / len(keys)
    x = np.arange(len(rows))
    colours = ["#d62728", "#1f77b4", "#7f7f7f", "#2ca02c"]
    for j, (key, label) in enumerate(keys):
        values = [r.get(key) if r.get(key) is not None else np.nan for r in rows]
        bars = ax.bar(x + (j - (len(keys) - 1) / 2) * width, values, width, label=label, color=colours[j])
        for b, v in zip(bars, values):
            if np.isfinite(v):
                ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=6.5)
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("Lasso reconstruction of every PFV, per layer", fontsize=9)
    fig.tight_layout()
    return _svg_bytes(fig)


def front_figure(layers: list[dict], min_r2: float | None = None, min_top1: float | None = None) -> bytes:
    """Each layer's sparsity–fidelity front (SVG bytes): R² and top-1 agreement against the l0
    ratio, one line per layer, the chosen λ ringed and the rule's thresholds dashed.
    ``layers``: ``[{"name", "front": [{l0_ratio, r2, top1_agreement, alpha}], "alpha"}]``."""
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2), sharex=True)
    for i, layer in enumerate(l for l in layers if l.get("front")):
        pts = sorted(layer["front"], key=lambda p: p["l0_ratio"])
        l0 = np.array([p["l0_ratio"] for p in pts])
        colour = f"C{i}"
        for ax, key in zip(axes, ("r2", "top1_agreement")):
            # A zero-width space first: matplotlib drops labels starting with "_" (_blocks.4).
            ax.plot(l0, [p[key] for p in pts], "o-", ms=3, lw=1.2, color=colour, label="\u200b" + _plain(layer["name"]))
            chosen = [p for p in pts if layer.get("alpha") is not None
                      and np.isclose(p["alpha"], layer["alpha"], rtol=1e-9)]
            if chosen:
                ax.plot([chosen[0]["l0_ratio"]], [chosen[0][key]], "o", ms=9, mfc="none", color=colour)
    for ax, key, label, line in ((axes[0], "r2", "R²", min_r2), (axes[1], "top1_agreement", "top-1 agreement", min_top1)):
        if line is not None:
            ax.axhline(line, ls="--", lw=0.8, color="#555")
        ax.set_xscale("log")
        ax.set_xlabel("l0 ratio (share of concepts active per position)", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle("Sparsity–fidelity front per layer (front images; ringed: chosen λ)", fontsize=9)
    fig.tight_layout()
    return _svg_bytes(fig)


def completeness_figure(residuals: np.ndarray, xlabel: str = "relative completeness residual",
                        tol: float | None = None) -> bytes:
    """Histogram of relative figures on a log axis (SVG bytes): completeness residuals
    |Σ GIG − Δg| / |Δg| by default, or GIG error estimates with their tolerance marked."""
    r = np.asarray(residuals, dtype=float)
    r = r[np.isfinite(r)]
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    positive = r[r > 0]
    floor = max(1e-12, float(np.percentile(positive, 0.5)) / 2) if positive.size else 1e-8
    bins = np.logspace(np.log10(floor), np.log10(max(float(r.max(initial=0.0)), floor * 10) * 1.01), 40)
    ax.hist(np.clip(r, floor, None), bins=bins, color="#1f77b4")
    ax.set_xscale("log")
    med = float(np.median(r)) if r.size else float("nan")
    ax.axvline(max(med, floor), color="#d62728", lw=1, ls="--", label=f"median {med:.2g}")
    if tol:
        ax.axvline(tol, color="#2ca02c", lw=1, label=f"tolerance {tol:g}")
    ax.legend(fontsize=7, frameon=False)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("attributions", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _svg_bytes(fig)
