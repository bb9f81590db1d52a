"""The report's metrics section: reconstruction, fronts, GIG accuracy and completeness (read
through :mod:`gig.artefacts` and :func:`gig.summary.summarize`), stage timings, and the evaluation
folder (``RUN/evaluate/``) shown as tables, safe markdown and plots."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..artefacts import (
    EVALUATION_SUMMARY,
    completeness_residuals,
    evaluate_dir,
    fidelity_path,
    load_ablations,
    load_correlation,
    load_error_estimates,
    load_fidelity,
    load_path_records,
    load_reconstruction,
)
from ..decompose import rule_text
from ..errors import RunMismatchError
from ..store import RunStore, load_json
from ..summary import summarize
from .figure import completeness_figure, front_figure, reconstruction_figure
from .page import Assets, fmt_value, slug


def metrics_section(store: RunStore, assets: Assets) -> dict:
    """The metrics section's data: per-layer figures (with the front), completeness and GIG
    accuracy, stage timings, and their plots (SVG assets)."""
    info = summarize(store.root)
    fidelity = load_fidelity(store) if fidelity_path(store).is_file() else {}
    rows = []
    for entry in info["layers"]:
        extra = fidelity.get(entry["name"], {})
        rows.append({**entry, "n_positions": extra.get("n_positions")})
    plots = _fidelity_plots(store, rows, assets)
    gig = info.get("gig")
    plots += _attribution_plots(store, gig, assets)
    completeness = dict(store.summary("attribute").get("completeness", {}))
    stages = [{"name": k, **v} for k, v in info["stages"].items()]
    return {
        "layers": rows,
        "completeness": completeness,
        "gig": gig,
        "images": info["images"],
        "stages": stages,
        "plots": plots,
        "rule": rule_text(store.config),
        "debias": store.config.debias and store.config.coder == "lasso",
        "coder": store.config.coder,
    }


def _fidelity_plots(store: RunStore, rows: list[dict], assets: Assets) -> list[dict]:
    """``[{"title", "url"}]`` of the layers' fidelity plots: reconstruction per layer and the
    sparsity–fidelity fronts, each where ``rows`` (the section's layers) have the figures."""
    plots = []
    if any(r["rel_error"] is not None for r in rows):
        plots.append(
            {
                "title": "Reconstruction per layer",
                "url": assets.add_bytes("img/metrics/reconstruction.svg", reconstruction_figure(rows)),
            }
        )
    if any(r["front"] for r in rows):
        config = store.config
        rule = config.target_rel_error is None
        plots.append(
            {
                "title": "Sparsity–fidelity front per layer",
                "url": assets.add_bytes(
                    "img/metrics/front.svg",
                    front_figure(
                        rows,
                        config.min_r2 if rule else None,
                        config.min_top1_agreement if rule else None,
                        load_reconstruction(evaluate_dir(store)),
                        config.max_kl if rule else None,
                    ),
                ),
            }
        )
    return plots


def _attribution_plots(store: RunStore, gig: dict | None, assets: Assets) -> list[dict]:
    """``[{"title", "url"}]`` of the attributions' plots: GIG completeness residuals and, where
    the summary's ``gig`` accuracy has them by source, GIG error estimates."""
    plots = []
    try:
        records = load_path_records(store)  # the attribute stage's per-path records, read once
        residuals = completeness_residuals(store, data=records).numpy()
    except RunMismatchError:  # a run without attributions still gets its other metrics
        records, residuals = None, None
    if residuals is not None and residuals.size:
        plots.append(
            {
                "title": "GIG completeness residuals",
                "url": assets.add_bytes("img/metrics/completeness.svg", completeness_figure(residuals)),
            }
        )
    if gig and gig.get("by_source") and records is not None:
        estimates = load_error_estimates(store, records)
        if estimates.numel():
            plots.append(
                {
                    "title": "GIG error estimates",
                    "url": assets.add_bytes(
                        "img/metrics/gig_error.svg",
                        completeness_figure(estimates.numpy(), "relative error estimate", gig.get("tol")),
                    ),
                }
            )
    return plots


def ablation_section(store: RunStore, importance: dict[str, torch.Tensor]) -> dict | None:
    """GIG against ablation, from :mod:`gig.ablate`'s saved results: the rank correlation per
    transition (with its random-ordering baseline), and every saved ablation beside the GIG
    share of the concepts it removed (their mean importance over the run's images)."""
    correlation, ablations = load_correlation(store), load_ablations(store)
    if correlation is None and not ablations:
        return None
    rows = []
    for name, t in (correlation or {}).get("transitions", {}).items():
        rho, rnd = t["spearman"]["per_target"], t["random"]["per_target"]
        rows.append(
            {
                "transition": name,
                "rho": rho["mean"],
                "rho_sd": rho["sd"],
                "n": rho["n"],
                "random": rnd["mean"],
                "random_sd": rnd["sd"],
                "sign": t.get("sign_agreement"),
                "top5": t.get("top5_overlap"),
                "top5_random": t.get("top5_overlap_random"),
                "sum_ratio": t.get("completeness", {}).get("ablation_sum_ratio_median"),
            }
        )
    results = [
        {
            "layer": r["layer"],
            "concepts": r["concepts"],
            "n_images": r["n_images"],
            "source": r.get("source"),
            "gig_share": float(sum(float(importance[r["layer"]][q]) for q in r["concepts"]))
            if r["layer"] in importance
            else None,
            "delta_prob": r["mean"]["target_prob"]["delta"],
            "delta_logit": r["mean"]["target_logit"]["delta"],
            "changed": r["mean"]["prediction_changed"],
        }
        for r in ablations
    ]
    return {"correlation": rows, "n_images": (correlation or {}).get("n_images"), "results": results}


def evaluation_section(folder: Path, assets: Assets) -> dict | None:
    """``RUN/evaluate/``: summary.json as tables, markdown files (tables and text), plots."""
    if not folder.is_dir():
        return None
    out: dict[str, Any] = {"summary": None, "markdown": [], "plots": [], "json": [], "other": []}
    summary = folder / EVALUATION_SUMMARY
    if summary.is_file():
        try:
            out["summary"] = _json_tables(load_json(summary))
        except (OSError, ValueError, RunMismatchError) as exc:
            out["summary"] = [{"title": EVALUATION_SUMMARY, "error": str(exc)}]
    for path in sorted(folder.iterdir()):  # top level only (bases/, parts/ are working files)
        rel = path.name
        if path.is_dir():
            out["other"].append(rel + "/")
            continue
        suffix = path.suffix.lower()
        if suffix == ".md":
            out["markdown"].append({"name": rel, "blocks": markdown_blocks(path.read_text(errors="replace"))})
        elif suffix in (".png", ".svg", ".jpg", ".jpeg"):
            out["plots"].append({"name": rel, "url": assets.add_file(f"eval/{slug(rel)}", path)})
        elif suffix == ".json" and rel != EVALUATION_SUMMARY and path.stat().st_size <= 64 * 1024:
            try:
                out["json"].append({"name": rel, "tables": _json_tables(load_json(path), rel)})
            except (OSError, ValueError, RunMismatchError):
                out["other"].append(rel)
        elif rel != EVALUATION_SUMMARY:
            out["other"].append(rel)
    return out


def _json_tables(data: Any, title: str = "summary") -> list[dict]:
    """Nested JSON → tables: a dict of scalars is one key/value table; a dict of dicts of
    scalars (or a list of dicts) is one table with a row per entry; deeper levels recurse."""
    tables: list[dict] = []

    def scalar(v):
        return not isinstance(v, (dict, list)) or (
            isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v) and len(v) <= 8
        )

    def show(v):
        if isinstance(v, list):
            return ", ".join(fmt_value(x) for x in v)
        return fmt_value(v)

    def walk(node, name):
        if isinstance(node, dict):
            scalars = {k: v for k, v in node.items() if scalar(v)}
            nested = {k: v for k, v in node.items() if not scalar(v)}
            if scalars:
                tables.append(
                    {"title": name, "columns": ["key", "value"], "rows": [[k, show(v)] for k, v in scalars.items()]}
                )
            records = {
                k: v for k, v in nested.items() if isinstance(v, dict) and v and all(scalar(x) for x in v.values())
            }
            if len(records) >= 2:
                cols = list(dict.fromkeys(c for v in records.values() for c in v))
                tables.append(
                    {
                        "title": name,
                        "columns": [""] + cols,
                        "rows": [[k] + [show(v.get(c)) for c in cols] for k, v in records.items()],
                    }
                )
                nested = {k: v for k, v in nested.items() if k not in records}
            for k, v in nested.items():
                walk(v, f"{name} › {k}")
        elif isinstance(node, list):
            if node and all(isinstance(x, dict) and all(scalar(y) for y in x.values()) for x in node):
                cols = list(dict.fromkeys(c for x in node for c in x))
                tables.append({"title": name, "columns": cols, "rows": [[show(x.get(c)) for c in cols] for x in node]})
            else:
                for i, x in enumerate(node):
                    walk(x, f"{name} [{i}]")
        else:
            tables.append({"title": name, "columns": ["value"], "rows": [[show(node)]]})

    walk(data, title)
    return tables


def markdown_blocks(text: str) -> list[dict]:
    """A small, safe reading of markdown: pipe tables become tables, ``#`` lines headings, other
    lines paragraphs of plain text (rendered escaped: no HTML from the file reaches the page)."""
    blocks: list[dict] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line.lstrip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|?\s*:?-{2,}", lines[i + 1]):
            header = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            blocks.append({"type": "table", "columns": header, "rows": rows})
            continue
        if line.startswith("#"):
            blocks.append({"type": "heading", "text": line.lstrip("#").strip()})
        elif line.strip():
            if blocks and blocks[-1]["type"] == "text":
                blocks[-1]["text"] += " " + line.strip()
            else:
                blocks.append({"type": "text", "text": line.strip()})
        elif blocks and blocks[-1]["type"] == "text":
            blocks.append({"type": "break"})
        i += 1
    return [b for b in blocks if b["type"] != "break"]


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|"):
        line = line[:-1]
    return [c.strip().replace("`", "").replace("**", "") for c in line.split("|")]
