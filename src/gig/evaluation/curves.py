"""Curves, areas under them, spreads over images, tables and plots of the evaluation.

A deletion / insertion curve is sampled at ``n_points`` fractions of the concepts (21 points:
0 %, 5 %, …, 100 %). The number of concepts removed (or inserted) at step ``i`` is
``round(i / (n_points − 1) · K)``; the curve's x axis is that number divided by ``K`` (equal to
``i / 20`` whenever ``K`` is a multiple of 20), and its area is the trapezoid rule over it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def step_counts(n_concepts: int, n_points: int = 21) -> np.ndarray:
    """How many concepts are removed (or inserted) at each of the ``n_points`` steps."""
    if n_points < 2:
        raise ValueError("a curve needs at least 2 points")
    return np.rint(np.linspace(0.0, 1.0, n_points) * n_concepts).astype(np.int64)


def step_fractions(n_concepts: int, n_points: int = 21) -> np.ndarray:
    """The x axis of a curve: ``step_counts / K`` in [0, 1]."""
    return step_counts(n_concepts, n_points) / max(n_concepts, 1)


def auc(curves: np.ndarray, fractions: np.ndarray | None = None) -> np.ndarray:
    """Area under ``curves (..., n_points)`` by the trapezoid rule over ``fractions`` (default: an
    even grid on [0, 1]); returns shape ``(...)``."""
    y = np.asarray(curves, dtype=np.float64)
    x = np.linspace(0.0, 1.0, y.shape[-1]) if fractions is None else np.asarray(fractions, dtype=np.float64)
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"{y.shape[-1]} curve points but {x.shape[-1]} fractions")
    dx = np.diff(x)
    return ((y[..., 1:] + y[..., :-1]) * 0.5 * dx).sum(-1)


def spread(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of per-image values with its standard error and a percentile bootstrap interval.

    ``values`` are independent units (one per image); NaNs are left out and counted.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    n_nan = int(np.isnan(v).sum())
    v = v[~np.isnan(v)]
    n = v.size
    if n == 0:
        return {"mean": None, "se": None, "ci_low": None, "ci_high": None, "std": None, "n": 0, "n_nan": n_nan}
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    se = std / math.sqrt(n) if n > 1 else 0.0
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, n, size=(n_boot, n))].mean(1) if n > 1 else np.full(1, mean)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"mean": mean, "se": se, "ci_low": float(lo), "ci_high": float(hi), "std": std, "n": n, "n_nan": n_nan}


def paired_difference(a, b, n_boot: int = 2000, seed: int = 0) -> dict:
    """Spread of ``a − b`` over paired units (the same images), with the share of units where
    ``a > b``."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    out = spread(d, n_boot, seed)
    ok = d[~np.isnan(d)]
    out["win_rate"] = float((ok > 0).mean()) if ok.size else None
    return out


# ------------------------------------------------------------------------------ formatting
def fmt_spread(s: dict | None, digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "–"
    return f"{s['mean']:.{digits}f} ± {s['se']:.{digits}f} [{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]"


def _num(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _gig_steps(meta: dict) -> str:
    """How the rankings' GIG was integrated, in words."""
    if meta.get("n_steps"):
        return f"{meta['n_steps']} {meta['quadrature']} steps"
    return f"error-controlled to a relative tolerance of {meta.get('gig_tol')}"


def markdown_tables(extraction: dict | None, interlayer: dict | None, noun: str = "class") -> str:
    """The Markdown report: one table per protocol (mean ± s.e. [95 % bootstrap interval]);
    ``noun``: the run's outputs' name (:func:`gig.models.output_noun`)."""
    lines = ["# Faithfulness evaluation", ""]
    if extraction:
        meta = extraction["settings"]
        lines += [
            f"## Concept extraction: C-Insertion − C-Deletion AUC (target-{noun} probability)",
            "",
            f"{meta['n_images']} images, {meta['n_points']} points per curve, concepts ranked by concept → "
            f"{noun} GIG ({_gig_steps(meta)}). Cells: mean ± s.e. over images "
            "[95 % bootstrap interval]. Reconstruction figures on every position of the evaluated images.",
            "",
            "| layer | method | K | AUC ins − del | AUC ins | AUC del | p(full rec.) | rel. error | R² | l0 ratio | active/pos | top-1 agr. |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for layer, methods in extraction["layers"].items():
            for name, r in methods.items():
                rec = r["reconstruction"]
                lines.append(
                    f"| {layer} | {name} | {r['K']} | {fmt_spread(r['auc_diff'])} | {_num(r['auc_insertion']['mean'])} | "
                    f"{_num(r['auc_deletion']['mean'])} | {_num(r['prob_full']['mean'])} | {_num(rec['rel_error'])} | "
                    f"{_num(rec['r2'])} | {_num(rec['l0_ratio'])} | {_num(rec['active_per_position'], 1)} | "
                    f"{_num(rec['top1_agreement'])} |"
                )
        lines += [
            "",
            "Paired differences, ours − baseline (AUC ins − del, same images):",
            "",
            "| layer | vs | mean ± s.e. [95 % CI] | ours better on |",
            "| --- | --- | --- | --- |",
        ]
        for layer, methods in extraction["layers"].items():
            for name, r in methods.items():
                if "vs_ours" in r:
                    d = r["vs_ours"]
                    lines.append(f"| {layer} | {name} | {fmt_spread(d)} | {_num(d.get('win_rate'), 2)} |")
        lines.append("")
    if interlayer:
        meta = interlayer["settings"]
        lines += [
            "## Inter-layer insertion − deletion AUC (target concept readout, normalised)",
            "",
            f"{meta['n_images']} images, top-{meta['n_targets']} target concepts of the upper layer per image "
            f"(by {meta['target_rule']}), {meta['n_random']} random orders averaged. Cells: mean ± s.e. over "
            "images (each image's value is the mean over its targets) [95 % bootstrap interval].",
            "",
            "| transition | ordering | AUC ins − del | AUC ins | AUC del | GIG − ordering (paired) | GIG better on |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for tr, orders in interlayer["transitions"].items():
            for name, r in orders["orderings"].items():
                d = r.get("gig_minus")
                lines.append(
                    f"| {tr} | {name} | {fmt_spread(r['auc_diff'])} | {_num(r['auc_insertion']['mean'])} | "
                    f"{_num(r['auc_deletion']['mean'])} | {fmt_spread(d) if d else '–'} | "
                    f"{_num(d.get('win_rate'), 2) if d else '–'} |"
                )
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(panels: dict[str, dict[str, dict]], path: Path, ylabel: str, title: str) -> Path:
    """One panel per layer/transition; per method/ordering the mean insertion (solid) and
    deletion (dashed) curves with a ±1 s.e. band. ``panels[name][method] = {"x", "insertion",
    "deletion", "insertion_se", "deletion_se"}``."""
    plt = _pyplot()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel, methods) in zip(axes[0], panels.items()):
        for j, (name, c) in enumerate(methods.items()):
            col = colors[j % len(colors)]
            x = np.asarray(c["x"])
            for kind, style in (("insertion", "-"), ("deletion", "--")):
                y = np.asarray(c[kind])
                se = np.asarray(c[f"{kind}_se"])
                ax.plot(x, y, style, color=col, label=f"{name} {kind[:3]}")
                ax.fill_between(x, y - se, y + se, color=col, alpha=0.12, linewidth=0)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("fraction of concepts")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_auc_bars(groups: dict[str, dict[str, dict]], path: Path, ylabel: str, title: str) -> Path:
    """Grouped bars: per group (layer / transition) one bar per method with its 95 % interval."""
    plt = _pyplot()
    names = list(dict.fromkeys(m for g in groups.values() for m in g))
    n_groups = len(groups)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * n_groups + 2), 3.8))
    for j, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for i, g in enumerate(groups.values()):
            s = g.get(name)
            if not s or s.get("mean") is None:
                continue
            xs.append(i + (j - (len(names) - 1) / 2) * width)
            ys.append(s["mean"])
            lo.append(s["mean"] - s["ci_low"])
            hi.append(s["ci_high"] - s["mean"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=name)
    ax.set_xticks(range(n_groups))
    ax.set_xticklabels(list(groups), fontsize=9)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
