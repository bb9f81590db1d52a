"""The same layers given each basis kind in turn (``bases: {LAYER: KIND}``): collect, concepts and
decompose only, then each basis's fidelity over all images as the decompose stage measures it
(R², mean KL of the model's output with the layer replaced, top-1 agreement, share of latents
active) and its training figures.

    OMP_NUM_THREADS=1 python bench/basis_fidelity.py IMAGES OUT [--kinds sae sae-overcomplete sae-batchtopk]
        [--layers _blocks.11 _blocks.15] [--max-images 200] [--sae-steps 2000]

``IMAGES`` is an image folder or a CSV list (e.g. ``../shared/data/imagenet-sample/labels.csv``);
one run per kind in ``OUT/KIND``; the table is printed and written to ``OUT/basis_fidelity.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gig.artefacts import load_fidelity
from gig.config import Config
from gig.pipeline import Pipeline


def run_kind(images: str, out: Path, kind: str, layers: list[str], max_images: int, sae_steps: int) -> dict:
    bases = {layer: kind for layer in layers}
    config = Config(images=images, max_images=max_images, layers=layers, bases=bases, sae_steps=sae_steps)
    pipe = Pipeline(config, out / kind, progress=False)
    pipe.run(["collect", "concepts", "decompose"])
    summary = pipe.store.summary("concepts")
    return {layer: {**load_fidelity(pipe.store)[layer], "basis": summary[layer].get("basis", {})} for layer in layers}


def table(results: dict[str, dict]) -> str:
    lines = [
        "| layer | basis | K | R² | mean KL ± s.e. | top-1 agr. | active share | fit s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, layers in results.items():
        for layer, f in layers.items():
            lines.append(
                f"| {layer} | {kind} | {f['K']} | {f['r2']:.3f} | {f['kl']:.3f} ± {f['kl_se']:.3f} | "
                f"{f['top1_agreement']:.3f} | {f['l0_ratio']:.4f} | {f['basis'].get('fit_seconds', '-')} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images")
    parser.add_argument("out", type=Path)
    parser.add_argument("--kinds", nargs="+", default=["sae", "sae-overcomplete", "sae-batchtopk"])
    parser.add_argument("--layers", nargs="+", default=["_blocks.11", "_blocks.15"])
    parser.add_argument("--max-images", type=int, default=200)
    parser.add_argument("--sae-steps", type=int, default=2000, help="Adam steps of every SAE (the default's)")
    args = parser.parse_args()
    results = {
        kind: run_kind(args.images, args.out, kind, args.layers, args.max_images, args.sae_steps) for kind in args.kinds
    }
    text = table(results)
    print(text)
    (args.out / "basis_fidelity.md").write_text(text + "\n")
    (args.out / "basis_fidelity.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
