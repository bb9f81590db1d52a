"""A layer's concept basis with its own encoder (gig.basis): a TopK SAE trained by the concepts
stage, a user basis file with a decoder bias, and what is refused before compute."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_nnls_optimal

from gig.artefacts import load_basis
from gig.basis import BasisEncoder
from gig.config import Config
from gig.errors import ConfigError, InputError
from gig.store import RunStore, load_json, save_tensors

LAYERS = ["_blocks.8", "_blocks.15"]


def _config(**kw) -> Config:
    return Config(
        images="embedded",
        max_images=6,
        layers=list(LAYERS),
        top_k=3,
        samples_per_image=16,
        gig_tol=0.02,
        null_directions=4,
        **kw,
    )


def _run(tmp_path, lite0, name: str, **kw) -> RunStore:
    from gig.pipeline import Pipeline

    Pipeline(_config(**kw), tmp_path / name, model=lite0, progress=False).run()
    return RunStore.open(tmp_path / name)


def _layer_grid(lite0, store: RunStore, layer: str, image_id: int) -> torch.Tensor:
    """The layer's PFVs ``(H·W, C)`` of one run image, captured again (independently of the stage)."""
    from gig.access import RunAccess
    from gig.hooks import ModelHandle

    pixels = RunAccess(store, model=lite0).run_pixels([image_id])
    with torch.no_grad():
        _, grids = ModelHandle(lite0).capture(pixels, [layer])
    return grids[layer][0].flatten(1).T


def test_sae_basis_codes_come_from_its_encoder_and_attributions_are_complete(tmp_path, lite0):
    from gig.decompose import CodeReader

    store = _run(tmp_path, lite0, "sae", bases={"_blocks.15": "sae"}, sae_k=6, sae_steps=300)
    basis = load_basis(store, "_blocks.15")
    assert basis is not None and basis.kind == "sae" and basis.k == 6 and basis.bias is None
    assert load_basis(store, "_blocks.8") is None  # k-means below
    # the stored codes are the SAE encoder's on the layer's PFVs, captured again here
    X = _layer_grid(lite0, store, "_blocks.15", 0)
    stored = CodeReader(store, "_blocks.15").codes(0)
    torch.testing.assert_close(stored, basis.encode(X), rtol=1e-4, atol=1e-5)
    assert int((stored != 0).sum(1).max()) <= 6
    # no λ and no front for the basis layer; its fidelity over all images is reported
    fidelity = load_json(store.root / "decompose" / "fidelity.json")["_blocks.15"]
    assert fidelity["basis"] == "sae" and fidelity["alpha"] is None and 0 < fidelity["r2"] <= 1
    assert "_blocks.15" not in load_json(store.root / "decompose" / "front.json")
    assert "_blocks.8" in load_json(store.root / "decompose" / "front.json")
    assert store.summary("concepts")["_blocks.15"]["basis"]["k"] == 6
    # inspect names the basis and measures it against the λ rule it is not stepped by
    from gig.summary import summarize

    info = summarize(store.root)
    layer = next(entry for entry in info["layers"] if entry["name"] == "_blocks.15")
    assert layer["basis"] == "sae"
    assert info["edge_tests"]  # 4 random directions per image: the graphs' edges are tested
    for name, counts in info["edge_tests"].items():
        edges = load_json(store.root / "graph" / f"{name}.json")["edges"]
        assert counts["edges"] == len(edges)
        assert counts["beats_random"] == sum(bool(e.get("beats_random")) for e in edges) <= counts["significant"]
    misses = [line for line in info["missed"] if "sae basis misses the fidelity rule" in line]
    assert bool(misses) == (
        fidelity["r2"] < 0.9
        or fidelity["kl"] - 1.96 * fidelity["kl_se"] > 0.02
        or fidelity["top1_agreement"]
        + 1.96 * (fidelity["top1_agreement"] * (1 - fidelity["top1_agreement"]) / fidelity["n_images"]) ** 0.5
        < 0.95
    )
    # completeness over both transitions, within the tolerance
    from gig.attribution import completeness_residuals

    assert float(completeness_residuals(store).quantile(0.95)) <= 0.02
    graph = load_json(next((store.root / "graph").glob("class_*.json")))
    assert any(n["layer"] == "_blocks.15" for n in graph["nodes"])


def _user_basis(path, channels: int, K: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(K, channels, generator=g)
    tensors = {
        "W_dec": W_dec,
        "W_enc": torch.linalg.pinv(W_dec),  # (C, K)
        "b_enc": torch.zeros(K),
        "b_dec": 0.3 * torch.randn(channels, generator=g),
    }
    save_tensors(path, tensors, metadata={"activation": "topk", "k": "8"})
    return tensors


def test_user_basis_with_a_decoder_bias_integrates_from_it(tmp_path, lite0):
    """A user basis with ``b_dec``: codes from its encoder, and every class attribution's output
    change is ``z(b + U V) − z(b)`` (the path's start is the zero-code reconstruction), computed
    here by running the model with the layer replaced."""
    from gig.decompose import CodeReader
    from gig.hooks import ModelHandle

    channels = 320  # Lite0's _blocks.15
    tensors = _user_basis(tmp_path / "basis.safetensors", channels)
    store = _run(tmp_path, lite0, "user", bases={"_blocks.15": str(tmp_path / "basis.safetensors")})
    basis = load_basis(store, "_blocks.15")
    torch.testing.assert_close(basis.bias, tensors["b_dec"])
    X = _layer_grid(lite0, store, "_blocks.15", 1)
    U = CodeReader(store, "_blocks.15").codes(1)
    torch.testing.assert_close(U, basis.encode(X), rtol=1e-4, atol=1e-5)
    from gig.access import RunAccess
    from gig.attribution import load_attributions

    data = load_attributions(store, ("class_delta", "class_residual"), [1])
    target = int(load_json(store.root / "collect" / "images.json")["images"][1]["target"])
    pixels = RunAccess(store, model=lite0).run_pixels([1])
    h = int(round(U.shape[0] ** 0.5))
    full = (U @ basis.V + basis.bias).T.reshape(1, channels, h, h)
    start = basis.bias.view(1, channels, 1, 1).expand_as(full).contiguous()
    handle = ModelHandle(lite0)
    with torch.no_grad():
        z = [float(handle.run_from(pixels, "_blocks.15", grid)[0, target]) for grid in (start, full)]
    assert float(data["_blocks.15/class_delta"][0]) == pytest.approx(z[1] - z[0], rel=1e-3, abs=1e-4)
    assert abs(float(data["_blocks.15/class_residual"][0])) <= 0.02 * abs(z[1] - z[0]) + 1e-5


def test_bases_that_do_not_fit_are_refused_before_compute(tmp_path, lite0):
    from gig.pipeline import Pipeline

    _user_basis(tmp_path / "wrong.safetensors", channels=100)
    with pytest.raises(InputError, match="does not fit a layer of 320 channels"):
        Pipeline(_config(bases={"_blocks.15": str(tmp_path / "wrong.safetensors")}), tmp_path / "r", model=lite0)
    assert not (tmp_path / "r" / "collect").exists()
    with pytest.raises(InputError, match="basis file not found"):
        Pipeline(_config(bases={"_blocks.15": str(tmp_path / "none.safetensors")}), tmp_path / "r2", model=lite0)
    with pytest.raises(ConfigError, match="bases"):
        _config(bases={"_blocks.15": "pca"})
    with pytest.raises(ConfigError, match="keys must be analysed layers"):
        _config(bases={"_blocks.3": "sae"})
    with pytest.raises(ConfigError, match="both name _blocks.15"):
        _config(bases={"_blocks.15": "sae"}, dictionaries={"_blocks.15": "channels"})
    with pytest.raises(ConfigError, match="sae_k"):
        _config(sae_k=0)


def test_a_basis_file_is_read_beside_its_config(tmp_path):
    import yaml

    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "run.yaml").write_text(yaml.safe_dump({"bases": {"_blocks.15": "b.safetensors", "_blocks.8": "sae"}}))
    config = Config.load(folder / "run.yaml")
    assert config.bases == {"_blocks.15": str((folder / "b.safetensors").resolve()), "_blocks.8": "sae"}


def test_topk_and_relu_encoders_match_their_formulas():
    g = torch.Generator().manual_seed(1)
    C, K = 5, 7
    W_dec, W_enc = torch.randn(K, C, generator=g), torch.randn(C, K, generator=g)
    b_enc, b_pre = torch.randn(K, generator=g), torch.randn(C, generator=g)
    X = torch.randn(30, C, generator=g)
    relu = BasisEncoder("file", W_dec, W_enc, b_enc, b_pre, None, None, 2.0)
    want = torch.relu((X / 2.0 - b_pre) @ W_enc + b_enc) * 2.0
    torch.testing.assert_close(relu.encode(X), want)
    topk = BasisEncoder("file", W_dec, W_enc, b_enc, b_pre, torch.ones(C), 2, 2.0)
    codes = topk.encode(X)
    for row, full in zip(codes, want):
        kept = full.topk(2).indices
        torch.testing.assert_close(row[kept], full[kept])
        assert int((row != 0).sum()) <= 2
    torch.testing.assert_close(topk.reconstruct(codes), codes @ W_dec + 1)


def test_the_sae_example_config_reads_as_documented():
    """docs/examples/sae-basis.yaml: SAE bases at Lite0's last two layers, k-means below."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "sae-basis.yaml"
    config = Config.load(example)
    assert config.bases == {"_blocks.11": "sae", "_blocks.15": "sae"}
    assert config.layers[:2] == ["_blocks.4", "_blocks.8"] and config.images == "embedded"


def test_overcomplete_sae_is_read_as_a_basis_exactly(tmp_path, lite0, monkeypatch):
    """``sae-overcomplete``: Overcomplete's TopK SAE (the evaluation's ``sae``) read as a basis
    codes exactly as Overcomplete does; without the package a run naming it is refused before
    any image is read."""
    from gig.evaluation.methods.overcomplete_sae import OvercompleteTopKSAE
    from gig.pipeline import Pipeline

    if OvercompleteTopKSAE.problem() is None:
        from gig.concepts import fit_overcomplete_sae

        X = torch.randn(600, 12, generator=torch.Generator().manual_seed(0))
        basis, info = fit_overcomplete_sae(X, 24, 4, seed=0, steps=100)
        reference = OvercompleteTopKSAE(n_components=24, k=4, seed=0, steps=100).fit(X)
        assert torch.equal(basis.encode(X), reference.transform(X))
        torch.testing.assert_close(basis.V, reference.components_)
        assert basis.k == 4 and basis.bias is None and info["kind"].startswith("Overcomplete")
    monkeypatch.setattr(OvercompleteTopKSAE, "problem", classmethod(lambda cls: "pip install 'gig[overcomplete]'"))
    with pytest.raises(InputError, match="sae-overcomplete.*gig\\[overcomplete\\]"):
        Pipeline(_config(bases={"_blocks.15": "sae-overcomplete"}), tmp_path / "r", model=lite0)
    assert not (tmp_path / "r" / "collect").exists()


# ------------------------------------------------------------------------------ nmf / nnls
class _BiasFreeSignedTop(torch.nn.Module):
    """stem → block1 (post-ReLU) → block2, a bare bias-free convolution: zero on the blank dummy
    image (nothing refuses ``nmf`` there before compute) but signed on real images."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), torch.nn.ReLU())
        self.block1 = torch.nn.Sequential(torch.nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), torch.nn.ReLU())
        self.block2 = torch.nn.Conv2d(12, 16, 3, stride=2, padding=1, bias=False)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x))).mean((2, 3)))


def test_nnls_basis_file_codes_by_non_negative_least_squares(tmp_path):
    """``activation: nnls``: codes meet the optimality conditions of non-negative least squares
    on every row (the constraint binding on some), rebuilt as ``codes @ W_dec``; the basis round-trips through a run's file;
    negative inputs and files NNLS cannot use are refused."""
    from types import SimpleNamespace

    from gig.basis import read_basis_file
    from gig.concepts import save_basis

    g = torch.Generator().manual_seed(2)
    K, C = 6, 10
    W_dec = torch.rand(K, C, generator=g)
    X = torch.cat([torch.rand(3000, C, generator=g) * 2, torch.zeros(1, C)])
    save_tensors(tmp_path / "nmf.safetensors", {"W_dec": W_dec}, metadata={"activation": "nnls"})
    basis = read_basis_file(tmp_path / "nmf.safetensors", C)
    assert basis.activation == "nnls" and basis.bias is None and basis.W_enc is None
    codes = basis.encode(X)
    assert bool((codes == 0).any()) and bool((codes > 0).any())  # the constraint binds on some entries
    assert_nnls_optimal(W_dec, X, codes)
    torch.testing.assert_close(basis.reconstruct(codes), codes @ W_dec)
    store = SimpleNamespace(root=tmp_path / "run")
    (tmp_path / "run" / "concepts").mkdir(parents=True)
    save_basis(store, "L", basis)
    again = load_basis(store, "L")
    assert again.activation == "nnls" and torch.equal(again.V, W_dec)
    torch.testing.assert_close(again.encode(X[:50]), codes[:50])
    with pytest.raises(InputError, match="NMF/nnls codes\\) needs non-negative activations"):
        basis.encode(X - 0.5)
    for name, tensors, metadata, match in [
        ("neg", {"W_dec": W_dec - 0.5}, {}, "non-negative W_dec"),
        ("bias", {"W_dec": W_dec, "b_dec": torch.ones(C)}, {}, "b_dec would be ignored"),
        ("scale", {"W_dec": W_dec}, {"scale": "2"}, "scale 2 would be ignored"),
        ("shape", {"W_dec": W_dec[:, :4]}, {}, "does not fit a layer of 10 channels"),
    ]:
        save_tensors(tmp_path / f"{name}.safetensors", tensors, metadata={"activation": "nnls", **metadata})
        with pytest.raises(InputError, match=match):
            read_basis_file(tmp_path / f"{name}.safetensors", C)


def test_nmf_basis_on_a_relu_layer_codes_by_nnls_and_attributions_are_complete(tmp_path, tiny_bundle):
    """``bases: {block2: nmf}`` on TinyNet, whose block2 ends in a ReLU: sklearn's NMF with the
    run's seed and k-means' K; stored codes are the NNLS codes of the layer's PFVs captured again;
    GIG over the NMF concepts is complete."""
    import warnings

    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    from gig.access import RunAccess
    from gig.attribution import completeness_residuals
    from gig.collect import load_samples
    from gig.decompose import CodeReader
    from gig.hooks import ModelHandle
    from gig.pipeline import Pipeline

    config = Config(
        layers=["block1", "block2"],
        bases={"block2": "nmf"},
        max_images=6,
        samples_per_image=8,
        min_cluster=2,
        n_steps=4,
        batch_size=6,
        internal_batch_size=32,
        top_k=2,
        seed=3,
    )
    Pipeline(config, tmp_path / "nmf", model=tiny_bundle, progress=False).run()
    store = RunStore.open(tmp_path / "nmf")
    basis = load_basis(store, "block2")
    assert basis.kind == "nmf" and basis.activation == "nnls" and basis.bias is None
    assert load_basis(store, "block1") is None
    samples = load_samples(store, "block2")["pfv"]
    # k-means' K (8 concepts per channel, 2 members each: 24 here), capped at the 16 channels
    K = min(8 * 16, samples.shape[0] // 2, 16)
    assert K == 16 < samples.shape[0] // 2 and basis.V.shape[0] == K
    with warnings.catch_warnings():  # reaching max_iter, as the run's fit does
        warnings.simplefilter("ignore", ConvergenceWarning)
        reference = NMF(K, random_state=3, max_iter=400, tol=1e-4).fit(samples.double().numpy()).components_
    torch.testing.assert_close(basis.V.double(), torch.from_numpy(reference), rtol=1e-5, atol=1e-6)
    pixels = RunAccess(store, model=tiny_bundle).run_pixels([2])
    with torch.no_grad():
        _, grids = ModelHandle(tiny_bundle).capture(pixels, ["block2"])
    X = grids["block2"][0].flatten(1).T
    stored = CodeReader(store, "block2").codes(2)
    torch.testing.assert_close(stored, basis.encode(X), rtol=1e-4, atol=1e-5)
    assert_nnls_optimal(basis.V, X, stored)
    fidelity = load_json(store.root / "decompose" / "fidelity.json")["block2"]
    assert fidelity["basis"] == "nmf" and fidelity["alpha"] is None
    residuals = completeness_residuals(store, by_layer=True)
    assert float(residuals["block2->class"].quantile(0.95)) <= 0.02
    assert float(completeness_residuals(store).quantile(0.95)) <= 0.02
    graph = load_json(next((store.root / "graph").glob("class_*.json")))
    assert any(n["layer"] == "block2" for n in graph["nodes"])
    from gig.summary import missed_targets, summarize

    missed = missed_targets(store, summarize(store))  # K = C is the nmf basis's own cap, not a miss
    assert not any(m.startswith("block2: K =") for m in missed) and any(m.startswith("block1: K =") for m in missed)


def test_nmf_on_a_signed_layer_is_refused_naming_it(tmp_path, lite0):
    """Lite0's block outputs are signed: refused before any image is read (negative on the dummy
    image); a layer zero on the dummy but signed on images is refused by the concepts stage."""
    from gig.models import wrap_module
    from gig.pipeline import Pipeline

    with pytest.raises(InputError, match="bases: _blocks.15: nmf needs non-negative activations.*sae"):
        Pipeline(_config(bases={"_blocks.15": "nmf"}), tmp_path / "r", model=lite0)
    assert not (tmp_path / "r" / "collect").exists()
    bundle = wrap_module(_BiasFreeSignedTop(), "signed", input_size=32, class_names=list("abcd"))
    config = Config(layers=["block1", "block2"], bases={"block2": "nmf"}, max_images=4, samples_per_image=8)
    pipeline = Pipeline(config, tmp_path / "s", model=bundle, progress=False)
    with pytest.raises(InputError, match="bases: block2: nmf needs non-negative activations.*sae"):
        pipeline.run(["collect", "concepts"])
    assert Config(layers=["block2"], bases={"block2": "nmf"}).bases == {"block2": "nmf"}
    with pytest.raises(ConfigError, match="bases"):
        _config(bases={"_blocks.15": "nfm"})


def test_threshold_encoder_matches_its_formula_and_round_trips(tmp_path):
    """``activation: threshold`` (JumpReLU): ReLU, then every code below its latent's threshold 0."""
    g = torch.Generator().manual_seed(2)
    C, K = 6, 9
    tensors = {
        "W_dec": torch.randn(K, C, generator=g),
        "W_enc": torch.randn(C, K, generator=g),
        "b_enc": torch.randn(K, generator=g),
        "threshold": torch.rand(K, generator=g),
    }
    save_tensors(tmp_path / "jump.safetensors", tensors, metadata={"activation": "threshold"})
    from gig.basis import read_basis_file

    basis = read_basis_file(tmp_path / "jump.safetensors", C)
    X = torch.randn(50, C, generator=g)
    pre = torch.relu(X @ tensors["W_enc"] + tensors["b_enc"])
    want = torch.where(pre >= tensors["threshold"], pre, torch.zeros_like(pre))
    torch.testing.assert_close(basis.encode(X), want)
    assert basis.activation == "threshold" and int((want == 0).sum()) > int((pre == 0).sum())
    save_tensors(tmp_path / "again.safetensors", basis.tensors(), metadata=basis.metadata())
    torch.testing.assert_close(read_basis_file(tmp_path / "again.safetensors", C).encode(X), want)
    del tensors["threshold"]
    save_tensors(tmp_path / "none.safetensors", tensors, metadata={"activation": "threshold"})
    with pytest.raises(InputError, match="needs a tensor threshold"):
        read_basis_file(tmp_path / "none.safetensors", C)


def test_overcomplete_batchtopk_sae_is_read_as_a_threshold_basis_exactly():
    """``sae-batchtopk``: the basis codes bit for bit as Overcomplete's BatchTopK SAE in eval mode
    (its running threshold), about ``k`` codes per PFV on average."""
    from gig.evaluation.methods.overcomplete_sae import OvercompleteBatchTopKSAE

    if OvercompleteBatchTopKSAE.problem() is not None:
        pytest.skip("overcomplete is not installed")
    from gig.concepts import fit_overcomplete_sae

    X = torch.randn(900, 12, generator=torch.Generator().manual_seed(0))
    basis, info = fit_overcomplete_sae(X, 24, 4, seed=0, steps=100, kind="sae-batchtopk")
    reference = OvercompleteBatchTopKSAE(n_components=24, k=4, seed=0, steps=100).fit(X)
    with torch.no_grad():
        _, z = reference.model_.encode(X / reference.scale_)
    assert torch.equal(basis.encode(X), z * reference.scale_)
    assert basis.activation == "threshold" and basis.k is None and info["threshold"] > 0
    assert 2 <= float((basis.encode(X) != 0).sum(1).float().mean()) <= 8
