"""Replay GIG's error-controlled quadrature on saved integrands: evaluations against true error.

    python bench/quadrature_study.py DUMP_DIR [DUMP_DIR ...] [--tol 0.01] [--json OUT.json]

``DUMP_DIR`` holds ``bench/gig_integrands.py``'s files: each path's integrand ``F (nodes, K)`` and
readout ``g (nodes,)`` on a uniform grid of ``2^k`` intervals. Every rule below only evaluates
the integrand at dyadic nodes, so it is replayed exactly (no model), as long as it does not ask
for a node finer than the saved grid (a cell two grid intervals wide is not split further; such
cells are counted). The reference is the saved grid's own trapezoid rule (its error against the
exact integral is that of a rule with 1 024 intervals, reported as the completeness residual).

Rules, all starting from equal cells and bisecting where the attribution vectors change most,
the targets of one (image, transition) sharing their nodes as in the engine:

* ``previous``: the engine before per-target cells (8 cells shared by an image's targets,
  fraction 0.3, estimate ``max(‖Σd‖, (Σ‖d‖²)^½)``, completeness within ``tol/2``);
* ``default``: today's engine (each target its own cells, the estimate scaled by
  ``gig.method.ESTIMATE_SCALE``);
* variants that change one thing at a time (``--rules NAME ...``);
* ``oracle`` rules: the default's refinement stopped by each path's *true* error (no estimator can
  stop this refinement earlier at the same tolerance): a lower bound on evaluations.

Printed first: the integrands' structure (total variation against the attribution's norm, and
how many grid intervals hold half of it) and the error of uniform grids of 8 … 256 intervals
(how fast they converge). Then per path kind and over all: evaluations (backward passes) per attribution, forwards per
attribution (the distinct nodes of an image's paths, shared), their cost in backward passes
(``FORWARD_COST`` per forward), true error p95 and max, estimate honesty (share of paths with
estimate ≥ half the error) and estimate / error (median, 5th percentile).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from gig.method import ESTIMATE_SCALE

#: a forward's cost in backward passes (one target): the attribute stage's profile on Lite0, one CPU thread
FORWARD_COST = 0.65


@dataclass(frozen=True)
class Rule:
    name: str = "engine"
    min_cells: int = 8
    fraction: float = 0.3
    estimate: str = "max"  # max | sum | rss
    scale: float = 1.0  # the stopping test is scale · estimate ≤ tol
    completeness: float = 0.5  # residual ≤ completeness · tol · |Δg|; 0: no completeness test
    answer: str = "trapezoid"  # trapezoid | simpson
    max_nodes: int = 513
    uniform: bool = False  # bisect every cell each round (nested uniform grids)
    per_target: bool = False  # each target its own cells (one backward per node it asked for)
    matched: bool = False  # each interval's weights matched to the exact readout change g(b) − g(a)
    oracle: bool = False  # stop on the true error against the saved reference (a bound, not a rule)


def load_groups(dirs: list[Path]) -> list[dict]:
    """One group per (image, path kind): ``F (nodes, T, K)``, ``g (nodes, T)``, kind, targets."""
    groups = []
    for d in dirs:
        for path in sorted(d.glob("image_*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                keys = [k for k in f.keys() if not k.endswith("/values")]
                kinds: dict[str, list[str]] = {}
                for k in keys:
                    kinds.setdefault(k.rsplit("/", 1)[0], []).append(k)
                for kind, ks in kinds.items():
                    F = torch.stack([f.get_tensor(k) for k in ks], 1).double()
                    g = torch.stack([f.get_tensor(k + "/values") for k in ks], 1).double()
                    groups.append({"source": f"{d.name}/{path.stem}", "kind": kind, "F": F, "g": g})
    return groups


def trapezoid(F: torch.Tensor) -> torch.Tensor:
    """The saved grid's trapezoid rule over its first axis."""
    n = F.shape[0] - 1
    w = torch.full((n + 1,), 1.0 / n, dtype=F.dtype)
    w[[0, -1]] /= 2
    return torch.einsum("s,s...->...", w, F)


def matched(Fa, Fb, ga, gb, h):
    """``∫ F`` over an interval of width ``h (cells, 1, 1)`` as ``h (θ F(a) + (1 − θ) F(b))``, θ chosen
    so that the concepts' sum integrates to the exact ``g(b) − g(a)`` (exact for one switch of a
    piecewise-linear network in the interval); θ = ½ where that has no solution in [0, 1]."""
    sa, sb = Fa.sum(-1), Fb.sum(-1)  # (cells, T)
    den = sa - sb
    theta = ((gb - ga) / h[:, :, 0] - sb) / torch.where(den.abs() > 0, den, torch.ones_like(den))
    ok = (den.abs() > 1e-3 * (sa.abs() + sb.abs() + 1e-12)) & (theta >= 0) & (theta <= 1)
    theta = torch.where(ok, theta, torch.full_like(theta, 0.5))[..., None]
    return h * (theta * Fa + (1 - theta) * Fb)


def replay(F: torch.Tensor, g: torch.Tensor, rule: Rule, tol: float) -> dict:
    """The adaptive rule on one group: ``F (nodes, T, K)`` on a ``2^k``-interval grid."""
    fine = F.shape[0] - 1
    t = F.shape[1]
    step = fine // (2 * rule.min_cells)
    nodes = list(range(0, fine + 1, step))
    cells = [(2 * j * step, (2 * j + 1) * step, (2 * j + 2) * step) for j in range(rule.min_cells)]
    delta = g[-1] - g[0]
    reference = trapezoid(F)  # (T, K), for the oracle
    active = np.ones(t, bool)
    out = {
        "A": torch.zeros(t, F.shape[2], dtype=F.dtype),
        "est": np.zeros(t),
        "evals": np.zeros(t, int),
        "converged": np.zeros(t, bool),
        "floor": 0,
    }
    while active.any():
        c = torch.tensor(cells)
        Fa, Fm, Fb = F[c[:, 0]], F[c[:, 1]], F[c[:, 2]]
        h = (c[:, 2] - c[:, 0]).double()[:, None, None] / fine
        if rule.matched:
            ga, gm, gb = g[c[:, 0]], g[c[:, 1]], g[c[:, 2]]  # (cells, T)
            two = matched(Fa, Fm, ga, gm, h / 2) + matched(Fm, Fb, gm, gb, h / 2)
            one = matched(Fa, Fb, ga, gb, h)
        else:
            two = h / 4 * (Fa + 2 * Fm + Fb)
            one = h / 2 * (Fa + Fb)
        d = two - one
        A = two.sum(0) if rule.answer == "trapezoid" else (two + d / 3).sum(0)
        norm = A.norm(dim=-1).clamp_min(1e-30)
        local = (d * d).sum(-1)  # (cells, T)
        if rule.estimate == "max":
            change = torch.maximum(d.sum(0).norm(dim=-1), local.sum(0).sqrt())
        elif rule.estimate == "sum":
            change = d.sum(0).norm(dim=-1)
        else:
            change = local.sum(0).sqrt()
        est = rule.scale * (change / norm).numpy()
        if rule.oracle:  # the estimate replaced by the true error: no estimator stops earlier
            est = ((A - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-30)).numpy()
        resid = (A.sum(-1) - delta).abs().numpy()
        done = est <= tol
        if rule.completeness:
            done &= resid <= rule.completeness * tol * np.abs(delta.numpy())
        room = (rule.max_nodes - len(nodes)) // 2
        widths = (c[:, 2] - c[:, 0]).numpy()
        splittable = widths >= 4
        finish = active & (done | (room < 1) | (not splittable.any()))
        for j in np.flatnonzero(finish):
            out["A"][j] = A[j]
            out["est"][j] = est[j]
            out["evals"][j] = len(nodes)
            out["converged"][j] = done[j]
        active &= ~finish
        if not active.any():
            break
        score = (local / norm**2)[:, torch.from_numpy(active)].sum(1).numpy()
        score = np.where(splittable, score, -1.0)
        order = np.argsort(-score, kind="stable")
        cum = np.cumsum(np.clip(score[order], 0, None))
        count = len(cells) if rule.uniform else int((cum < rule.fraction * cum[-1]).sum()) + 1
        if rule.uniform and count > room:
            count = 0  # a uniform grid does not stop half-way: the cap ends the path
        chosen = set(order[: max(1, min(count, room))].tolist()) if count else set()
        if not chosen:
            for j in np.flatnonzero(active):
                out["A"][j], out["est"][j], out["evals"][j] = A[j], est[j], len(nodes)
            break
        new_cells = []
        for i, (a, m, b) in enumerate(cells):
            if i in chosen:
                l, r = (a + m) // 2, (m + b) // 2
                nodes += [l, r]
                new_cells += [(a, l, m), (m, r, b)]
                out["floor"] += (m - a) == 2
            else:
                new_cells.append((a, m, b))
        cells = new_cells
    out["nodes"] = set(nodes)
    return out


def study(groups: list[dict], rule: Rule, tol: float) -> dict:
    rows = []
    if rule.per_target:
        groups = [
            {**grp, "F": grp["F"][:, t : t + 1], "g": grp["g"][:, t : t + 1], "group": i}
            for i, grp in enumerate(groups)
            for t in range(grp["F"].shape[1])
        ]
    union: dict[int, set] = {}
    for i, grp in enumerate(groups):
        ref = trapezoid(grp["F"])  # (T, K)
        res = replay(grp["F"], grp["g"], rule, tol)
        union.setdefault(grp.get("group", i), set()).update(res["nodes"])
        err = ((res["A"] - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).numpy()
        delta = (grp["g"][-1] - grp["g"][0]).numpy()
        ref_resid = np.abs(ref.sum(-1).numpy() - delta) / np.maximum(np.abs(delta), 1e-12)
        for j in range(len(err)):
            rows.append(
                {
                    "kind": grp["kind"],
                    "error": float(err[j]),
                    "estimate": float(res["est"][j]),
                    "evals": int(res["evals"][j]),
                    "converged": bool(res["converged"][j]),
                    "ref_residual": float(ref_resid[j]),
                    "floor": res["floor"],
                    "group": grp.get("group", i),
                }
            )
    for r in rows:  # forwards: the group's distinct nodes, shared by its paths
        r["forwards"] = len(union[r["group"]]) / sum(x["group"] == r["group"] for x in rows)
    return rows


def summary(rows: list[dict]) -> dict:
    err = np.array([r["error"] for r in rows])
    est = np.array([r["estimate"] for r in rows])
    ev = np.array([r["evals"] for r in rows])
    fw = np.array([r["forwards"] for r in rows])
    return {
        "paths": len(rows),
        "evals_mean": float(ev.mean()),
        "forwards_mean": float(fw.mean()),
        "cost_mean": float(ev.mean() + FORWARD_COST * fw.mean()),
        "err_p95": float(np.quantile(err, 0.95)),
        "err_max": float(err.max()),
        "honest": float(np.mean(est >= 0.5 * err)),
        "est_over_err": float(np.median(est / np.maximum(err, 1e-12))),
        "est_over_err_p5": float(np.quantile(est / np.maximum(err, 1e-12), 0.05)),
        "unconverged": float(np.mean([not r["converged"] for r in rows])),
    }


RULES = {
    "previous": Rule("previous"),
    "default": Rule("default", per_target=True, scale=ESTIMATE_SCALE),
    "engine": Rule(),
    "sum": Rule("sum", estimate="sum"),
    "no-completeness": Rule("no-completeness", completeness=0),
    "cells4": Rule("cells4", min_cells=4),
    "fraction0.5": Rule("fraction0.5", fraction=0.5),
    "simpson": Rule("simpson", answer="simpson"),
    "half": Rule("half", scale=0.5),
    "half-sum": Rule("half-sum", scale=0.5, estimate="sum"),
    "per-target": Rule("per-target", per_target=True),
    "matched": Rule("matched", matched=True),
    "matched-0.7": Rule("matched-0.7", matched=True, scale=0.7),
    "pt-matched-0.7": Rule("pt-matched-0.7", matched=True, scale=0.7, per_target=True),
    "pt-0.7": Rule("pt-0.7", scale=0.7, per_target=True),
    "pt-0.7-f0.5": Rule("pt-0.7-f0.5", scale=0.7, per_target=True, fraction=0.5),
    "shared-0.8-f0.5": Rule("shared-0.8-f0.5", scale=0.8, fraction=0.5),
    "shared-0.7-f0.5": Rule("shared-0.7-f0.5", scale=0.7, fraction=0.5),
    "uniform": Rule("uniform", uniform=True),
    # The default's refinement stopped by the true error (no completeness test): what a perfect
    # error estimate would spend, a lower bound for every estimator of this refinement.
    "oracle": Rule("oracle", per_target=True, completeness=0, oracle=True),
    "oracle-f0.1": Rule("oracle-f0.1", per_target=True, completeness=0, oracle=True, fraction=0.1),
    "oracle-c2-f0.1": Rule("oracle-c2-f0.1", per_target=True, completeness=0, oracle=True, min_cells=2, fraction=0.1),
    "uniform-half": Rule("uniform-half", uniform=True, scale=0.5),
    "uniform-half-c4": Rule("uniform-half-c4", uniform=True, scale=0.5, min_cells=4),
}


def structure(groups: list[dict]) -> dict:
    """How the saved integrands vary, over every path: total variation ``Σ ‖F(α_{i+1}) − F(α_i)‖``
    relative to the attribution's norm, and how many of the grid's intervals hold half and 90 % of
    it (few: a handful of switches carry it; many: hundreds of small ones)."""
    ratio, half, most = [], [], []
    for grp in groups:
        for t in range(grp["F"].shape[1]):
            F = grp["F"][:, t]
            jumps = (F[1:] - F[:-1]).norm(dim=-1)
            share = jumps.sort(descending=True).values.cumsum(0) / jumps.sum().clamp_min(1e-30)
            ratio.append(float(jumps.sum() / trapezoid(F).norm().clamp_min(1e-30)))
            half.append(int((share < 0.5).sum()) + 1)
            most.append(int((share < 0.9).sum()) + 1)
    q = lambda v: [float(x) for x in np.quantile(v, [0.05, 0.5, 0.95])]  # noqa: E731
    return {
        "paths": len(ratio),
        "intervals": groups[0]["F"].shape[0] - 1,
        "total_variation_over_norm_p5_p50_p95": q(ratio),
        "intervals_holding_half_p5_p50_p95": q(half),
        "intervals_holding_90pct_p5_p50_p95": q(most),
    }


def uniform_errors(groups: list[dict]) -> dict:
    """Every path's error on uniform trapezoid grids of 8 … 256 intervals (nodes at every
    ``fine / n``-th saved node) against the saved grid: median, p95 and max per grid, and the
    slope of the median against ``n`` on a log-log scale (−1: error ∝ 1/N)."""
    out = {}
    for n in (8, 16, 32, 64, 128, 256):
        errors = []
        for grp in groups:
            F = grp["F"]
            fine = F.shape[0] - 1
            if fine % n:
                continue
            ref, coarse = trapezoid(F), trapezoid(F[:: fine // n])
            errors += ((coarse - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).tolist()
        out[n] = {"p50": float(np.median(errors)), "p95": float(np.quantile(errors, 0.95)), "max": max(errors)}
    ns = sorted(out)
    slope = np.polyfit(np.log(ns), np.log([out[n]["p50"] for n in ns]), 1)[0]
    return {"intervals": out, "median_slope": float(slope)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dumps", type=Path, nargs="+")
    parser.add_argument("--tol", type=float, default=0.01)
    parser.add_argument("--rules", nargs="*", default=["previous", "default"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    groups = load_groups(args.dumps)
    print(f"{len(groups)} groups, {sum(g['F'].shape[1] for g in groups)} paths")
    results = {"structure": structure(groups)}
    print("integrand structure:", json.dumps(results["structure"]))
    results["uniform_errors"] = uniform_errors(groups)
    print("uniform trapezoid grids:", json.dumps(results["uniform_errors"]))
    for name in args.rules:
        rows = study(groups, RULES[name], args.tol)
        kinds = sorted({r["kind"] for r in rows})
        results[name] = {k: summary([r for r in rows if r["kind"] == k]) for k in kinds}
        results[name]["all"] = summary(rows)
        for k, s in results[name].items():
            print(f"{name:18s} {k:24s} " + " ".join(f"{a} {b:.4g}" for a, b in s.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
