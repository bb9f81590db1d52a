"""GIG accuracy and cost on a run's own dictionaries and codes, against a fine reference.

    python bench/gig_accuracy.py RUN [--images 16] [--tol 0.01] [--reference 1024 | --reference-tol 0.0005]
                                     [--uniform-max 256] [--json OUT.json] [--cache DIR]
    python bench/gig_accuracy.py --merge A.json B.json [--json=ALL.json]   # parts run side by side

RUN is a run directory whose decompose stage is done (for example one made with
``gig run --config bench/imagenet_sample.yaml``). For its first ``--images`` images the graph is
walked top-down as the attribute stage does: concept → class GIG at the last layer, then, for the
top-``k`` concepts of each layer, concept → concept GIG from the layer below. Targets are the
reference's, so every method attributes the same paths. For every (image, source layer, target):

* **reference** — ``--reference`` steps of the midpoint rule, or with ``--reference-tol T`` the
  error-controlled rule at tolerance ``T`` (up to 8 192 steps; its own convergence is reported);
* **gig** — the error-controlled default at ``--tol`` (nested trapezoid grids per target, one
  forward per step shared by the targets of a path, batch norms folded, channels-last);
* **uniform** — every nested uniform trapezoid grid from 8 to ``--uniform-max`` intervals (one
  pass), to find the one global step count that matches gig's worst-case error;
* **previous** — the previous default, 16 Gauss–Legendre steps, run as the previous engine ran
  it (one forward per target and step, plain model), timed side by side with gig.

Printed per path kind (``LAYER->class``, ``LOWER->UPPER``): p95 and worst relative L2 error
against the reference, how often the error estimate is at least half the true error, gradient
evaluations, completeness residuals; then the uniform step count gig saves against, and wall
times as ratios. Errors are ``‖a − a_ref‖₂ / ‖a_ref‖₂`` over the source layer's concepts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from gig.collect import iter_image_batches, load_images
from gig.concepts import load_dictionary
from gig.decompose import CodeReader
from gig.method import GIG, GIGResult
from gig.pipeline import Pipeline


class WalkedRun:
    """A finished run opened for walking its images as the attribute stage does: the model, its
    gradient copy, dictionaries, code readers, and the images ``skip … skip + images`` with their
    targets (shared by the GIG benchmarks)."""

    def __init__(self, run: Path, skip: int, images: int):
        self.pipe = Pipeline.open(run, progress=False)
        self.store, self.plain = self.pipe.store, self.pipe.handle
        self.store.require("decompose")
        self.layers = self.store.config.layers
        self.fast = self.plain.for_gradients(self.layers)
        self.V = {layer: load_dictionary(self.store, layer).float() for layer in self.layers}
        self.readers = {layer: CodeReader(self.store, layer) for layer in self.layers}
        self.used = load_images(self.store)["images"][skip : skip + images]
        self.target_of = {i["image_id"]: i["target"] for i in self.used}

    def batches(self, size: int):
        by_id = {r.image_id: r for r in self.pipe.source.records}
        return iter_image_batches(self.pipe.source, [by_id[i["image_id"]] for i in self.used], self.plain, size)


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (a - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def run(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] += time.perf_counter() - start
        return out


def previous_engine(gig: GIG, pixels, codes, targets, read) -> GIGResult:
    """16 Gauss–Legendre steps, one target at a time (each target its own forwards), as before."""
    parts = [gig.attribute(pixels, codes, targets[:, t : t + 1], n_steps=16, **read) for t in range(targets.shape[1])]
    return GIGResult(
        *(
            torch.cat([getattr(p, f) for p in parts], 1)
            for f in ("attributions", "output_diff", "residual", "target_value", "n_evaluations", "error_estimate")
        )
    )


def cached(args, name: str, compute):
    """The reference and the uniform grids do not depend on gig's settings: with ``--cache`` they
    are kept (safetensors) and reused by a later run on the same images."""
    from safetensors.torch import load_file, save_file

    if args.cache is None:
        return compute()
    path = args.cache / f"{name}.safetensors"
    if path.is_file():
        data = load_file(str(path))
        if "attributions" in data:
            return GIGResult(
                data["attributions"],
                data["output_diff"],
                data["residual"],
                data["target_value"],
                data["n_evaluations"],
                data["error_estimate"],
            )
        return {int(k): v for k, v in data.items()}
    value = compute()
    args.cache.mkdir(parents=True, exist_ok=True)
    if isinstance(value, GIGResult):
        save_file(
            {
                f: getattr(value, f).contiguous()
                for f in ("attributions", "output_diff", "residual", "target_value", "n_evaluations", "error_estimate")
            },
            str(path),
        )
    else:
        save_file({str(k): v.contiguous() for k, v in value.items()}, str(path))
    return value


def walk(pixels, codes, class_targets, layers, V, fast, plain, args, timer, records, key=""):
    """One batch of images: every path of the walk, every method; appends one record per path."""
    top_k = args.top_k
    upper_importance = torch.ones(pixels.shape[0], 1)
    targets = class_targets[:, None]
    read: dict = {}
    for position in range(len(layers) - 1, -1, -1):
        layer = layers[position]
        kind = f"{layer}->class" if position == len(layers) - 1 else f"{layer}->{layers[position + 1]}"
        gig = GIG(
            fast, layer, V[layer], internal_batch_size=args.internal_batch_size, tol=args.tol, max_steps=args.max_steps
        )
        reference = GIG(
            fast,
            layer,
            V[layer],
            n_steps=None if args.reference_tol else args.reference,
            quadrature_rule="riemann-midpoint",
            internal_batch_size=args.internal_batch_size,
            tol=args.reference_tol or 0.01,
            max_steps=8192,
        )
        ref = cached(
            args,
            f"{key}-{layer}-reference",
            lambda: timer.run("reference", reference.attribute, pixels, codes[layer], targets, **read),
        )
        res = timer.run("gig", gig.attribute, pixels, codes[layer], targets, **read)
        old = timer.run(
            "previous",
            previous_engine,
            GIG(plain, layer, V[layer], quadrature_rule="gauss-legendre", internal_batch_size=args.internal_batch_size),
            pixels,
            codes[layer],
            targets,
            read,
        )
        levels = cached(
            args,
            f"{key}-{layer}-uniform",
            lambda: timer.run(
                "uniform",
                gig.uniform_levels,
                pixels,
                codes[layer],
                targets,
                max_steps=args.uniform_max,
                min_steps=8,
                **read,
            ),
        )
        true = relative_error(res.attributions, ref.attributions)
        for n in range(pixels.shape[0]):
            for t in range(targets.shape[1]):
                records.append(
                    {
                        "kind": kind,
                        "target": int(targets[n, t]),
                        "error": float(true[n, t]),
                        "estimate": float(res.error_estimate[n, t]),
                        "evaluations": int(res.n_evaluations[n, t]),
                        "converged": bool(res.converged[n, t]),
                        "residual": float(res.relative_residual[n, t]),
                        "reference_residual": float(ref.relative_residual[n, t]),
                        "reference_converged": None if ref.converged is None else bool(ref.converged[n, t]),
                        "previous_error": float(relative_error(old.attributions[n, t], ref.attributions[n, t])),
                        "previous_residual": float(old.relative_residual[n, t]),
                        "uniform_error": {
                            int(k): float(relative_error(v[n, t], ref.attributions[n, t])) for k, v in levels.items()
                        },
                        "delta": float(ref.output_diff[n, t]),
                    }
                )
        # Next targets: the reference's top-k concepts of this layer by their flow to the class.
        share = ref.attributions / ref.output_diff[..., None].where(
            ref.output_diff[..., None].abs() > 1e-8, torch.tensor(1e-8)
        )
        score = (upper_importance[..., None] * share).sum(1)
        top = score.topk(min(top_k, score.shape[1]), dim=1)
        upper_importance, targets = top.values, top.indices
        if position > 0:
            read = {"read_layer": layer, "read_vectors": V[layer]}


def summarize(records: list[dict], tol: float, timer: Timer) -> dict:
    kinds = sorted({r["kind"] for r in records}, key=lambda k: [r["kind"] for r in records].index(k))
    out: dict = {"tol": tol, "by_kind": {}, "seconds": dict(timer.seconds)}

    def stats(rows: list[dict]) -> dict:
        err = np.array([r["error"] for r in rows])
        est = np.array([r["estimate"] for r in rows])
        ev = np.array([r["evaluations"] for r in rows])
        res = np.array([r["residual"] for r in rows])
        prev = np.array([r["previous_error"] for r in rows])
        return {
            "paths": len(rows),
            "error_p95": float(np.quantile(err, 0.95)),
            "error_max": float(err.max()),
            "estimate_honest": float(np.mean(est >= 0.5 * err)),
            "estimate_over_error_median": float(np.median(est / np.maximum(err, 1e-12))),
            "unconverged": float(np.mean(est > tol)),
            "evaluations_mean": float(ev.mean()),
            "evaluations_max": int(ev.max()),
            "evaluations_total": int(ev.sum()),
            "residual_p95": float(np.quantile(res, 0.95)),
            "residual_max": float(res.max()),
            "reference_residual_p95": float(np.quantile([r["reference_residual"] for r in rows], 0.95)),
            "reference_unconverged": float(np.mean([r["reference_converged"] is False for r in rows])),
            "previous_error_p95": float(np.quantile(prev, 0.95)),
            "previous_error_max": float(prev.max()),
            "previous_residual_p95": float(np.quantile([r["previous_residual"] for r in rows], 0.95)),
        }

    for kind in kinds:
        out["by_kind"][kind] = stats([r for r in records if r["kind"] == kind])
    out["all"] = stats(records)
    # The one global uniform grid that reaches gig's worst-case error, and what it costs.
    worst = out["all"]["error_max"]
    grids = sorted(records[0]["uniform_error"])
    uniform_worst = {n: max(r["uniform_error"][n] for r in records) for n in grids}
    uniform_p95 = {n: float(np.quantile([r["uniform_error"][n] for r in records], 0.95)) for n in grids}
    enough = [n for n in grids if uniform_worst[n] <= worst]
    out["uniform"] = {
        "worst": uniform_worst,
        "p95": uniform_p95,
        "intervals_for_gig_worst": enough[0] if enough else None,
    }
    if enough:
        total = len(records) * (enough[0] + 1)
        out["uniform"]["evaluations_total"] = total
        out["uniform"]["evaluation_ratio"] = total / out["all"]["evaluations_total"]
    return out


def print_summary(s: dict) -> None:
    head = (
        "kind",
        "paths",
        "err p95",
        "err max",
        "honest",
        "est/err",
        "evals mean",
        "evals max",
        "resid p95",
        "prev err p95",
        "prev err max",
        "prev resid p95",
    )
    print(" | ".join(head))
    for kind, st in list(s["by_kind"].items()) + [("all", s["all"])]:
        print(
            " | ".join(
                [
                    kind,
                    str(st["paths"]),
                    f"{st['error_p95']:.4f}",
                    f"{st['error_max']:.4f}",
                    f"{st['estimate_honest']:.3f}",
                    f"{st['estimate_over_error_median']:.2f}",
                    f"{st['evaluations_mean']:.1f}",
                    str(st["evaluations_max"]),
                    f"{st['residual_p95']:.4f}",
                    f"{st['previous_error_p95']:.4f}",
                    f"{st['previous_error_max']:.4f}",
                    f"{st['previous_residual_p95']:.4f}",
                ]
            )
        )
    u = s["uniform"]
    print("uniform trapezoid worst error by intervals:", ", ".join(f"{n}: {e:.4f}" for n, e in u["worst"].items()))
    print("uniform trapezoid p95 error by intervals:", ", ".join(f"{n}: {e:.4f}" for n, e in u["p95"].items()))
    if u["intervals_for_gig_worst"]:
        print(
            f"one global grid matching gig's worst error: {u['intervals_for_gig_worst']} intervals, "
            f"{u['evaluations_total']} evaluations = {u['evaluation_ratio']:.2f}x gig's {s['all']['evaluations_total']}"
        )
    else:
        print("no uniform grid up to the largest tried matches gig's worst error")
    sec = s["seconds"]
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in sec.items()))
    print(f"gig / previous 16-step engine wall time: {sec['gig'] / sec['previous']:.2f}")


def merge(paths: list[Path], out: Path | None) -> None:
    """One summary over several ``--json`` files (runs split over processes, side by side)."""
    parts = [json.loads(p.read_text()) for p in paths]
    timer = Timer()
    for part in parts:
        for k, v in part["summary"]["seconds"].items():
            timer.seconds[k] += v
    records = [r for part in parts for r in part["paths"]]
    for r in records:  # JSON keys are strings
        r["uniform_error"] = {int(k): v for k, v in r["uniform_error"].items()}
    summary = summarize(records, parts[0]["summary"]["tol"], timer)
    summary["images"] = sum(p["summary"]["images"] for p in parts)
    print(f"{summary['images']} images, {len(records)} paths")
    print_summary(summary)
    if out:
        out.write_text(json.dumps({"summary": summary, "paths": records}, indent=1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--merge":
        merge(
            [Path(p) for p in sys.argv[2:] if not p.startswith("--json=")],
            next((Path(p[7:]) for p in sys.argv[2:] if p.startswith("--json=")), None),
        )
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--skip", type=int, default=0, help="start at this image of the run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tol", type=float, default=0.01)
    parser.add_argument("--max-steps", type=int, default=512)
    parser.add_argument("--reference", type=int, default=1024)
    parser.add_argument(
        "--reference-tol",
        type=float,
        default=None,
        help="reference: error control at this tolerance (up to 8 192 steps) instead of --reference fixed steps, "
        "for integrands that fixed grids cannot resolve (a normalisation after the layer puts a path's whole "
        "change near α = 0)",
    )
    parser.add_argument("--uniform-max", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--internal-batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="write every path's record and the summary")
    parser.add_argument("--cache", type=Path, default=None, help="keep the reference and uniform grids here")
    args = parser.parse_args()

    walked = WalkedRun(args.run, args.skip, args.images)
    plain, layers, fast, V = walked.plain, walked.layers, walked.fast, walked.V
    readers, used, target_of = walked.readers, walked.used, walked.target_of
    timer, records = Timer(), []
    for batch in walked.batches(args.batch):
        ids = [r.image_id for r in batch.records]
        codes = {layer: torch.stack([readers[layer].codes(i) for i in ids]) for layer in layers}
        walk(
            batch.pixels,
            codes,
            torch.tensor([target_of[i] for i in ids]),
            layers,
            V,
            fast,
            plain,
            args,
            timer,
            records,
            key="-".join(map(str, ids)),
        )
        print(f"{len(records)} paths after {len({*ids})} more images", flush=True)
    summary = summarize(records, args.tol, timer)
    summary.update(
        {
            "run": str(args.run),
            "images": len(used),
            "folded_batchnorms": fast.folded_batchnorms,
            "threads": torch.get_num_threads(),
        }
    )
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "paths": records}, indent=1))


if __name__ == "__main__":
    main()
