"""The attribute stage with one backward pass per target (today's) against one vmapped backward
for all targets of a chunk (``torch.autograd.grad(..., is_grads_batched=True)``,
``gig.method.BATCHED_TARGETS``), side by side on copies of one run: seconds, and the largest
difference of the attributions relative to their largest value.

    OMP_NUM_THREADS=1 python bench/target_backward.py OUT [--images 3] [--repeat 2] [--device cuda]

The run is the default configuration (embedded photos, Lite0, four layers) on ``--images``
photos, made once up to the decompose stage; each variant runs the attribute stage on a copy of
it, alternating, ``--repeat`` times (the fastest counts).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

import gig.method as method
from gig.artefacts import load_attributions
from gig.config import Config
from gig.pipeline import Pipeline
from gig.store import RunStore


def attribute_copy(base: Path, out: Path, batched: bool) -> float:
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out)
    method.BATCHED_TARGETS = batched
    pipe = Pipeline.open(out)
    pipe.progress = False
    start = time.perf_counter()
    pipe.run(["attribute"])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where batching may pay")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = args.out / "base"
    if not (base / "decompose").is_dir():
        Pipeline(Config(images="embedded", max_images=args.images, device=args.device), base, progress=False).run(
            ["collect", "concepts", "decompose"]
        )
    seconds = {False: [], True: []}
    for _ in range(args.repeat):
        for batched in (False, True):
            seconds[batched].append(attribute_copy(base, args.out / f"batched_{batched}", batched))
    a = load_attributions(RunStore.open(args.out / "batched_False"))
    b = load_attributions(RunStore.open(args.out / "batched_True"))
    floats = [k for k in a if k in b and a[k].is_floating_point() and a[k].numel()]
    diff = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in floats)
    one, many = min(seconds[False]), min(seconds[True])
    print(
        f"one backward per target {one:.1f} s, one vmapped backward {many:.1f} s: {one / many:.2f}x; max diff {diff:.1e}"
    )
    print(f"all seconds: per target {seconds[False]}, vmapped {seconds[True]}")


if __name__ == "__main__":
    main()
