"""Faithfulness evaluation: AUCs, batched deletion / insertion through the real network, planted
orderings, baselines, and the evaluate command's files (on a tiny conv net, so it runs in seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from gig.attribution import GIG
from gig.config import Config
from gig.evaluation import (
    EvaluationSettings,
    auc,
    class_probability,
    concept_value_readout,
    deletion_insertion,
    evaluate_run,
    grad_x_coef,
    rank_by_gig,
    reconstruction_figures,
    spread,
    step_counts,
    step_fractions,
    step_outputs,
)
from gig.evaluation.curves import paired_difference
from gig.evaluation.methods.kmeans import KMeansBasis, hard_codes
from gig.evaluation.methods.sae import train_sae
from gig.hooks import ModelHandle
from gig.models import wrap_module
from gig.pipeline import Pipeline
from gig.readouts import concept_readout
from gig.store import RunMismatchError, load_json


# ------------------------------------------------------------------------------ curves
def test_auc_matches_numpy_trapezoid():
    rng = np.random.default_rng(0)
    y = rng.random((3, 21))
    x = np.linspace(0, 1, 21)
    np.testing.assert_allclose(auc(y), np.trapezoid(y, x, axis=-1))
    # Uneven x (K not a multiple of 20): still the trapezoid rule over the true fractions.
    x7 = step_fractions(7)
    np.testing.assert_allclose(auc(y, x7), np.trapezoid(y, x7, axis=-1))
    assert step_counts(7)[0] == 0 and step_counts(7)[-1] == 7 and np.all(np.diff(step_counts(7)) >= 0)
    # Known areas: a constant, a line, and the step-count grid of K = 60.
    assert auc(np.full(21, 0.3)) == pytest.approx(0.3)
    assert auc(np.linspace(0, 1, 21)) == pytest.approx(0.5)
    np.testing.assert_array_equal(step_counts(60), np.arange(0, 61, 3))


def test_spread_standard_error_and_bootstrap():
    v = np.arange(10.0)
    s = spread(v, n_boot=4000, seed=1)
    assert s["mean"] == pytest.approx(4.5)
    assert s["se"] == pytest.approx(np.std(v, ddof=1) / np.sqrt(10))
    assert s["ci_low"] < 4.5 < s["ci_high"] and s["n"] == 10
    assert spread([np.nan, 1.0])["n_nan"] == 1
    d = paired_difference([1, 2, 3], [0, 0, 4])
    assert d["mean"] == pytest.approx(2 / 3) and d["win_rate"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------ step outputs
def test_step_outputs_match_masked_codes():
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(6, 13, generator=g), torch.randn(13, 5, generator=g)
    order = torch.randperm(13, generator=g)
    counts = step_counts(13, 5)
    out = step_outputs(U, V, order, counts)  # (2, 5, P, C)
    rank = torch.empty(13, dtype=torch.long)
    rank[order] = torch.arange(13)
    for i, m in enumerate(counts):
        keep = (rank >= int(m)).float()
        torch.testing.assert_close(out[0, i], (U * keep) @ V, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, i], (U * (1 - keep)) @ V, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[0, -1], torch.zeros(6, 5)) and torch.equal(out[1, 0], torch.zeros(6, 5))


class PooledLinear(nn.Module):
    """``feat`` (a patchifying conv) → mean over positions → linear head with class 0 fixed at 0,
    so that the class-1 logit is linear in the feature grid: ``z1 = ⟨w, mean_p x_p⟩``."""

    def __init__(self, channels: int = 6):
        super().__init__()
        torch.manual_seed(1)
        self.feat = nn.Conv2d(3, channels, 4, stride=4)
        self.post = nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            self.post.weight.copy_(torch.eye(channels)[:, :, None, None])
            self.post.bias.zero_()
        self.head = nn.Linear(channels, 2, bias=False)
        with torch.no_grad():
            self.head.weight[0].zero_()

    def forward(self, x):
        return self.head(self.post(self.feat(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def linear_case():
    handle = ModelHandle(wrap_module(PooledLinear(), "pooled-linear", input_size=16))
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    K, C, P = 12, 6, 16
    V = torch.randn(K, C, generator=g)
    codes = torch.rand(2, P, K, generator=g) * (torch.rand(2, P, K, generator=g) < 0.5)
    return handle, pixels, codes, V


def test_all_deleted_is_zero_code_and_all_inserted_is_full_reconstruction(linear_case):
    handle, pixels, codes, V = linear_case
    orders = torch.stack([torch.randperm(12, generator=torch.Generator().manual_seed(i)) for i in range(2)])[:, None]
    target = torch.tensor([1, 1])
    readout = class_probability(target, target)
    curves = deletion_insertion(handle, "feat", pixels, codes, V, orders, readout, n_points=7, batch_rows=14)
    recon = (codes @ V).transpose(1, 2).reshape(2, 6, 4, 4)
    with torch.no_grad():
        p_full = handle.run_from(pixels, "feat", recon).softmax(1)[:, 1]
        p_zero = handle.run_from(pixels, "feat", torch.zeros_like(recon)).softmax(1)[:, 1]
    c = curves[:, 0, :, :, 0]
    torch.testing.assert_close(c[:, 0, -1], p_zero)  # deletion of everything
    torch.testing.assert_close(c[:, 1, 0], p_zero)  # insertion of nothing
    torch.testing.assert_close(c[:, 0, 0], p_full, atol=1e-6, rtol=1e-5)  # deletion of nothing
    torch.testing.assert_close(c[:, 1, -1], p_full, atol=1e-6, rtol=1e-5)  # insertion of everything


def test_batching_does_not_change_curves(linear_case):
    handle, pixels, codes, V = linear_case
    orders = torch.stack(
        [
            torch.stack([torch.randperm(12, generator=torch.Generator().manual_seed(10 * i + j)) for j in range(3)])
            for i in range(2)
        ]
    )  # (2 images, 3 orders, K)
    readout = class_probability(torch.tensor([1, 0]), torch.tensor([1, 1]))
    one = deletion_insertion(handle, "feat", pixels, codes, V, orders, readout, n_points=5, batch_rows=10)
    many = deletion_insertion(handle, "feat", pixels, codes, V, orders, readout, n_points=5, batch_rows=1000)
    torch.testing.assert_close(one, many)
    # Each row is the image's own: the same codes, orders and readout one image at a time.
    solo = deletion_insertion(
        handle,
        "feat",
        pixels[1:],
        codes[1:],
        V,
        orders[1:],
        class_probability(torch.tensor([0]), torch.tensor([1])),
        n_points=5,
    )
    torch.testing.assert_close(many[1:], solo)


def test_planted_ordering_beats_random_and_gig_finds_it(linear_case):
    handle, pixels, codes, V = linear_case
    w = handle.model.head.weight[1].detach()
    contribution = codes.mean(1) * (V @ w)  # (N, K): each concept's exact share of the class-1 logit
    planted = torch.argsort(-contribution, dim=1)
    target = torch.tensor([1, 1])
    # GIG of a linear head is exact: it ranks the concepts in the planted order.
    orders, res = rank_by_gig(GIG(handle, "feat", V, n_steps=4), pixels, codes, target)
    torch.testing.assert_close(res.attributions[:, 0], contribution, atol=1e-5, rtol=1e-4)
    assert torch.equal(orders[:, 0], planted)
    rand = torch.stack(
        [
            torch.stack([torch.randperm(12, generator=torch.Generator().manual_seed(100 * i + j)) for j in range(20)])
            for i in range(2)
        ]
    )
    all_orders = torch.cat([planted[:, None], rand], 1)
    curves = deletion_insertion(handle, "feat", pixels, codes, V, all_orders, class_probability(target, target))
    prob = curves[..., 0].numpy()
    diff = auc(prob[:, :, 1]) - auc(prob[:, :, 0])  # (N, 1 + 20)
    # The planted order is greedy-optimal at every step: no random order does better.
    assert np.all(diff[:, :1] >= diff[:, 1:] - 1e-9)
    assert np.all(diff[:, 0] > diff[:, 1:].mean(1) + 0.05)


def test_concept_readouts_and_grad_x_coef(linear_case):
    handle, pixels, codes, V = linear_case
    Vb = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([[0, 3], [4, 1]])
    recon = (codes @ V).transpose(1, 2).reshape(2, 6, 4, 4)
    with torch.no_grad():
        read = handle.run_from(pixels, "feat", recon, read="post")
    vals = concept_value_readout(targets, Vb)(read, torch.tensor([0, 1]))
    for n in range(2):
        for t in range(2):
            ref = concept_readout(read[n : n + 1], Vb[targets[n, t]][None])
            torch.testing.assert_close(vals[n, t : t + 1], ref)
    # Gradient × coefficient against autograd with respect to the codes themselves.
    got = grad_x_coef(handle, "feat", "post", pixels, codes, V, Vb, targets, (4, 4))
    for n in range(2):
        for t in range(2):
            u = codes[n : n + 1].clone().requires_grad_(True)
            grid = (u @ V).transpose(1, 2).reshape(1, 6, 4, 4)
            g = concept_readout(handle.run_from(pixels[n : n + 1], "feat", grid, read="post"), Vb[targets[n, t]][None])
            (du,) = torch.autograd.grad(g.sum(), u)
            torch.testing.assert_close(got[n, t], (du * u).sum(1)[0].detach(), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ baselines
def test_baselines_code_shapes_and_figures():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 3
    X = centres[torch.randint(0, 4, (200,), generator=g)] + 0.1 * torch.randn(200, 8, generator=g)
    km = KMeansBasis(4, seed=0).fit(X)
    U = km.transform(X)
    assert U.shape == (200, 4) and torch.all((U != 0).sum(1) == 1)
    fig = reconstruction_figures(X, U, km.components_)
    assert fig["rel_error"] < 0.1 and fig["r2"] > 0.95 and fig["active_per_position"] == 1.0
    # hard code: nearest centroid with the least-squares coefficient
    V = km.components_
    torch.testing.assert_close(hard_codes(V[:2] * 2, V)[:, :2], torch.diag(torch.tensor([2.0, 2.0])))
    sae, info = train_sae(X, 6, k=2, seed=0, steps=300)
    Z = sae.encode(X)
    assert Z.shape == (200, 6) and torch.all((Z != 0).sum(1) <= 2) and torch.all(Z >= 0)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(6))
    assert info["train_rel_error"] < 0.5
    sae2, _ = train_sae(X, 6, k=2, seed=0, steps=300)
    torch.testing.assert_close(sae2.W_dec, sae.W_dec)  # seeded


# ------------------------------------------------------------------------------ the command
from conftest import TinyNet  # noqa: E402  stem → block1 (12 ch, 8×8) → block2 (16 ch, 4×4) → head


def _small_bundle():
    return wrap_module(TinyNet(), name="small", input_size=32, class_names=list("abcd"))


SMALL = dict(
    layers=["block1", "block2"],
    max_images=5,
    samples_per_image=8,
    min_cluster=4,
    n_steps=4,
    batch_size=5,
    internal_batch_size=32,
)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun") / "run"
    pipe = Pipeline(Config(**SMALL), out, model=_small_bundle(), progress=False)
    pipe.run(["collect", "concepts", "decompose"])
    return out


def test_requires_decompose(tmp_path):
    out = tmp_path / "run"
    Pipeline(Config(**SMALL), out, model=_small_bundle(), progress=False).run(["collect"])
    with pytest.raises(RunMismatchError, match="decompose"):
        evaluate_run(out, EvaluationSettings(extraction_images=2, interlayer_images=2), progress=False)
    result = CliRunner().invoke(__import__("gig.cli", fromlist=["app"]).app, ["evaluate", str(out)])
    assert result.exit_code == 2 and "decompose" in result.output


def test_evaluate_command_writes_summary(small_run, monkeypatch):
    import gig.models
    from gig.cli import app

    with pytest.raises(ValueError, match="unknown method 'nmff'"):
        EvaluationSettings(methods=["ours", "nmff"])
    monkeypatch.setattr(gig.models, "load_model", lambda *a, **k: _small_bundle())
    args = ["evaluate", str(small_run), "--extraction-images", "3", "--interlayer-images", "2", "--n-random", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = small_run / "evaluate"
    summary = load_json(out / "summary.json")
    assert set(summary) == {"extraction", "interlayer"}
    assert list(summary["extraction"]) == ["block1", "block2"]
    for layer in summary["extraction"].values():
        assert list(layer) == EvaluationSettings().methods  # ours, dictionary, sae (or sae-torch), kmeans
        assert all(isinstance(v, float) and -1 <= v <= 1 for v in layer.values())
    assert list(summary["interlayer"]) == ["block1->block2"]
    assert list(summary["interlayer"]["block1->block2"]) == ["gig", "random", "grad_x_coef", "magnitude"]
    for name in (
        "extraction.json",
        "interlayer.json",
        "results.md",
        "settings.json",
        "extraction_curves.png",
        "extraction_auc.png",
        "interlayer_curves.png",
        "interlayer_auc.png",
    ):
        assert (out / name).is_file(), name
    ext = load_json(out / "extraction.json")
    for layer, methods in ext["layers"].items():
        for name, r in methods.items():
            assert r["auc_diff"]["n"] == 3 and r["auc_diff"]["se"] >= 0
            assert set(r["reconstruction"]) >= {"rel_error", "r2", "l0_ratio", "top1_agreement"}
            assert len(r["curves"]["deletion"]) == 21
            # the protocol's shared end points: insertion of nothing = deletion of everything
            assert r["curves"]["insertion"][0] == pytest.approx(r["curves"]["deletion"][-1])
    # gig inspect --json carries the evaluation
    info = json.loads(CliRunner().invoke(app, ["inspect", str(small_run), "--json"]).stdout)
    assert info["evaluation"] == summary
    # a second call resumes from the saved parts and gives the same numbers
    again = evaluate_run(
        small_run,
        EvaluationSettings(extraction_images=3, interlayer_images=2, n_random=2),
        progress=False,
        model=_small_bundle(),
    )
    assert again["summary"] == summary


def test_ablation_into_another_folder(small_run, tmp_path):
    out = tmp_path / "sae-k2"
    settings = EvaluationSettings(
        extraction_images=2, interlayer_images=0, methods=["sae-torch"], orderings=[], sae_k=2, plots=False
    )
    res = evaluate_run(small_run, settings, progress=False, out=out, model=_small_bundle())
    summary = load_json(out / "summary.json")
    assert summary == res["summary"] and summary["interlayer"] == {}
    assert list(summary["extraction"]["block1"]) == ["sae-torch"]
    ext = load_json(out / "extraction.json")
    assert ext["layers"]["block2"]["sae-torch"]["basis"]["k"] == 2
    assert ext["layers"]["block2"]["sae-torch"]["reconstruction"]["active_per_position"] <= 2


# ------------------------------------------------------------------------------ a basis with a decoder bias
from conftest import biased_basis, biased_codes  # noqa: E402


@pytest.fixture(scope="module")
def biased_run(tmp_path_factory):
    """SMALL with a basis at ``block1`` (12 channels) whose decoder bias ``b_dec`` is not zero."""
    folder = tmp_path_factory.mktemp("biasrun")
    tensors = biased_basis(folder / "basis.safetensors", channels=12)
    config = Config(**SMALL, bases={"block1": str(folder / "basis.safetensors")})
    Pipeline(config, folder / "run", model=_small_bundle(), progress=False).run(["collect", "concepts", "decompose"])
    return folder / "run", tensors


def _user_bases(folder, tensors) -> str:
    """``user:FOLDER``: at block1 the run's basis in the evaluation's user format (with ``b_dec``),
    at block2 a bias-free one."""
    from safetensors.torch import save_file

    folder.mkdir()
    t = {
        "components": tensors["W_dec"],
        "W_enc": tensors["W_enc"],
        "b_enc": tensors["b_enc"],
        "b_dec": tensors["b_dec"],
    }
    save_file(t, str(folder / "block1.safetensors"), metadata={"top_k": "4"})
    V = torch.randn(6, 16, generator=torch.Generator().manual_seed(5))
    save_file({"components": V, "W_enc": torch.linalg.pinv(V)}, str(folder / "block2.safetensors"))
    return f"user:{folder}"


def _biased_outputs(run, ids: list[int], tensors) -> dict:
    """Computed here, without the evaluation: block1's grid replaced by ``b_dec`` everywhere
    (every concept removed) and by ``x̂ = U V + b_dec`` (codes from the encoder written out),
    with the logits and block2 grids above each."""
    from gig.access import RunAccess

    bundle = _small_bundle()
    pixels = RunAccess(run, model=bundle).run_pixels(ids)
    handle = ModelHandle(bundle)
    with torch.no_grad():
        _, grids = handle.capture(pixels, ["block1"])
    n, c, h, w = grids["block1"].shape
    U = biased_codes(grids["block1"].permute(0, 2, 3, 1).reshape(-1, c), tensors)
    full = (U @ tensors["W_dec"] + tensors["b_dec"]).view(n, h, w, c).permute(0, 3, 1, 2).contiguous()
    start = tensors["b_dec"].view(1, c, 1, 1).expand(n, c, h, w).contiguous()
    out = {}
    with torch.no_grad():
        for name, grid in (("full", full), ("start", start), ("zero", torch.zeros_like(full))):
            out[name] = handle.run_from(pixels, "block1", grid)
            out[f"{name}_read"] = handle.run_from(pixels, "block1", grid, read="block2")
    return out


def test_a_decoder_bias_is_what_every_concept_removed_leaves(biased_run, tmp_path):
    """With a decoder bias, deletion of every concept (and insertion of none) is the network with
    block1 set to ``b_dec``, insertion of every concept is ``x̂ = U V + b_dec``, and the ranking's
    GIG spans ``z(x̂) − z(b_dec)``: for the run's basis (``ours``) and a user basis with ``b_dec``,
    in the extraction and the inter-layer protocols."""
    from gig.concepts import load_dictionary
    from gig.store import RunStore

    run, tensors = biased_run
    user = _user_bases(tmp_path / "bases", tensors)
    settings = EvaluationSettings(
        extraction_images=4, interlayer_images=3, methods=["ours", user], orderings=["magnitude"], plots=False
    )
    res = evaluate_run(run, settings, progress=False, out=tmp_path / "ev", model=_small_bundle())
    ids = res["extraction"]["image_id"]
    records = {r["image_id"]: r for r in load_json(run / "collect" / "images.json")["images"]}
    targets = torch.tensor([records[i]["target"] for i in ids])
    z = _biased_outputs(run, ids, tensors)
    p = {k: float(z[k].softmax(1)[torch.arange(len(ids)), targets].mean()) for k in ("full", "start", "zero")}
    assert abs(p["start"] - p["zero"]) > 1e-3  # b_dec is not the zero grid here: the test tells them apart
    for method in ("ours", "user:bases"):
        entry = res["extraction"]["layers"]["block1"][method]
        curves = entry["curves"]
        assert curves["deletion"][-1] == pytest.approx(p["start"], rel=1e-4, abs=1e-6)
        assert curves["insertion"][0] == pytest.approx(p["start"], rel=1e-4, abs=1e-6)
        assert curves["insertion"][-1] == pytest.approx(p["full"], rel=1e-4, abs=1e-6)
        assert curves["deletion"][0] == pytest.approx(p["full"], rel=1e-4, abs=1e-6)
        assert entry["basis"]["decoder_bias"] is True
        part = load_json(tmp_path / "ev" / "parts" / "extraction_0000.json")["layers"]["block1"][method]
        delta = (z["full"] - z["start"])[torch.arange(len(ids)), targets]
        np.testing.assert_allclose(part["gig_delta"], delta.numpy(), rtol=1e-4, atol=1e-5)
    # inter-layer, block1 -> block2: each target's readout with every block1 concept removed, over its full value
    part = load_json(tmp_path / "ev" / "parts" / "interlayer_00_0000.json")
    inter_ids = part["image_id"]
    zi = _biased_outputs(run, inter_ids, tensors)
    unit = load_dictionary(RunStore.open(run), "block2")
    unit = unit / unit.norm(dim=1, keepdim=True)
    for n, row in enumerate(part["targets"]):
        for t, r in enumerate(row):
            value = {k: float(torch.einsum("chw,c->hw", zi[f"{k}_read"][n], unit[r]).max()) for k in ("full", "start")}
            assert part["full_value"][n][t] == pytest.approx(value["full"], rel=1e-4, abs=1e-6)
            if part["valid"][n][t]:
                got = part["orderings"]["magnitude"]["deletion"][n][t][-1]
                assert got == pytest.approx(value["start"] / value["full"], rel=1e-4, abs=1e-6)
