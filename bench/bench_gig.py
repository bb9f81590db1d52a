"""GIG throughput: gig's batched attribution against a hand-rolled per-image, per-target,
per-step loop (the Captum-style reference), measured in the same run on the same inputs.

    python bench/bench_gig.py [--images 2] [--steps 8] [--targets 3]

Prints both times, their ratio, and the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import time

import torch

from gig.hooks import ModelHandle
from gig.method import GIG, quadrature
from gig.models import load_model
from gig.readouts import concept_readout


def reference(handle, x, layer, read, codes, V, Vb, targets, n_steps):
    """One forward+backward of the whole network per (image, target, step)."""
    alphas, weights = quadrature(n_steps)
    out = torch.zeros(x.shape[0], targets.shape[1], V.shape[0])
    h = w = int(codes.shape[1] ** 0.5)
    for n in range(x.shape[0]):
        recon = (codes[n] @ V).T.reshape(1, -1, h, w)
        for j, t in enumerate(targets[n].tolist()):
            g_bar = torch.zeros_like(recon)
            for a, wt in zip(alphas.tolist(), weights.tolist()):
                grid = (recon * a).requires_grad_(True)
                y = handle.run_from(x[n : n + 1], layer, grid, read=read)
                (grad,) = torch.autograd.grad(concept_readout(y, Vb[t][None]).sum(), grid)
                g_bar += wt * grad
            g = g_bar[0].flatten(1).T  # (P, C)
            out[n, j] = (codes[n] * (g @ V.T)).sum(0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--targets", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    handle = ModelHandle(load_model("efficientnet-lite0"))
    layer, read = "_blocks.8", "_blocks.11"
    x = torch.randn(args.images, 3, 224, 224)
    _, grids = handle.capture(x, [layer])
    codes = grids[layer].flatten(2).transpose(1, 2)
    V = torch.eye(codes.shape[2])
    Vb = torch.randn(50, 192)
    targets = torch.randint(0, 50, (args.images, args.targets))

    start = time.perf_counter()
    ref = reference(handle, x, layer, read, codes, V, Vb, targets, args.steps)
    t_ref = time.perf_counter() - start

    gig = GIG(handle, layer, V, n_steps=args.steps, internal_batch_size=32)
    start = time.perf_counter()
    ours = gig.attribute(x, codes, targets, read_layer=read, read_vectors=Vb).attributions
    t_ours = time.perf_counter() - start

    items = args.images * args.targets * args.steps
    print(f"items (image x target x step): {items}")
    print(f"reference loop: {t_ref:.2f} s ({t_ref / items * 1000:.1f} ms/item)")
    print(f"gig batched:    {t_ours:.2f} s ({t_ours / items * 1000:.1f} ms/item)")
    print(f"speed-up: {t_ref / t_ours:.1f}x; max |difference|: {float((ref - ours).abs().max()):.2e}")


if __name__ == "__main__":
    main()
