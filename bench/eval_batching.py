"""Batched deletion/insertion (one wide ``run_from`` per image) against one forward per step.

    /work/venv/bin/python bench/eval_batching.py [--layer _blocks.8] [--images 2] [--concepts 320]

Both give the same curves (checked); the batched form shares the network before the layer and
runs the 42 steps of an image (21 deletion + 21 insertion) in a few wide forwards.
"""

from __future__ import annotations

import argparse
import time

import torch

from gig.evaluation import class_probability, deletion_insertion, step_counts, step_outputs
from gig.hooks import ModelHandle
from gig.images import EmbeddedSource
from gig.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", default="_blocks.8")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--concepts", type=int, default=320)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_model("efficientnet-lite0")
    handle = ModelHandle(bundle)
    source = EmbeddedSource()
    pixels = torch.stack([bundle.preprocess(source.load(r)) for r in source.records[: args.images]])
    with torch.no_grad():
        logits, grids = handle.capture(pixels, [args.layer])
    n, c, h, w = grids[args.layer].shape
    g = torch.Generator().manual_seed(0)
    V = torch.randn(args.concepts, c, generator=g) / c**0.5
    X = grids[args.layer].permute(0, 2, 3, 1).reshape(n, h * w, c)
    codes = X @ torch.linalg.pinv(V)  # least-squares codes: exact reconstruction
    orders = torch.stack([torch.randperm(args.concepts, generator=g) for _ in range(n)])[:, None]
    target = logits.argmax(1)
    readout = class_probability(target, target)

    t0 = time.perf_counter()
    batched = deletion_insertion(handle, args.layer, pixels, codes, V, orders, readout, grid_shape=(h, w))
    t_batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    naive = torch.zeros_like(batched)
    counts = step_counts(args.concepts)
    with torch.no_grad():
        for i in range(n):
            steps = step_outputs(codes[i], V, orders[i, 0], counts)  # (2, 21, P, C)
            for kind in range(2):
                for s in range(steps.shape[1]):
                    grid = steps[kind, s].T.reshape(1, c, h, w)
                    out = handle.run_from(pixels[i : i + 1], args.layer, grid)
                    one = class_probability(target[i : i + 1], target[i : i + 1])
                    naive[i, 0, kind, s] = one(out, torch.tensor([0]))[0]
    t_naive = time.perf_counter() - t0
    err = float((batched - naive).abs().max())
    print(f"layer {args.layer}, {n} images × 42 steps, K = {args.concepts}, torch threads {torch.get_num_threads()}")
    print(
        f"batched (wide run_from): {t_batched:.2f} s   one forward per step: {t_naive:.2f} s   "
        f"speed-up ×{t_naive / t_batched:.2f}   max |difference| {err:.2e}"
    )


if __name__ == "__main__":
    main()
