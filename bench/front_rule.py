"""The λ rule on a run's own images: the front's choice against the same λ on held-out images.

    OMP_NUM_THREADS=1 python bench/front_rule.py RUN [--front-images 32] [--held-out 256]
        [--max-kl 0.1 ...] [--coder lasso|omp] [--layer L ...] [--json OUT]

For each layer of a run with concepts: the sparsity–fidelity front is measured on
``--front-images`` images (the stage's own seeded choice) under the rule with the smallest
``--max-kl`` given (so the walk goes densest), then every point of it is coded again on
``--held-out`` other images of the run and measured there: R², l0 ratio, top-1 agreement and mean
KL (nats) of the model's output with the layer replaced. For each ``--max-kl`` the rule is then
applied to the front's figures (what the stage would pick) and to the held-out ones (what many
images would pick), and the held-out figures at the front's choice are printed with the front's
bootstrap stability. This is what the default ``max_kl`` was chosen from (docs/guide.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from gig.collect import load_images
from gig.concepts import load_dictionary
from gig.decompose import (
    FrontImages,
    assess_front,
    code_front_point,
    encoder_for,
    image_moments,
    load_front_images,
    meets_rule,
    output_fidelity,
    sparsity_front,
)
from gig.hooks import ModelHandle
from gig.images import open_source
from gig.models import load_model
from gig.store import RunStore


def held_out_images(source, records, preds, handle, layers, config, front_ids: set[int], n: int) -> FrontImages:
    """``n`` images of the run outside the front's, in a seeded order."""
    g = torch.Generator().manual_seed(config.seed + 1)
    rest = [i for i in torch.randperm(len(records), generator=g).tolist() if records[i].image_id not in front_ids][:n]
    rest.sort()
    return load_front_images(
        source,
        [records[i] for i in rest],
        preds[rest],
        handle,
        layers,
        dataclasses.replace(config, front_images=len(rest)),
    )


def held_out_point(encoder, images: FrontImages, layer: str, handle: ModelHandle) -> dict:
    point, _, recons = code_front_point(encoder, images, layer)
    agree, kl = output_fidelity(images, layer, handle, [recons])
    return {
        **point,
        "_agree": agree[0],
        "_kl": kl[0],
        "top1_agreement": float(agree[0].double().mean()),
        "kl": float(kl[0].mean()),
    }


def sparsest_meeting(points: list[dict], config) -> dict | None:
    return next((p for p in points if p["r2"] >= config.min_r2 and p["kl"] <= config.max_kl), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--front-images", type=int, default=None)
    ap.add_argument("--held-out", type=int, default=256)
    ap.add_argument("--max-kl", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--coder", default=None)
    ap.add_argument("--layer", action="append", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    store = RunStore.open(args.run)
    changes = {"max_kl": min(args.max_kl)}
    if args.front_images:
        changes["front_images"] = args.front_images
    if args.coder:
        changes["coder"] = args.coder
    config = dataclasses.replace(store.config, **changes)
    layers = args.layer or config.layers
    bundle = load_model(config.model, config.weights)
    handle = ModelHandle(bundle)
    source = open_source(config.images, class_index=bundle.class_index if bundle.class_names else None)
    used = load_images(store)["images"]
    by_id = {r.image_id: r for r in source.records}
    records = [by_id[i["image_id"]] for i in used]
    preds = torch.tensor([i["pred"] for i in used])
    front_imgs = load_front_images(source, records, preds, handle, layers, config)
    g = torch.Generator().manual_seed(config.seed)
    front_ids = {records[i].image_id for i in torch.randperm(len(records), generator=g)[: config.front_images].tolist()}
    held = held_out_images(source, records, preds, handle, layers, config, front_ids, args.held_out)
    report = {
        "run": store.root.name,
        "coder": config.coder,
        "front_images": int(front_imgs.preds.numel()),
        "held_out": int(held.preds.numel()),
        "layers": {},
    }
    for layer in layers:
        V = load_dictionary(store, layer)
        front = sparsity_front(front_imgs, layer, V, handle, config)
        encoder = encoder_for(config, V, front["alpha"], handle.device)
        rows = []
        for p in front["points"]:
            h = held_out_point(encoder.with_alpha(p["alpha"]), held, layer, handle)
            h["meets"] = meets_rule(h, config)
            rows.append(
                {
                    "alpha": p["alpha"],
                    "front": {k: p[k] for k in ("r2", "l0_ratio", "top1_agreement", "kl", "kl_ci")},
                    "held": h,
                }
            )
        held_points = [r["held"] for r in rows]
        assess_front(
            held_points, image_moments(held.grids[layer]), dataclasses.replace(config, max_kl=min(args.max_kl))
        )
        for r in rows:
            r["held"] = {k: r["held"][k] for k in ("r2", "l0_ratio", "top1_agreement", "kl", "kl_ci")}
        layer_report = {"points": rows, "by_max_kl": {}}
        print(f"\n{layer}  (K {V.shape[0]}; front on {report['front_images']} images, held out {report['held_out']})")
        print(
            f"{'λ':>9} | {'front l0':>8} {'R²':>6} {'agr':>5} {'KL':>7} | {'held l0':>8} {'R²':>6} {'agr':>5} {'KL':>7} [95 %]"
        )
        for r in rows:
            f, h = r["front"], r["held"]
            print(
                f"{r['alpha']:9.4g} | {f['l0_ratio']:8.3f} {f['r2']:6.3f} {f['top1_agreement']:5.3f} {f['kl']:7.4f} | "
                f"{h['l0_ratio']:8.3f} {h['r2']:6.3f} {h['top1_agreement']:5.3f} {h['kl']:7.4f} "
                f"[{h['kl_ci'][0]:.4f}, {h['kl_ci'][1]:.4f}]"
            )
        for max_kl in args.max_kl:
            rule = dataclasses.replace(config, max_kl=max_kl)
            picked = sparsest_meeting([r["front"] | {"alpha": r["alpha"]} for r in rows], rule)
            oracle = sparsest_meeting([r["held"] | {"alpha": r["alpha"]} for r in rows], rule)
            at = next((r["held"] for r in rows if picked and r["alpha"] == picked["alpha"]), None)
            again = sparsity_front(front_imgs, layer, V, handle, rule) if max_kl != min(args.max_kl) else front
            layer_report["by_max_kl"][str(max_kl)] = {
                "front_alpha": picked and picked["alpha"],
                "held_alpha": oracle and oracle["alpha"],
                "held_at_choice": at,
                "stability": again["stability"],
                "decided": again["decided"],
            }
            if at:
                print(
                    f"max_kl {max_kl}: front picks λ {picked['alpha']:.4g} (l0 {picked['l0_ratio']:.3f}); held out there: "
                    f"l0 {at['l0_ratio']:.3f} R² {at['r2']:.3f} agreement {at['top1_agreement']:.3f} KL {at['kl']:.4f}; "
                    f"held-out choice λ {oracle['alpha'] if oracle else float('nan'):.4g}; stability {again['stability']}, "
                    f"decided {again['decided']}"
                )
            else:
                print(f"max_kl {max_kl}: no point of the front meets it")
        report["layers"][layer] = layer_report
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
