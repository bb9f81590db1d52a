"""What one GIG evaluation costs, and two ways to make it cheaper that gig does not use.

    OMP_NUM_THREADS=1 python bench/gig_alternatives.py [--items 32] [--repeats 3]

On EfficientNet-Lite0 (the gradient copy: batch norms folded, channels-last) and one embedded
photo, for each default transition (``_blocks.4 → _blocks.8``, …, ``_blocks.15 → class``), with
``--items`` replacement grids of the lower layer per pass and 5 concept readouts of the upper
layer (seeded random directions; 1 class logit at the top), it times per item:

* the network before the lower layer, run once per image (what a blank stand-in saves);
* a forward pass from the layer, without gradients;
* a forward pass shared by the targets and one backward pass per target (what gig does);
* the rows replicated once per target, with one backward pass seeded per row;
* the same shared forward and per-target backward under bfloat16 autocast, and how far its
  gradient moves from the float32 one (relative L2).

Times are medians of ``--repeats`` passes after a warm-up; ratios are within this run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gig.hooks import ModelHandle
from gig.images import EmbeddedSource
from gig.models import load_model
from gig.readouts import ClassLogit, ConceptReadout

LAYERS = ["_blocks.4", "_blocks.8", "_blocks.11", "_blocks.15"]


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bundle = load_model("efficientnet-lite0")
    plain = ModelHandle(bundle)
    fast = plain.for_gradients(LAYERS)
    fast.stand_in_prefix = False  # time the real prefix; the stand-in is timed separately below
    source = EmbeddedSource()
    x = bundle.preprocess(source.load(source.records[0]))[None]
    with torch.no_grad():
        _, grids = fast.capture(x, LAYERS)
    generator = torch.Generator().manual_seed(0)
    m = args.items
    print(f"per item, {m} items a pass, {torch.get_num_threads()} thread(s); times in ms")
    print(
        "transition | prefix / image | forward only | shared fwd + T bwd | replicated rows | "
        "bf16 shared fwd + T bwd | bf16 gradient change"
    )
    for lower, upper in zip(LAYERS, LAYERS[1:] + [None]):
        grid = grids[lower].repeat(m, 1, 1, 1).contiguous(memory_format=fast.memory_format)
        if upper is None:
            readout, t = ClassLogit(), 1
        else:
            readout, t = ConceptReadout(upper, torch.randn(5, grids[upper].shape[1], generator=generator)), 5
        index = torch.arange(t)[None].repeat(m, 1)

        def forward(requires_grad: bool, bf16: bool = False):
            g = grid.clone().requires_grad_(requires_grad)
            with torch.set_grad_enabled(requires_grad), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                r = readout.values(fast.run_from(x, lower, g, read=readout.layer, counts=[m]).float(), index)
            return g, r

        def per_target(bf16: bool = False) -> torch.Tensor:
            g, r = forward(True, bf16)
            grads = []
            for j in range(t):
                seed = torch.zeros_like(r)
                seed[:, j] = 1
                grads.append(torch.autograd.grad(r, g, seed, retain_graph=j < t - 1)[0])
            return torch.stack(grads)

        def replicated() -> None:
            g = grid.repeat(t, 1, 1, 1).contiguous(memory_format=fast.memory_format).requires_grad_(True)
            out = fast.run_from(x, lower, g, read=readout.layer, counts=[m * t])
            r = readout.values(out, torch.arange(t).repeat_interleave(m)[:, None])
            torch.autograd.grad(r.sum(), g)

        def prefix() -> None:
            with torch.no_grad():
                fast.grid_until(x, lower)

        row = [
            timed(prefix, args.repeats) * 1e3,
            timed(lambda: forward(False), args.repeats) / m * 1e3,
            timed(per_target, args.repeats) / m * 1e3,
            timed(replicated, args.repeats) / m * 1e3,
            timed(lambda: per_target(True), args.repeats) / m * 1e3,
        ]
        full, half = per_target(), per_target(True)
        change = float((half - full).norm() / full.norm())
        print(f"{lower} → {upper or 'class'} | " + " | ".join(f"{v:.2f}" for v in row) + f" | {change:.3f}")
        print(
            f"   replicated / shared: {row[3] / row[2]:.2f}x; bf16 / float32: {row[4] / row[2]:.2f}x; "
            f"forward / (fwd + {t} bwd): {row[1] / row[2]:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
