"""Parallel efficiency of torchrun on the CPU: the same run as 1 process of 1 thread, 1 process
of 2 threads, and 2 processes of 1 thread each (gloo), measured side by side on one machine.

    python bench/parallel_efficiency.py OUT_DIR [--images 32] [--shard 4] [--layers A,B] [--gig-tol 0.01]

Images: the first N photos of ../shared/data/imagenet-sample (else the 19 embedded photos);
default settings otherwise (EfficientNet-Lite0, four layers, gig_tol 0.01). Prints, per way, the
seconds of collect, decompose and attribute (from each run's manifest), their sum, the speed-up
over 1 process × 1 thread, and the parallel efficiency of 2 processes (speed-up / 2). Also
checks that the two-process run's tensors equal the one-process run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "imagenet-sample"

_RUN = """
import sys
import gig.collect, gig.decompose
from gig.config import Config
from gig.pipeline import Pipeline

gig.collect.SHARD_IMAGES = gig.decompose.SHARD_IMAGES = int(sys.argv[3])
layers = sys.argv[6].split(",") if sys.argv[6] else None
Pipeline(Config(images=sys.argv[2], max_images=int(sys.argv[4]), gig_tol=float(sys.argv[5]), layers=layers),
         sys.argv[1], progress=False).run(["collect", "concepts", "decompose", "attribute"])
"""
STAGES = ("collect", "decompose", "attribute")


def launch(
    out: Path, images: str, n: int, shard: int, processes: int, threads: int, tol: float, layers: str
) -> dict[str, float]:
    script = out.parent / "_run.py"
    script.write_text(_RUN)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    args = [str(script), str(out), images, str(shard), str(n), str(tol), layers]
    command = (
        [sys.executable, *args]
        if processes == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    )
    subprocess.run(command, check=True, env=env)
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    return {s: float(stages[s]["seconds"]) for s in STAGES}


def same_tensors(a: Path, b: Path) -> str:
    """ "equal", or the largest difference relative to a tensor's largest entry: a shard split by
    images across ranks (fewer shards than ranks) batches them differently, which moves floats by
    rounding."""
    import torch
    from safetensors.torch import load_file

    worst = 0.0
    for path in sorted(a.rglob("*.safetensors")):
        x, y = load_file(str(path)), load_file(str(b / path.relative_to(a)))
        if x.keys() != y.keys():
            return f"different keys in {path.relative_to(a)}"
        for k in x:
            if not torch.equal(x[k], y[k]):
                scale = float(x[k].abs().max().clamp_min(1e-30)) if x[k].is_floating_point() else 1.0
                worst = max(worst, float((x[k].double() - y[k].double()).abs().max()) / scale)
    return "equal" if worst == 0 else f"largest difference {worst:.2e} of a tensor's largest entry"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--shard", type=int, default=4, help="images per shard (the unit split across ranks)")
    parser.add_argument("--gig-tol", type=float, default=0.01)
    parser.add_argument("--layers", default="", help="comma-separated layers (default: the model's)")
    args = parser.parse_args()
    images = str(SAMPLE.resolve()) if SAMPLE.is_dir() else "embedded"
    args.out.mkdir(parents=True, exist_ok=True)
    ways = {"1 process x 1 thread": (1, 1), "1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}
    seconds = {}
    for name, (processes, threads) in ways.items():
        run = args.out / name.replace(" ", "")
        seconds[name] = launch(run, images, args.images, args.shard, processes, threads, args.gig_tol, args.layers)
    base = sum(seconds["1 process x 1 thread"].values())
    print(
        f"{args.images} photos from {images}, {args.shard} per shard, layers {args.layers or 'default'}, "
        f"gig_tol {args.gig_tol}"
    )
    print("| way | " + " | ".join(STAGES) + " | total s | speed-up |")
    print("|---|" + "---|" * (len(STAGES) + 2))
    for name, s in seconds.items():
        total = sum(s.values())
        print(f"| {name} | " + " | ".join(f"{s[k]:.1f}" for k in STAGES) + f" | {total:.1f} | {base / total:.2f}x |")
    two = base / sum(seconds["2 processes x 1 thread"].values())
    print(f"parallel efficiency of 2 processes: {two / 2:.0%}")
    print(
        "2-process tensors against 1-process:",
        same_tensors(args.out / "1processx1thread", args.out / "2processesx1thread"),
    )


if __name__ == "__main__":
    main()
