"""Scaling table: time and peak memory per stage against images, layers and concepts per layer,
and the projected time of a larger setting from the measured per-item costs.

    python bench/scaling.py OUT [--images 16,32,64] [--layers A,B,C,D] [--concepts 32,128]
                             [--model efficientnet-lite0] [--weights default] [--device cpu]
                             [--set key=value ...] [--project 50000] [--gpus 1,8]

Every stage of every run is its own ``python -m gig STAGE`` process, so each stage's peak RSS
(and CUDA peak) in the manifest is that stage's alone, not the high-water mark of the stages
before it. Images are made offline from the photos embedded in scikit-image, scikit-learn and
matplotlib (flips and crops; ``bench/gpu_check.py``), so any number can be made.

Three sweeps, each from fresh runs:
  images    every layer, each image count;
  layers    the smallest image count, the top 1, 2, ... layers;
  concepts  the smallest image count, every layer, ``max_concepts`` at each value.

Per stage, a least-squares line seconds = fixed + per_image · N over the images sweep gives the
per-image cost; ``--project N`` extrapolates it to N images on one device and, for the sharded
stages (collect, decompose, attribute), on several (``--gpus``) at the parallel efficiency given
by ``--efficiency`` (measured on the CPU with ``bench/parallel_efficiency.py``). The projection is
printed as such, with the line it comes from. Results: OUT/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
STAGES = ("collect", "concepts", "decompose", "attribute", "graph")
SHARDED = ("collect", "decompose", "attribute")


def make_images(folder: Path, n: int) -> Path:
    """``n`` offline JPEGs in ``folder`` (kept between calls: only missing files are written)."""
    sys.path.insert(0, str(BENCH))
    from gpu_check import make_images as make  # noqa: E402  (bench/ is a folder of scripts)

    if len(list(folder.glob("img_*.jpg"))) < n:
        make(folder, n)
    return folder


def image_list(folder: Path, n: int, out: Path) -> Path:
    """A CSV of the first ``n`` images of ``folder`` (the image source of one run)."""
    files = sorted(folder.glob("img_*.jpg"))[:n]
    out.write_text("path\n" + "".join(f"{f}\n" for f in files))
    return out


def run_stages(run: Path, settings: dict, env: dict) -> dict:
    """Each stage in its own process; returns the manifest's per-stage entries."""
    run.mkdir(parents=True, exist_ok=True)
    config = run.parent / f"{run.name}.yaml"
    config.write_text(yaml.safe_dump(settings))
    with open(run.parent / f"{run.name}.log", "w") as log:  # the stages' own output and progress bars
        for stage in STAGES:
            subprocess.run(
                [sys.executable, "-m", "gig", stage, str(run), "--config", str(config)],
                check=True,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    rows = {}
    for stage in STAGES:
        entry = stages[stage]
        rows[stage] = {
            "seconds": float(entry["seconds"]),
            "peak_rss_mb": entry.get("peak_rss_mb"),
            "cuda_peak_mb": entry.get("cuda_peak_mb"),
        }
    acc = stages["attribute"].get("summary", {}).get("accuracy", {})
    rows["attribute"]["evaluations_total"] = acc.get("evaluations_total")
    rows["attribute"]["evaluations_mean"] = acc.get("evaluations_mean")
    return rows


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = fixed + slope · x``; with one point, a line through the origin."""
    import numpy as np

    if len(set(xs)) < 2:
        return 0.0, ys[0] / xs[0]
    slope, fixed = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(fixed), float(slope)


def table(rows: list[dict], key: str, label: str) -> str:
    head = (
        f"| {label} | "
        + " | ".join(f"{s} s" for s in STAGES)
        + " | total s | "
        + " | ".join(f"{s} MB" for s in STAGES)
        + " |"
    )
    lines = [head, "|" + "---|" * (len(STAGES) * 2 + 2)]
    for r in rows:
        secs = [r["stages"][s]["seconds"] for s in STAGES]
        mem = [r["stages"][s]["peak_rss_mb"] for s in STAGES]
        lines.append(
            f"| {r[key]} | "
            + " | ".join(f"{v:.1f}" for v in secs)
            + f" | {sum(secs):.1f} | "
            + " | ".join(f"{v:.0f}" for v in mem)
            + " |"
        )
    return "\n".join(lines)


def cuda_table(rows: list[dict], key: str) -> str:
    return "\n".join(
        f"  {r[key]}: " + ", ".join(f"{s} {r['stages'][s]['cuda_peak_mb']} MB" for s in STAGES) for r in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", default="16,32,64")
    parser.add_argument("--layers", default="_blocks.4,_blocks.8,_blocks.11,_blocks.15")
    parser.add_argument("--concepts", default="", help="max_concepts values for the concepts sweep")
    parser.add_argument("--no-layer-sweep", action="store_true")
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other config setting (YAML value), e.g. --set n_steps=8",
    )
    parser.add_argument("--project", type=int, default=50000, help="images of the projected setting")
    parser.add_argument("--gpus", default="1,8", help="devices of the projection")
    parser.add_argument(
        "--efficiency",
        type=float,
        default=0.95,
        help="parallel efficiency of the sharded stages on several devices (a measured figure)",
    )
    args = parser.parse_args()

    counts = [int(n) for n in args.images.split(",")]
    layers = args.layers.split(",")
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    args.out.mkdir(parents=True, exist_ok=True)
    folder = make_images(args.out / "images", max(counts))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(BENCH.parent / "src") + os.pathsep + env.get("PYTHONPATH", "")

    def settings(n: int, use_layers: list[str], **more) -> dict:
        return {
            "model": args.model,
            "weights": args.weights,
            "device": args.device,
            "layers": use_layers,
            "images": str(image_list(folder, n, args.out / f"images_{n}.csv")),
            **extra,
            **more,
        }

    start = time.perf_counter()
    results: dict = {
        "device": args.device,
        "model": args.model,
        "settings": extra,
        "images": [],
        "layers": [],
        "concepts": [],
    }
    for n in counts:
        stages = run_stages(args.out / f"images-{n}", settings(n, layers), env)
        results["images"].append({"n_images": n, "n_layers": len(layers), "stages": stages})
        print(f"images {n}: " + ", ".join(f"{s} {stages[s]['seconds']:.1f} s" for s in STAGES), flush=True)
    n0 = counts[0]
    if not args.no_layer_sweep:
        for top in range(1, len(layers)):
            stages = run_stages(args.out / f"layers-{top}", settings(n0, layers[-top:]), env)
            results["layers"].append({"n_layers": top, "n_images": n0, "stages": stages})
        results["layers"].append(next({**r, "n_layers": len(layers)} for r in results["images"] if r["n_images"] == n0))
    for k in [int(k) for k in args.concepts.split(",") if k]:
        stages = run_stages(args.out / f"concepts-{k}", settings(n0, layers, max_concepts=k), env)
        results["concepts"].append({"max_concepts": k, "n_images": n0, "stages": stages})

    print(
        f"\n{args.model} on {args.device}, settings {extra or 'default'}; seconds and peak RSS per stage "
        "(each stage its own process)\n"
    )
    print(table(results["images"], "n_images", "images"))
    if args.device.startswith("cuda"):
        print("CUDA peak per stage:\n" + cuda_table(results["images"], "n_images"))
    if results["layers"]:
        print(f"\nlayers (top L of {len(layers)}), {n0} images\n" + table(results["layers"], "n_layers", "layers"))
    if results["concepts"]:
        print(f"\nmax_concepts, {n0} images\n" + table(results["concepts"], "max_concepts", "max concepts"))

    lines = {}
    for s in STAGES:
        xs = [r["n_images"] for r in results["images"]]
        lines[s] = fit_line(xs, [r["stages"][s]["seconds"] for r in results["images"]])
    results["lines"] = {s: {"fixed_s": f, "per_image_s": b} for s, (f, b) in lines.items()}
    per_eval = [
        r["stages"]["attribute"]["seconds"] / max(r["stages"]["attribute"]["evaluations_total"] or 1, 1)
        for r in results["images"]
    ]
    results["attribute_s_per_evaluation"] = per_eval
    print(
        "\nper-image cost (least squares over the images sweep): "
        + ", ".join(f"{s} {b * 1e3:.1f} ms/image + {f:.1f} s" for s, (f, b) in lines.items())
    )
    print("attribute seconds per GIG evaluation: " + ", ".join(f"{v * 1e3:.2f} ms" for v in per_eval))
    projection = {}
    bent = [s for s, (f, b) in lines.items() if f < -0.05 * max(r["stages"][s]["seconds"] for r in results["images"])]
    if bent:  # a negative fixed cost: the stage is not linear over these counts (e.g. the
        # decompose stage's sparsity front grows with the images up to front_images)
        print(
            f"no projection: {', '.join(bent)} not linear in the images over {counts} "
            "(negative fixed cost); measure at more images"
        )
    for g in [] if bent else [int(g) for g in args.gpus.split(",")]:
        speed = g * args.efficiency if g > 1 else 1.0
        stage_s = {s: f + b * args.project / (speed if s in SHARDED else 1.0) for s, (f, b) in lines.items()}
        projection[g] = stage_s
        print(
            f"PROJECTION (not a measurement) for {args.project} images on {g} device(s)"
            f"{f' at {args.efficiency:.0%} parallel efficiency' if g > 1 else ''}: "
            + ", ".join(f"{s} {v / 3600:.2f} h" for s, v in stage_s.items())
            + f"; total {sum(stage_s.values()) / 3600:.2f} h"
        )
    results["projection"] = {"n_images": args.project, "efficiency": args.efficiency, "seconds": projection}
    results["seconds"] = time.perf_counter() - start
    (args.out / "scaling.json").write_text(json.dumps(results, indent=1))
    print(f"\n{results['seconds']:.0f} s in all; results in {args.out / 'scaling.json'}")


if __name__ == "__main__":
    main()
