"""Where the attribute stage's time goes: torch.profiler over the GIG walk of a few images.

    python bench/profile_attribute.py [--model efficientnet-lite0] [--images 16] [--device cuda]

Builds a small run from the embedded photos (collect, concepts, decompose), then profiles the
attribute stage and prints the operators with the most self time (CUDA time on a GPU), the
number of GIG gradient evaluations, and the stage's wall time per image.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--layer", action="append", default=None)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--internal-batch-size", type=int, default=256)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()

    from gig.config import Config
    from gig.pipeline import Pipeline

    work = Path(tempfile.mkdtemp(prefix="gig-profile-"))
    config = Config(
        model=args.model,
        weights=args.weights,
        max_images=args.images,
        device=args.device,
        internal_batch_size=args.internal_batch_size,
        samples_per_image=16,
        lasso_max_iter=100,
        **({"layers": args.layer} if args.layer else {}),
    )
    pipe = Pipeline(config, work / "run", progress=False)
    pipe.run(["collect", "concepts", "decompose"])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        pipe.attribute()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    summary = pipe.store.summary("attribute")["accuracy"]
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    print(
        f"attribute: {seconds:.1f} s for {args.images} images under the profiler "
        f"({seconds / args.images:.2f} s/image); GIG evaluations {summary['evaluations_total']} "
        f"(mean {summary['evaluations_mean']:.1f} per attribution)"
    )


if __name__ == "__main__":
    main()
