"""Every walked path's GIG integrand on a fine uniform grid, saved for studies of quadrature rules.

    OMP_NUM_THREADS=1 python bench/gig_integrands.py RUN OUT_DIR [--images 8] [--skip 0] [--intervals 1024]

For the run's images (from ``--skip``), the graph is walked top-down as the attribute stage walks
it (concept → class at the last layer, then concept → concept for each layer's top-``k``
concepts by their flow to the class, with targets from the fine grid's own attributions). For
every path, at the ``intervals + 1`` nodes ``α = i / intervals``, it saves:

* ``F (nodes, K)``: the integrand projected on the source concepts,
  ``F[α, q] = Σ_p U[p, q] ⟨∂g(F(α X̃)) / ∂X̃_p, V_q⟩``, whose integral over α is the attribution;
* ``values (nodes,)``: the readout ``g(α X̃)`` (``Σ_q F = dg/dα``, a check of the pair).

One ``OUT_DIR/image_ID.safetensors`` per image, keys ``KIND/t`` (``KIND`` = ``LAYER->class`` or
``LOWER->UPPER``, ``t`` the target), so that any rule that evaluates the integrand at dyadic
nodes can be replayed without the model (``bench/quadrature_study.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from gig.method import GIG, quadrature

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gig_accuracy import WalkedRun  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--skip", type=int, default=0)
    parser.add_argument("--intervals", type=int, default=1024)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--internal-batch-size", type=int, default=64)
    args = parser.parse_args()

    walked = WalkedRun(args.run, args.skip, args.images)
    layers, fast, V, readers, target_of = walked.layers, walked.fast, walked.V, walked.readers, walked.target_of
    args.out.mkdir(parents=True, exist_ok=True)
    alphas = quadrature(args.intervals, "trapezoid")[1]
    for batch in walked.batches(1):
        image_id = batch.records[0].image_id
        path = args.out / f"image_{image_id}.safetensors"
        if path.is_file():
            continue
        start = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        importance = torch.ones(1, 1)
        targets = torch.tensor([[target_of[image_id]]])
        read: dict = {}
        for position in range(len(layers) - 1, -1, -1):
            layer = layers[position]
            kind = f"{layer}->class" if position == len(layers) - 1 else f"{layer}->{layers[position + 1]}"
            codes = readers[layer].codes(image_id)[None]
            gig = GIG(fast, layer, V[layer], internal_batch_size=args.internal_batch_size)
            F, values = gig.uniform_integrand(batch.pixels, codes, targets, args.intervals, **read)
            for j, t in enumerate(targets[0].tolist()):
                tensors[f"{kind}/{t}"] = F[0, :, j].contiguous()
                tensors[f"{kind}/{t}/values"] = values[0, :, j].contiguous()
            attributions = torch.einsum("s,nstk->ntk", alphas, F)
            delta = values[:, -1] - values[:, 0]
            share = attributions / torch.where(delta.abs() < 1e-8, torch.full_like(delta, 1e-8), delta)[..., None]
            score = (importance[..., None] * share).sum(1)
            top = score.topk(min(args.top_k, score.shape[1]), dim=1)
            importance, targets = top.values, top.indices
            read = {"read_layer": layer, "read_vectors": V[layer]}
        save_file(tensors, str(path))
        print(f"image {image_id}: {len(tensors) // 2} paths in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
