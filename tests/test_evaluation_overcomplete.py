"""Overcomplete's TopK SAE, the default ``sae`` (optional extra: its fit is skipped without the package)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from gig.errors import InputError
from gig.evaluation import ConceptBasis, EvaluationSettings, basis_class
from gig.evaluation.methods.overcomplete_sae import OvercompleteTopKSAE
from gig.evaluation.settings import METHODS, default_methods

needs_overcomplete = pytest.mark.skipif(
    importlib.util.find_spec("overcomplete") is None, reason="optional extra: pip install 'gig[overcomplete]'"
)


def _data(n: int = 400, c: int = 8, k: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.rand(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.2)
    return codes @ torch.randn(k, c, generator=g)


def test_missing_package_is_named_and_the_hand_written_sae_stands_in(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert "pip install 'gig[overcomplete]'" in OvercompleteTopKSAE.problem()
    with pytest.raises(ValueError, match=r"sae \(Overcomplete's TopK SAE\) needs the optional package"):
        EvaluationSettings(methods=["sae"])
    assert default_methods() == ["ours", "dictionary", "sae-torch", "kmeans"]
    assert EvaluationSettings().methods == default_methods()
    with pytest.raises(InputError, match="overcomplete"):
        OvercompleteTopKSAE(4, k=2).fit(_data())


@needs_overcomplete
def test_overcomplete_topk_sae_contract(tmp_path):
    assert basis_class("sae") is OvercompleteTopKSAE and default_methods() == list(METHODS)
    X = _data()
    state = torch.random.get_rng_state()
    basis = OvercompleteTopKSAE(12, k=3, seed=0, steps=60).fit(X)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded inside, the global generator untouched
    U = basis.transform(X)
    assert U.shape == (400, 12) and torch.all(U >= 0) and torch.all((U != 0).sum(1) <= 3)
    torch.testing.assert_close(basis.components_.norm(dim=1), torch.ones(12), atol=1e-5, rtol=0)
    # codes are in the data's units: the reconstruction is codes @ components_, no bias
    rel = float((U @ basis.components_ - X).norm() / X.norm())
    assert rel == pytest.approx(basis.info_["train_rel_error"], rel=1e-5) and rel < 1
    again = OvercompleteTopKSAE(12, k=3, seed=0, steps=60).fit(X)
    assert torch.equal(again.components_, basis.components_)  # seeded
    basis.save(tmp_path / "oc.safetensors")
    back = ConceptBasis.load(tmp_path / "oc.safetensors")
    assert type(back) is OvercompleteTopKSAE and torch.equal(back.transform(X), U)
