"""Does a strong GIG edge mean a strong ablation effect? Rank correlation per transition.

For each attributed image of a run and each transition of its GIG walk (``lower → upper`` and
``top → class``), lower concepts are removed one at a time from the reconstruction and the drop of
each upper target's readout (the class logit at the top) is compared with the GIG the walk
stored, by Spearman rank correlation, beside a random-ordering baseline
(:func:`gig.ablate.ablation_correlation`). Writes RUN/graph/ablation/correlation.json (+ the raw
pairs) and a copy under bench/results/, and prints the table.

    OMP_NUM_THREADS=1 python bench/ablation_correlation.py /tmp/abrun
    OMP_NUM_THREADS=1 python bench/ablation_correlation.py /work/runs/imagenet800 --max-images 64
    python bench/ablation_correlation.py RUN --all-active --device cuda   # every active concept
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from gig.ablate import ablation_correlation, correlation_path, open_run

RESULTS = Path(__file__).parent / "results"


def _fmt(v, spec: str = "+.3f") -> str:
    return "-" if v is None else format(v, spec)


def table(result: dict) -> str:
    """A Markdown table: per transition, GIG vs ablation against the random ordering."""
    lines = [
        "| transition | images | groups | concepts/group | ρ per target (mean ± sd) | random | ρ pooled | random "
        "| ρ edges (n) | random | sign agree | top-5 overlap (random) | Δ check | Σdrop/ΣGIG |",
        "| --- | " + " | ".join(["---:"] * 13) + " |",
    ]
    for name, t in result["transitions"].items():
        s, r, c = t["spearman"], t["random"], t["completeness"]
        lines.append(
            f"| {name} | {t['n_images']} | {t['n_targets']} | {t['concepts_per_target']:.1f} "
            f"| {_fmt(s['per_target']['mean'])} ± {_fmt(s['per_target']['sd'], '.3f')} "
            f"| {_fmt(r['per_target']['mean'])} ± {_fmt(r['per_target']['sd'], '.3f')} "
            f"| {_fmt(s['pooled'])} | {_fmt(r['pooled']['mean'])} ± {_fmt(r['pooled']['sd'], '.3f')} "
            f"| {_fmt(s['edges'])} ({s['n_edges']}) | {_fmt(r['edges']['mean'])} ± {_fmt(r['edges']['sd'], '.3f')} "
            f"| {_fmt(t['sign_agreement'], '.3f')} | {_fmt(t['top5_overlap'], '.2f')} ({_fmt(t['top5_overlap_random'], '.2f')}) "
            f"| {_fmt(c['delta_check_median'], '.1e')} | {_fmt(c['ablation_sum_ratio_median'], '.2f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--top-n", type=int, default=16, help="Active concepts with the largest |GIG| per image.")
    parser.add_argument("--others", type=int, default=16, help="Other active concepts drawn at random per image.")
    parser.add_argument("--all-active", action="store_true", help="Ablate every active concept instead.")
    parser.add_argument("--random-seeds", type=int, default=20)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tag", default=None, help="Name of the copy in bench/results/ (default: the run's name).")
    parser.add_argument("--no-save-run", action="store_true", help="Leave RUN/graph/ablation/ as it is (variants).")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = open_run(args.run, device=args.device)
    result = ablation_correlation(
        ctx,
        max_images=args.max_images,
        top_n=None if args.all_active else args.top_n,
        n_others=args.others,
        n_random=args.random_seeds,
        progress=True,
        save=not args.no_save_run,
    )
    result["machine"] = {
        "device": str(ctx.handle.device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if ctx.handle.device.type == "cuda" else None,
    }
    RESULTS.mkdir(exist_ok=True)
    tag = args.tag or args.run.resolve().name
    copy = RESULTS / f"ablation_correlation_{tag}.json"
    copy.write_text(json.dumps(result, indent=1))
    text = table(result)
    copy.with_suffix(".md").write_text(
        f"# GIG vs ablation: {args.run}\n\n{text}\n\n{result['n_images']} images, "
        f"selection {result['selection']}, {result['seconds']} s on "
        f"{result['machine']['device']}\n"
    )
    print(text)
    where = "" if args.no_save_run else f"{correlation_path(ctx.store)} and "
    print(f"\n{result['seconds']} s; wrote {where}{copy}", file=sys.stderr)


if __name__ == "__main__":
    main()
