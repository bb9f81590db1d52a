"""What makes GIG's concept → concept integrands rough: the readout's argmax or the ReLU units?

    OMP_NUM_THREADS=1 python bench/argmax_switches.py RUN OUT.json [--images 2] [--intervals 1024]

For the run's first ``--images`` walked images and every concept → concept transition, the walk's
own targets (``LOWER/targets`` of the attribute shards) are followed along the path on a uniform
grid of ``--intervals`` steps: the integrand ``F (nodes, K)`` (``GIG.uniform_integrand``) and,
from forward passes alone, the position where each target's readout ``max_p ⟨x_p, v⟩/‖v‖`` takes
its maximum. Per path: how often that argmax moves, the integrand's total variation against the
attribution's norm, the share of that variation in the steps where the argmax moved, and in how
many steps the integrand changes at all (a piecewise-constant integrand with fewer pieces than
steps would leave some unchanged).

Two ideas for fewer evaluations depend on these numbers: placing the first cells where a cheap
forward scan finds the argmax switching (pays only if the switches carry much of the variation),
and integrating the pieces of a ReLU network exactly (pays only if a path has few pieces).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from gig.artefacts import load_attributions
from gig.method import GIG, quadrature

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gig_accuracy import WalkedRun  # noqa: E402


def argmax_positions(run: WalkedRun, pixels, lower: str, upper: str, recon, targets, alphas, chunk=64):
    """``(nodes, T)``: where each target's readout peaks at every ``α`` (forward passes only)."""
    V = run.V[upper]
    unit = (V / V.norm(dim=1, keepdim=True))[targets]  # (T, C_b)
    out = []
    with torch.no_grad():
        for lo in range(0, len(alphas), chunk):
            a = alphas[lo : lo + chunk]
            grid = (recon * a.view(-1, 1, 1, 1)).contiguous(memory_format=run.fast.memory_format)
            res = run.fast.run_from(pixels, lower, grid, read=upper, counts=torch.tensor([len(a)]))
            out.append(torch.einsum("mchw,tc->mthw", res, unit).flatten(2).argmax(-1))
    return torch.cat(out)


def study_path(F: torch.Tensor, arg: torch.Tensor) -> dict:
    """One path: ``F (nodes, K)`` float64 and its argmax ``(nodes,)``."""
    jumps = (F[1:] - F[:-1]).norm(dim=-1)
    moved = arg[1:] != arg[:-1]
    n = F.shape[0] - 1
    attribution = (F.sum(0) - 0.5 * (F[0] + F[-1])) / n  # the grid's trapezoid rule
    return {
        "argmax_switches": int(moved.sum()),
        "variation_over_norm": float(jumps.sum() / attribution.norm().clamp_min(1e-30)),
        "variation_share_at_switches": float(jumps[moved].sum() / jumps.sum().clamp_min(1e-30)),
        "steps_changing": int((jumps > 1e-6 * jumps.max()).sum()),
        "steps": n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--intervals", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = WalkedRun(args.run, 0, args.images)
    walked = load_attributions(run.store, image_ids=[i["image_id"] for i in run.used])
    row_of = {int(i): r for r, i in enumerate(walked["image_id"].tolist())}
    alphas = quadrature(args.intervals, "trapezoid")[0]
    paths = []
    for batch in run.batches(1):
        image_id = batch.records[0].image_id
        for lower, upper in zip(run.layers[:-1], run.layers[1:]):
            targets = walked[f"{lower}/targets"][row_of[image_id]].long()
            codes = run.readers[lower].codes(image_id)[None].float()
            gig = GIG(run.fast, lower, run.V[lower], internal_batch_size=64)
            recon = (codes[0] @ run.V[lower]).T.reshape(1, -1, *gig.grid_shape(batch.pixels))
            arg = argmax_positions(run, batch.pixels, lower, upper, recon, targets, alphas)
            F, _ = gig.uniform_integrand(
                batch.pixels, codes, targets[None], args.intervals, read_layer=upper, read_vectors=run.V[upper]
            )
            for j, t in enumerate(targets.tolist()):
                row = {"image_id": image_id, "kind": f"{lower}->{upper}", "target": t}
                row.update(study_path(F[0, :, j].double(), arg[:, j]))
                paths.append(row)
                print(json.dumps(row), flush=True)
    share = np.array([p["variation_share_at_switches"] for p in paths])
    summary = {
        "paths": len(paths),
        "argmax_switches_mean": float(np.mean([p["argmax_switches"] for p in paths])),
        "variation_share_at_switches_p50_p95_max": [
            float(np.median(share)),
            float(np.quantile(share, 0.95)),
            float(share.max()),
        ],
        "steps_changing_min": min(p["steps_changing"] for p in paths),
        "steps": args.intervals,
    }
    print(json.dumps(summary))
    args.out.write_text(json.dumps({"run": str(args.run), "summary": summary, "paths": paths}, indent=1))


if __name__ == "__main__":
    main()
