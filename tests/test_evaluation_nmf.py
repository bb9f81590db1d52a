"""NMF, the method added as one class in one file (``gig/evaluation/methods/nmf.py``): against
scikit-learn itself, and end to end on the ReLU outputs of a randomly initialised torchvision
ResNet-18 (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_nnls_optimal

from gig.config import Config
from gig.errors import InputError
from gig.evaluation import ConceptBasis, EvaluationSettings, basis_class, evaluate_run
from gig.evaluation.methods.nmf import NMFBasis
from gig.models import wrap_module
from gig.pipeline import Pipeline


def _non_negative(n: int = 300, c: int = 8, k: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.4)) @ torch.rand(k, c, generator=g)


def test_nmf_is_registered_and_round_trips(tmp_path):
    assert basis_class("nmf") is NMFBasis
    X = _non_negative()
    basis = NMFBasis(4, seed=0).fit(X)
    basis.save(tmp_path / "nmf.safetensors")
    back = ConceptBasis.load(tmp_path / "nmf.safetensors")
    assert type(back) is NMFBasis and torch.equal(back.transform(X), basis.transform(X))


def test_nmf_is_sklearn_nmf():
    from sklearn.decomposition import NMF

    X = _non_negative()
    basis = NMFBasis(4, seed=3).fit(X)
    ref = NMF(4, random_state=3, max_iter=400, tol=1e-4).fit(X.double().numpy())
    np.testing.assert_allclose(basis.components_.numpy(), ref.components_, rtol=1e-5, atol=1e-6)
    # the codes: exact NNLS (the optimality conditions hold), at least as good as NMF's own
    # coordinate-descent transform
    codes = basis.transform(X[:50])
    assert_nnls_optimal(basis.components_, X[:50], codes)
    loss = lambda Z: float(((X[:50].double() - torch.as_tensor(Z).double() @ basis.components_.double()) ** 2).sum())  # noqa: E731
    assert loss(codes) <= loss(ref.transform(X[:50].double().numpy())) * (1 + 1e-9)
    assert torch.all(basis.components_ >= 0) and torch.all(basis.transform(X) >= 0)
    with pytest.raises(InputError, match="non-negative"):
        basis.fit(X - 0.5)


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """Four embedded images through a ResNet-18 with random weights (no download), at 64 px:
    ``layer1`` and ``layer2`` end in a ReLU, so their outputs are non-negative."""
    import torchvision

    torch.manual_seed(0)
    bundle = wrap_module(torchvision.models.resnet18(weights=None), name="resnet18-random", input_size=64)
    out = tmp_path_factory.mktemp("resnet") / "run"
    config = Config(
        layers=["layer1", "layer2"],
        max_images=4,
        samples_per_image=8,
        min_cluster=4,
        n_steps=4,
        batch_size=4,
        internal_batch_size=32,
    )
    Pipeline(config, out, model=bundle, progress=False).run(["collect", "concepts", "decompose"])
    return out, bundle


def test_nmf_end_to_end_on_relu_outputs(resnet_run, tmp_path):
    run, bundle = resnet_run
    settings = EvaluationSettings(
        extraction_images=2,
        interlayer_images=2,
        methods=["ours", "nmf"],
        orderings=["gig", "random"],
        n_random=2,
        plots=False,
    )
    res = evaluate_run(run, settings, model=bundle, out=tmp_path / "ev", progress=False)
    for layer in ("layer1", "layer2"):
        assert set(res["summary"]["extraction"][layer]) == {"ours", "nmf"}
        entry = res["extraction"]["layers"][layer]["nmf"]
        assert entry["auc_diff"]["n"] == 2 and entry["reconstruction"]["r2"] > 0
        basis = ConceptBasis.load(tmp_path / "ev" / "bases" / layer / "nmf.safetensors")
        from gig.collect import load_samples
        from gig.store import RunStore

        X = load_samples(RunStore.open(run), layer)["pfv"].float()
        assert float(X.min()) >= 0  # ReLU outputs
        assert torch.all(basis.components_ >= 0) and torch.all(basis.transform(X) >= 0)
    assert set(res["summary"]["interlayer"]["layer1->layer2"]) == {"gig", "random"}
