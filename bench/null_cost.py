"""What the random directions of the edges' significance test cost the attribute stage.

    OMP_NUM_THREADS=1 python bench/null_cost.py RUN [--images 8] [--directions 16] [--repeats 2]

The GIG walk of the run's first ``--images`` images (its dictionaries, codes and settings), with
no random directions and with ``--directions`` per image, alternating, best of ``--repeats`` each,
one thread. Prints both times, their ratio, and how far the concepts' attributions and gradient
evaluations move (they should not: the directions ride along on the concepts' grids).

The directions ride on grids refined for the concepts, so their own quadrature error is not
controlled. ``--reference-steps N`` measures it: the first ``--reference-images`` images are walked
again on a fixed trapezoid grid of N intervals, and each random-direction mean (the test's
reference, ``LAYER/null`` and ``LAYER/class_null``) is compared with it where the walk has the
same target, as a share of the target's change ``Δg``: ``|ζ − ζ_ref| / |Δg|``, beside the size
of the reference itself, ``|ζ_ref| / |Δg|``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--directions", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference-steps", type=int, default=0)
    parser.add_argument("--reference-images", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from gig.access import RunAccess
    from gig.attribution import run_gig, walk
    from gig.collect import load_images
    from gig.decompose import CodeReader

    access = RunAccess(args.run)
    store, config = access.store, access.store.config
    layers = list(config.layers)
    images = load_images(store)["images"][: args.images]
    ids = [int(i["image_id"]) for i in images]
    targets = [int(i["target"]) for i in images]
    pixels = access.run_pixels(ids)
    fast = access.handle.for_gradients(layers)
    gigs = {layer: run_gig(store, fast, layer) for layer in layers}
    readers = {layer: CodeReader(store, layer) for layer in layers}

    def timed(directions: int) -> tuple[float, dict]:
        start = time.perf_counter()
        out = walk(pixels, ids, targets, layers, readers, gigs, config.top_k, null_directions=directions)
        return time.perf_counter() - start, out

    best = {0: float("inf"), args.directions: float("inf")}
    outs = {}
    for _ in range(args.repeats):
        for m in best:
            seconds, outs[m] = timed(m)
            best[m] = min(best[m], seconds)
    plain, tested = outs[0], outs[args.directions]
    gig_keys = [k for k in plain if k.endswith("/gig") or k.endswith("/class_gig")]
    moved = max(float(((tested[k] - plain[k]).abs() / plain[k].abs().amax().clamp_min(1e-12)).max()) for k in gig_keys)
    steps_same = all(torch.equal(plain[k], tested[k]) for k in plain if k.endswith("steps"))
    checked = {}
    if args.reference_steps:
        import dataclasses

        from gig.artefacts import decoder_bias
        from gig.attribution import gig_for
        from gig.concepts import load_dictionary

        fixed = dataclasses.replace(config, n_steps=args.reference_steps, quadrature="trapezoid")
        fine = {
            layer: gig_for(fast, layer, load_dictionary(store, layer), fixed, decoder_bias(store, layer))
            for layer in layers
        }
        m = args.reference_images
        ref = walk(
            pixels[:m], ids[:m], targets[:m], layers, readers, fine, config.top_k, null_directions=args.directions
        )
        checked = null_error(tested, ref, layers, m)
    print(
        json.dumps(
            {
                "images": len(ids),
                "seconds_without": round(best[0], 3),
                f"seconds_with_{args.directions}": round(best[args.directions], 3),
                "ratio": round(best[args.directions] / best[0], 4),
                "largest_change_of_concept_attributions_relative_to_largest": moved,
                "same_gradient_evaluations": steps_same,
                **checked,
            },
            indent=1,
        )
    )


def null_error(walked: dict, ref: dict, layers: list[str], m: int) -> dict:
    """``|ζ − ζ_ref| / |Δg|`` and ``|ζ_ref| / |Δg|`` over the first ``m`` images' paths whose
    target is the same in both walks (the class path always): p95 and max of each."""
    errors, sizes = [], []
    top = layers[-1]
    delta = ref[f"{top}/class_delta"][:m].abs().clamp_min(1e-12)
    errors.append((walked[f"{top}/class_null"][:m] - ref[f"{top}/class_null"]).abs() / delta)
    sizes.append(ref[f"{top}/class_null"].abs() / delta)
    for lower in layers[:-1]:
        same = walked[f"{lower}/targets"][:m] == ref[f"{lower}/targets"]
        delta = ref[f"{lower}/delta"].abs().clamp_min(1e-12)
        errors.append(((walked[f"{lower}/null"][:m] - ref[f"{lower}/null"]).abs() / delta)[same])
        sizes.append((ref[f"{lower}/null"].abs() / delta)[same])
    err, size = torch.cat(errors).double(), torch.cat(sizes).double()
    return {
        "reference_paths": int(err.numel()),
        "null_error_share_p95": float(err.quantile(0.95)),
        "null_error_share_max": float(err.max()),
        "null_size_share_median": float(size.median()),
        "null_size_share_p95": float(size.quantile(0.95)),
    }


if __name__ == "__main__":
    main()
