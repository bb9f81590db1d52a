"""ERF maps with PFVs that read disjoint pixels packed into one backward pass, against one pass
per PFV, side by side: seconds for ``--pfvs`` PFVs of one image at random grid positions, and
the largest difference of the maps (relative to their largest value).

    OMP_NUM_THREADS=1 python bench/erf_packing.py [--pfvs 30]

Models: EfficientNet-Lite0 (``_blocks.4``) and a ResNet-50 with random weights (``layer1``,
``layer2``; no download), on a random 224² input, both through their batch-norm-folded copy as
the crops use them (``ModelHandle.measuring``).
"""

from __future__ import annotations

import argparse
import time

import torch

import gig.erf as erf
from gig.hooks import ModelHandle
from gig.models import load_model


def compare(handle: ModelHandle, layer: str, n: int, size: int = 224) -> str:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, size, size, generator=g)
    with torch.no_grad():
        side = handle.grid_until(pixels, layer).shape[-1]
    cells = torch.stack([torch.randint(0, side, (n,), generator=g), torch.randint(0, side, (n,), generator=g)], 1)
    index = torch.zeros(n, dtype=torch.long)
    erf.erf_maps(handle, pixels, layer, cells, image_index=index)  # measures and checks the boxes once
    start = time.perf_counter()
    packed = erf.erf_maps(handle, pixels, layer, cells, image_index=index)
    t_packed = time.perf_counter() - start
    measured = erf.receptive_fields
    erf.receptive_fields = lambda *a, **k: None  # one pass per PFV
    try:
        start = time.perf_counter()
        alone = erf.erf_maps(handle, pixels, layer, cells, image_index=index)
        t_alone = time.perf_counter() - start
    finally:
        erf.receptive_fields = measured
    diff = float((packed - alone).abs().max() / alone.abs().max())
    return f"{layer}: packed {t_packed:.2f} s, one pass per PFV {t_alone:.2f} s, {t_alone / t_packed:.2f}x, max diff {diff:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pfvs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lite0 = ModelHandle(load_model("efficientnet-lite0"))
    print("efficientnet-lite0", compare(lite0.measuring(["_blocks.4"]), "_blocks.4", args.pfvs))
    resnet = ModelHandle(load_model("torchvision:resnet50", weights="none"))
    for layer in ("layer1", "layer2"):
        print("resnet50 (random)", compare(resnet.measuring([layer]), layer, args.pfvs))


if __name__ == "__main__":
    main()
