"""The decompose stage's coding, old against new, side by side on one finished run.

    OMP_NUM_THREADS=1 python bench/decompose_speed.py RUN [--images 40] [--threads 1] [--out F.json]

For every layer of RUN (its dictionaries and images), on ``--images`` images (every position):

* **old**: FISTA capped at ``lasso_max_iter`` iterations (the stage as it was) at the λ the
  run's decompose stage recorded (a run made with the earlier defaults), or, with
  ``--old-rel-error R`` (any run, e.g. one made with today's defaults), at the λ the earlier
  stage would have calibrated: 14 bisection steps in log λ, each a FISTA solve of
  ``calibration_size`` of the run's sampled PFVs, to a relative error of R (timed: that
  calibration was the earlier stage's fixed cost, as the front is today's);
* **new**: λ from the layer's sparsity–fidelity front under the current default rule (measured
  here on the run's first ``front_images`` images, and timed), then LARS (if SPAMS is
  installed) + least-squares refit, and FISTA to its duality-gap certificate + refit; with
  ``--coder omp``, the OMP coder's own front and λ, then OMP.

Printed per layer: seconds per 1000 positions, l0, R², and the Lasso objective's relative
excess over the optimum (LARS, exact; FISTA to a 1e-7 gap without SPAMS), on ``--check`` rows, before the refit.
Ratios (old / new) are of times measured in this one process, one after another. Last, the
whole stage for the run's image count, old against new: fixed cost (calibration / front) plus
coding at the measured rates, plus each stage's model passes per image (a capture and one
``run_from`` per layer in both since 0.4; the shared-prefix pass of 0.3's stage,
``ModelHandle.run_replacing_each``, measured beside them for reference).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import torch

from gig.collect import iter_image_batches, load_images, load_samples
from gig.concepts import load_dictionary
from gig.config import Config
from gig.decompose import encoder_for, load_front_images, sparsity_front
from gig.hooks import ModelHandle
from gig.images import open_source
from gig.lasso import LassoEncoder, lambda_max, lars_available
from gig.models import load_model
from gig.store import RunStore


def rows_of(grids: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]) for g in grids])


def r2(X: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    return 1 - float(((X - U @ V) ** 2).sum() / ((X - X.mean(0)) ** 2).sum())


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def calibrate_old_alpha(
    store: RunStore, layer: str, V: torch.Tensor, rel_error: float, max_iter: int, size: int, steps: int = 14
) -> float:
    """The earlier stage's λ: the largest whose FISTA-``max_iter`` codes of ``size`` sampled PFVs
    reach ``rel_error`` (bisection in log λ between λ_max·1e-4 and λ_max)."""
    X = load_samples(store, layer)["pfv"].float()
    X = X[torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))[:size]]
    hi = lambda_max(X, V)
    lo = hi * 1e-4
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        U = LassoEncoder(V, mid, max_iter=max_iter, tol=0.0, solver="fista").encode(X)
        if float((X - U @ V).norm() / X.norm()) <= rel_error:
            lo = mid
        else:
            hi = mid
    return lo


def model_pass_seconds(handle: ModelHandle, source, records, layers: list[str], batch_size: int) -> dict[str, float]:
    """Seconds per image of the model passes of either stage (the capture of every layer and,
    per layer, the network with that layer replaced, for the output figures), here with every
    grid replaced by itself: ``old`` and ``new``, a capture and one ``run_from`` per layer (what
    both stages do since 0.4: ``run_from`` reuses a stand-in for the network below the layer;
    since 0.5 the stage runs them through the batch-norm-folded copy, ``ModelHandle.measuring``);
    ``shared``, for reference, the one pass with shared prefixes (``run_replacing_each``, today's
    stage until 0.4), after its one-time check against separate passes (made here untimed)."""

    def separate(measure: ModelHandle):
        def passes(pixels):
            _, grids = handle.capture(pixels, layers)
            for layer in layers:
                measure.run_from(pixels, layer, grids[layer])

        return passes

    def shared(pixels):
        handle.run_replacing_each(pixels, layers, lambda _layer, grid: grid)

    batches = list(iter_image_batches(source, records, handle, batch_size))
    out = {}
    with torch.no_grad():
        # new: the replaced passes through the batch-norm-folded copy (ModelHandle.measuring, 0.5)
        kinds = (("old", separate(handle)), ("new", separate(handle.measuring(layers))), ("shared", shared))
        for name, passes in kinds:
            passes(batches[0].pixels)  # warm-up (and the shared pass's check)
            t0 = time.perf_counter()
            for batch in batches:
                passes(batch.pixels)
            out[name] = (time.perf_counter() - t0) / len(records)
    out["check_seconds"] = 0.0  # the separate passes need no check
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--check", type=int, default=1000, help="rows on which the objective is checked")
    parser.add_argument(
        "--old-rel-error", type=float, help="calibrate the old λ to this relative error, as the earlier stage did"
    )
    parser.add_argument("--old-max-iter", type=int, default=100, help="the old stage's lasso_max_iter")
    parser.add_argument(
        "--coder",
        choices=["lasso", "omp"],
        default="lasso",
        help="the new stage's coder (omp: its own front and λ; no Lasso objective to check)",
    )
    parser.add_argument(
        "--skip-fista",
        action="store_true",
        help="with the Lasso coder, time LARS + refit only (FISTA to its certificate is the GPU path)",
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = RunStore.open(args.run)  # read only: the run's config and manifest stay as they are
    old_config = store.config
    bundle = load_model(old_config.model, old_config.weights)
    handle = ModelHandle(bundle)
    source = open_source(old_config.images, class_index=bundle.class_index if bundle.class_names else None)
    new_config = dataclasses.replace(
        old_config,
        **{
            f.name: f.default
            for f in dataclasses.fields(Config)
            if f.name
            in (
                "target_rel_error",
                "min_r2",
                "max_kl",
                "min_top1_agreement",
                "front_images",
                "debias",
                "lasso_solver",
                "lasso_max_iter",
                "lasso_tol",
            )
        },
    )
    new_config = dataclasses.replace(new_config, coder=args.coder)
    old_max_iter = args.old_max_iter if args.old_rel_error is not None else old_config.lasso_max_iter
    old_alpha, calibration_s = {}, {}
    for layer in old_config.layers:
        if args.old_rel_error is None:
            old_alpha[layer], calibration_s[layer] = store.summary("decompose")["alpha"][layer], None
        else:
            old_alpha[layer], calibration_s[layer] = timed(
                lambda: calibrate_old_alpha(
                    store,
                    layer,
                    load_dictionary(store, layer),
                    args.old_rel_error,
                    old_max_iter,
                    old_config.calibration_size,
                )
            )
    used = load_images(store)["images"]
    by_id = {r.image_id: r for r in source.records}
    records = [by_id[i["image_id"]] for i in used]
    preds = torch.tensor([i["pred"] for i in used])
    layers = old_config.layers
    (front_images, load_s) = timed(lambda: load_front_images(source, records, preds, handle, layers, new_config))
    bench = records[-args.images :]  # other images than the front's (mostly)
    grids = {layer: [] for layer in layers}
    for batch in iter_image_batches(source, bench, handle, old_config.batch_size):
        with torch.no_grad():
            _, captured = handle.capture(batch.pixels, layers)
        for layer in layers:
            grids[layer].append(captured[layer])
    report = {
        "run": args.run,
        "images": len(bench),
        "threads": args.threads,
        "lars": lars_available(),
        "front_load_seconds": load_s,
        "layers": {},
    }
    for layer in layers:
        V = load_dictionary(store, layer)
        X = rows_of(grids[layer])
        front, front_s = timed(lambda: sparsity_front(front_images, layer, V, handle, new_config))
        lam = front["alpha"]
        old_enc = LassoEncoder(
            V, old_alpha[layer], old_config.nonnegative, max_iter=old_max_iter, tol=0.0, solver="fista"
        )
        U_old, t_old = timed(lambda: old_enc.encode(X))
        row = {
            "K": int(V.shape[0]),
            "C": int(V.shape[1]),
            "positions": int(X.shape[0]),
            "front_seconds": front_s,
            "old": {
                "alpha": old_alpha[layer],
                "seconds": t_old,
                "calibration_seconds": calibration_s[layer],
                "l0": float((U_old != 0).float().mean()),
                "r2": r2(X, U_old, V),
            },
            "new": {"alpha": lam, "rule_met": front["met"], "front_points": len(front["points"])},
        }
        # The exact optimum at each λ on --check rows: FISTA polishing the codes to a 1e-9 gap.
        check = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))[: args.check]
        Xc = X[check]

        def excess(alpha: float, U: torch.Tensor) -> float:
            # The optimum: LARS (exact) where installed, else FISTA to a 1e-7 duality gap.
            exact = dict(solver="lars") if lars_available() else dict(solver="fista", tol=1e-7, max_iter=50000)
            ref = LassoEncoder(V, alpha, old_config.nonnegative, **exact)
            best = float(ref.objective(Xc, ref.encode(Xc)).sum())
            return float(ref.objective(Xc, U[check]).sum()) / best - 1

        row["old"]["objective_excess"] = excess(old_alpha[layer], U_old)
        solvers = (
            ["omp"]
            if args.coder == "omp"
            else ["fista"]
            if not lars_available()
            else ["lars"]
            if args.skip_fista
            else ["lars", "fista"]
        )
        for solver in solvers:
            if solver == "omp":  # no Lasso objective, no refit: least squares on the support already
                U, t_code = timed(lambda: encoder_for(new_config, V, lam).encode(X))
                row["new"]["omp"] = {
                    "seconds": t_code,
                    "seconds_without_refit": t_code,
                    "objective_excess": None,
                    "l0": float((U != 0).float().mean()),
                    "r2": r2(X, U, V),
                    "speedup_vs_old": t_old / t_code,
                }
                continue
            plain = dataclasses.replace(new_config, lasso_solver=solver, debias=False)
            U, t_code = timed(lambda: encoder_for(plain, V, lam).encode(X))
            D, t_refit = timed(lambda: encoder_for(dataclasses.replace(plain, debias=True), V, lam).encode(X))
            row["new"][solver] = {
                "seconds": t_refit,
                "seconds_without_refit": t_code,
                "objective_excess": excess(lam, U),
                "l0": float((D != 0).float().mean()),
                "r2": r2(X, D, V),
                "speedup_vs_old": t_old / t_refit,
            }
        report["layers"][layer] = row
        n = X.shape[0] / 1000
        new_line = "  ".join(
            f"{s} {row['new'][s]['seconds'] / n:.3f} s/1k (×{row['new'][s]['speedup_vs_old']:.1f}, "
            f"excess {_sci(row['new'][s]['objective_excess'])})"
            for s in solvers
        )
        print(
            f"{layer}: K {row['K']} C {row['C']} P {row['positions']} | old FISTA-{old_max_iter} "
            f"{t_old / n:.3f} s/1k l0 {row['old']['l0']:.3f} R² {row['old']['r2']:.3f} excess "
            f"{row['old']['objective_excess']:.1e} | new λ {lam:.4g} met {front['met']} front {front_s:.0f} s, "
            f"l0 {row['new'][solvers[0]]['l0']:.3f} R² {row['new'][solvers[0]]['r2']:.3f} | {new_line}",
            flush=True,
        )
    report["stage"] = whole_stage(
        report, len(records), model_pass_seconds(handle, source, bench, layers, old_config.batch_size)
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def whole_stage(report: dict, n_images: int, shared_s: dict[str, float]) -> dict:
    """The whole stage for ``n_images``, old against new, from the rates measured per layer (see
    the module docstring); printed and returned."""
    rows = report["layers"].values()
    per_image = {"old": sum(r["old"]["seconds"] for r in rows) / report["images"]}
    fixed = {
        "old": sum(r["old"]["calibration_seconds"] or 0.0 for r in rows),
        "new": sum(r["front_seconds"] for r in rows) + shared_s["check_seconds"],
    }
    out = {
        "n_images": n_images,
        "model_pass_seconds_per_image": shared_s,
        "old_calibrated_here": all(r["old"]["calibration_seconds"] is not None for r in rows),
    }
    for solver in ("lars", "fista", "omp"):
        if all(solver in r["new"] for r in rows):
            per_image[solver] = sum(r["new"][solver]["seconds"] for r in rows) / report["images"]
    for name, rate in per_image.items():
        kind = "old" if name == "old" else "new"
        out[name] = {
            "fixed_seconds": fixed[kind],
            "coding_seconds_per_image": rate,
            "model_pass_seconds_per_image": shared_s[kind],
            "total_seconds": fixed[kind] + n_images * (rate + shared_s[kind]),
        }
    for name in per_image:
        if name != "old":
            out[name]["speedup_vs_old"] = out["old"]["total_seconds"] / out[name]["total_seconds"]
    print(
        f"whole stage, {n_images} images (model passes: {shared_s['new']:.3f} s/image, the shared-prefix pass "
        f"{shared_s['shared']:.3f}): "
        + "; ".join(
            f"{name} {v['fixed_seconds']:.0f} s fixed + {v['coding_seconds_per_image']:.3f} s/image coding = "
            f"{v['total_seconds']:.0f} s" + (f" (×{v['speedup_vs_old']:.2f})" if "speedup_vs_old" in v else "")
            for name, v in out.items()
            if isinstance(v, dict) and "total_seconds" in v
        ),
        flush=True,
    )
    return out


if __name__ == "__main__":
    main()
