"""The report's metric plots (SVG bytes): reconstruction per layer, the sparsity–fidelity
fronts, completeness residuals and error estimates. (The graph figure is :func:`gig.visual.draw_graph`.)

"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..visual import SVG_METADATA, plain_text  # noqa: E402


def _svg_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata=SVG_METADATA)
    plt.close(fig)
    return buf.getvalue()


def reconstruction_figure(rows: list[dict]) -> bytes:
    """Bars per layer: relative L2 error, R², l0 ratio, top-1 agreement (SVG bytes)."""
    keys = [
        ("rel_error", "rel. L2 error"),
        ("r2", "R²"),
        ("l0_ratio", "l0 ratio"),
        ("top1_agreement", "top-1 agreement"),
    ]
    names = [plain_text(r["name"]) for r in rows]
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
    ax.set_title("Sparse reconstruction of every PFV, per layer", fontsize=9)
    fig.tight_layout()
    return _svg_bytes(fig)


#: Markers of the evaluation's baselines on the front plot (other methods: a diamond).
BASELINE_MARKERS = {"dictionary": "s", "sae": "^", "sae-overcomplete": "v", "kmeans": "x", "nmf": "P"}


def front_figure(
    layers: list[dict],
    min_r2: float | None = None,
    min_top1: float | None = None,
    baselines: dict[str, dict[str, dict]] | None = None,
    max_kl: float | None = None,
) -> bytes:
    """Each layer's sparsity–fidelity front (SVG bytes): R², mean KL divergence of the model's
    output (where measured; log scale) and top-1 agreement against the l0 ratio, one line per
    layer, the chosen λ ringed and the rule's thresholds dashed. ``layers``: ``[{"name", "front":
    [{l0_ratio, r2, top1_agreement, kl, alpha}], "alpha"}]``; ``baselines``: ``{layer: {method:
    {l0_ratio, r2, top1_agreement}}}`` from the evaluation
    (:func:`gig.evaluation.extraction.load_reconstruction`), drawn as markers in the layer's
    colour, so the front is compared with dictionary learning, the SAE and k-means at their l0."""
    with_kl = any(p.get("kl") is not None for l in layers for p in l.get("front") or [])
    panels = (
        [("r2", "R²", min_r2)]
        + ([("kl", "mean KL (nats)", max_kl)] if with_kl else [])
        + [("top1_agreement", "top-1 agreement", min_top1)]
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.2), sharex=True)
    keys = [key for key, _, _ in panels]
    methods_drawn: set[str] = set()
    for i, layer in enumerate(l for l in layers if l.get("front")):
        methods_drawn |= _draw_baselines(axes, keys, (baselines or {}).get(layer["name"], {}), f"C{i}")
        _draw_front(axes, keys, layer, f"C{i}")
    _style_front_axes(axes, panels)
    axes[0].legend(fontsize=7, frameon=False)
    if methods_drawn:  # one legend entry per baseline, in black
        handles = [
            axes[-1].plot([], [], BASELINE_MARKERS.get(m, "d"), color="k", mfc="none", label=m)[0]
            for m in sorted(methods_drawn)
        ]
        axes[-1].legend(handles=handles, fontsize=7, frameon=False, title="evaluation (its images)", title_fontsize=7)
    fig.suptitle("Sparsity–fidelity front per layer (front images; ringed: chosen λ)", fontsize=9)
    fig.tight_layout()
    return _svg_bytes(fig)


def _draw_baselines(axes, keys: list[str], methods: dict[str, dict], colour: str) -> set[str]:
    """One layer's evaluation baselines ``{method: {l0_ratio, r2, …}}`` as markers in the layer's
    ``colour`` on the panels of ``keys`` (ours, and methods without an l0, left out); returns the
    methods drawn, for the legend."""
    drawn: set[str] = set()
    for method, rec in methods.items():
        if method == "ours" or not rec.get("l0_ratio"):
            continue
        for ax, key in zip(axes, keys):
            if rec.get(key) is not None:
                ax.plot(
                    [rec["l0_ratio"]],
                    [rec[key]],
                    BASELINE_MARKERS.get(method, "d"),
                    ms=6,
                    color=colour,
                    mfc="none",
                )
        drawn.add(method)
    return drawn


def _draw_front(axes, keys: list[str], layer: dict, colour: str) -> None:
    """One layer's front on the panels of ``keys``: a line over the l0 ratio, the chosen λ ringed."""
    pts = sorted(layer["front"], key=lambda p: p["l0_ratio"])
    l0 = np.array([p["l0_ratio"] for p in pts])
    chosen_alpha = layer.get("front_alpha", layer.get("alpha"))
    for ax, key in zip(axes, keys):
        # A zero-width space first: matplotlib drops labels starting with "_" (_blocks.4).
        values = [np.nan if p.get(key) is None else p[key] for p in pts]
        ax.plot(l0, values, "o-", ms=3, lw=1.2, color=colour, label="\u200b" + plain_text(layer["name"]))
        chosen = [p for p in pts if chosen_alpha is not None and np.isclose(p["alpha"], chosen_alpha, rtol=1e-9)]
        if chosen and chosen[0].get(key) is not None:
            ax.plot([chosen[0]["l0_ratio"]], [chosen[0][key]], "o", ms=9, mfc="none", color=colour)


def _style_front_axes(axes, panels: list[tuple[str, str, float | None]]) -> None:
    """The front's panels ``(key, label, threshold)``: the rule's threshold dashed, log l0 axis
    (and log KL), labels and the house style."""
    for ax, (key, label, line) in zip(axes, panels):
        if line is not None:
            ax.axhline(line, ls="--", lw=0.8, color="#555")
        ax.set_xscale("log")
        if key == "kl":
            ax.set_yscale("log")
        ax.set_xlabel("l0 ratio (share of concepts active per position)", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=7)


def completeness_figure(
    residuals: np.ndarray, xlabel: str = "relative completeness residual", tol: float | None = None
) -> bytes:
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
