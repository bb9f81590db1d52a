"""Two evaluations of the same run's images, paired image by image: one method's rows in each.

    python bench/compare_coders.py A_DIR B_DIR [--method ours] [--names lasso,omp]

For two ``gig evaluate`` output folders of runs that share their collect stage (the same images,
so the same evaluation images for the same seed), e.g. one decomposed with ``coder: lasso`` and
one with ``coder: omp``: per layer, the concept-extraction AUC (insertion − deletion) of
``--method`` in A and in B with the paired difference B − A; per transition, the inter-layer AUC
of the GIG ordering likewise; and the reconstruction figures on the evaluation images. Spreads
and paired differences are :mod:`gig.evaluation.curves`' (bootstrap over images).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gig.evaluation.curves import fmt_spread, paired_difference, spread


def per_image(result: dict, key: str) -> list[float]:
    """``per_image[key]``; ``auc_diff`` as insertion − deletion where only those two are kept."""
    values = result["per_image"]
    if key in values:
        return values[key]
    return [i - d for i, d in zip(values["auc_insertion"], values["auc_deletion"])]


def paired(a: dict, b: dict, ids_a: list[int], ids_b: list[int], key: str) -> tuple[dict, dict, dict]:
    """Spreads of ``per_image[key]`` in ``a`` and ``b`` and of their difference, on the images
    both have (matched by image id)."""
    common = [i for i in ids_a if i in set(ids_b)]
    va, vb = ([per_image(x, key)[ids.index(i)] for i in common] for x, ids in ((a, ids_a), (b, ids_b)))
    return spread(va), spread(vb), paired_difference(vb, va)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--method", default="ours")
    parser.add_argument("--names", default="A,B", help="labels of the two folders, e.g. lasso,omp")
    args = parser.parse_args()
    name_a, name_b = args.names.split(",")
    ext_a, ext_b = (json.loads((d / "extraction.json").read_text()) for d in (args.a, args.b))
    print(
        f"concept extraction, {args.method}: AUC insertion − deletion (mean ± s.e. [95 % bootstrap]); "
        f"reconstruction l0 / R² / top-1 agreement on the evaluation images"
    )
    print(
        f"| layer | {name_a} | {name_b} | {name_b} − {name_a} (win rate) | {name_a} l0 / R² / agr. | "
        f"{name_b} l0 / R² / agr. |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for layer, methods in ext_a["layers"].items():
        if layer not in ext_b["layers"] or args.method not in methods:
            continue
        a, b = methods[args.method], ext_b["layers"][layer][args.method]
        sa, sb, d = paired(a, b, ext_a["image_id"], ext_b["image_id"], "auc_diff")
        rec = lambda r: f"{r['l0_ratio']:.3f} / {r['r2']:.3f} / {r['top1_agreement']:.3f}"  # noqa: E731
        print(
            f"| {layer} | {fmt_spread(sa)} | {fmt_spread(sb)} | {fmt_spread(d)} ({d['win_rate']:.2f}, "
            f"n {d['n']}) | {rec(a['reconstruction'])} | {rec(b['reconstruction'])} |"
        )
    inter_a, inter_b = (d / "interlayer.json" for d in (args.a, args.b))
    if inter_a.is_file() and inter_b.is_file():
        ia, ib = json.loads(inter_a.read_text()), json.loads(inter_b.read_text())
        print("\ninter-layer, GIG ordering: AUC insertion − deletion")
        print(f"| transition | {name_a} | {name_b} | {name_b} − {name_a} (win rate) |")
        print("| --- | --- | --- | --- |")
        for name, t in ia["transitions"].items():
            if name not in ib["transitions"]:
                continue
            sa, sb, d = paired(
                t["orderings"]["gig"],
                ib["transitions"][name]["orderings"]["gig"],
                ia["image_id"],
                ib["image_id"],
                "auc_diff",
            )
            print(
                f"| {name} | {fmt_spread(sa)} | {fmt_spread(sb)} | {fmt_spread(d)} ({d['win_rate']:.2f}, n {d['n']}) |"
            )


if __name__ == "__main__":
    main()
