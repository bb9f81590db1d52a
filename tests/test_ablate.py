"""gig.ablate against independent answers: a linear head's closed form, the zero grid, zero codes,
the stored GIG walk, scipy's Spearman; and the `gig ablate` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TinyNet  # stem → block1 (12 ch, 8×8) → block2 (16 ch, 4×4) → mean → linear head
from typer.testing import CliRunner

from gig.ablate import (
    AblationResult,
    ablate,
    ablate_codes,
    ablation_correlation,
    ablation_path,
    correlation_path,
    grid_shape,
    open_run,
    run_codes,
    spearman,
)
from gig.config import Config
from gig.decompose import encode_pixels
from gig.errors import ConfigError
from gig.models import wrap_module
from gig.pipeline import Pipeline
from gig.readouts import ConceptReadout
from gig.store import RunStore, load_json, load_tensors

SMALL = dict(
    layers=["block1", "block2"],
    max_images=4,
    samples_per_image=8,
    min_cluster=4,
    n_steps=4,
    batch_size=4,
    internal_batch_size=32,
    top_k=2,
    front_images=4,
)


def _bundle():
    return wrap_module(TinyNet(), name="tiny", input_size=32, class_names=list("abcd"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run (every stage but the graph's pictures) and its context."""
    out = tmp_path_factory.mktemp("ablate") / "run"
    Pipeline(Config(**SMALL), out, model=_bundle(), progress=False).run(
        ["collect", "concepts", "decompose", "attribute"]
    )
    return out


@pytest.fixture(scope="module")
def ctx(run):
    return open_run(run, model=_bundle())


def test_linear_head_matches_closed_form(run, ctx):
    """Above block2 the network is mean-pool → linear: removing concept q changes the logits by
    exactly −W · V_q · mean_p U[p, q]."""
    from gig.concepts import load_dictionary

    store = RunStore.open(run)
    V = load_dictionary(store, "block2")
    codes = run_codes(store, "block2", [0, 1, 2, 3])  # (4, 16, K)
    q = int(codes.abs().sum((0, 1)).argmax())  # a concept present in the images
    result = ablate(ctx, "block2", [q], save=False)
    W = ctx.handle.bundle.model.head.weight  # (4, 16)
    expected = -(codes[:, :, q].mean(1)[:, None] * (W @ V[q])[None])  # (4 images, 4 classes)
    torch.testing.assert_close(result.delta_logits, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.removed_mass, codes[:, :, q].abs().sum(1))
    assert result.readouts == {}  # block2 is the last analysed layer: nothing read in between


def test_zero_code_changes_nothing_and_all_gives_zero_grid(run, ctx):
    store = RunStore.open(run)
    V = ctx.dictionary("block1")
    pixels = ctx.run_pixels([0, 1])
    codes = run_codes(store, "block1", [0, 1]).clone()
    codes[:, :, 3] = 0  # concept 3 absent from both images
    removals = torch.zeros(2, V.shape[0], dtype=torch.bool)
    removals[0, 3] = True
    removals[1] = True  # every concept
    out = ablate_codes(
        ctx.handle, "block1", pixels, codes, V, removals, [None, "block2"], {"block2": ctx.dictionary("block2")}
    )
    for read in (None, "block2"):
        assert torch.equal(out[read][:, 1], out[read][:, 0])  # nothing to remove: bit-identical
    c, h, w = grid_shape(ctx.handle, "block1", pixels)
    zero = torch.zeros(2, c, h, w)
    with torch.no_grad():
        torch.testing.assert_close(out[None][:, 2], ctx.handle.run_from(pixels, "block1", zero))
        readout = ConceptReadout("block2", ctx.dictionary("block2")).all(
            ctx.handle.run_from(pixels, "block1", zero, read="block2")
        )
    torch.testing.assert_close(out["block2"][:, 2], readout)


def test_remove_every_concept_reproduces_the_stored_walk(run, ctx):
    """Ablating every concept of the top layer drops the target logit by Δz = z(U·V) − z(0), the
    change the attribute stage stored with its class GIG."""
    from gig.attribution import load_attributions

    store = RunStore.open(run)
    data = load_attributions(store)
    K = ctx.dictionary("block2").shape[0]
    result = ablate(ctx, "block2", list(range(K)), image_ids=data["image_id"].tolist(), save=False)
    idx = torch.arange(len(result.targets))
    drop = -result.delta_logits[idx, result.targets]
    torch.testing.assert_close(drop, data["block2/class_delta"], rtol=1e-4, atol=1e-5)


def test_ablate_writes_json_and_mean(run, ctx):
    result = ablate(ctx, "block1", [0, 2], image_ids=[1, 3])
    assert isinstance(result, AblationResult) and result.path == ablation_path(RunStore.open(run), "block1", [0, 2])
    doc = load_json(result.path)
    assert doc["schema"] == "gig.ablation/1" and doc["layer"] == "block1" and doc["concepts"] == [0, 2]
    assert doc["readout_layers"] == ["block2"] and doc["n_images"] == 2
    image = doc["images"][0]
    assert image["image_id"] == 1 and set(image["target_logit"]) == {"original", "reconstruction", "ablated", "delta"}
    assert image["target_prob"]["delta"] == pytest.approx(
        image["target_prob"]["ablated"] - image["target_prob"]["reconstruction"]
    )
    K2 = ctx.dictionary("block2").shape[0]
    mean = doc["mean"]
    assert len(mean["readouts"]["block2"]["delta"]) == K2
    want = result.delta_readouts("block2").mean(0)
    assert mean["readouts"]["block2"]["delta"] == pytest.approx(want.tolist(), abs=1e-5)
    assert mean["target_prob"]["delta"] == pytest.approx(np.mean([i["target_prob"]["delta"] for i in doc["images"]]))
    # Probabilities of each image still sum to one in both variants.
    torch.testing.assert_close(result.probs.sum(-1), torch.ones(2, 2))


def test_photos_are_coded_like_run_images(run, ctx, tmp_path):
    """A run image given as a photo gets the run's codes back (same dictionary, λ and encoder)."""
    from gig.images import EmbeddedSource

    source = EmbeddedSource()
    photo = tmp_path / "photo.png"
    source.load(source.records[2]).save(photo)
    pixels = ctx.photo_pixels([photo])
    torch.testing.assert_close(pixels, ctx.run_pixels([2]), atol=2e-2, rtol=0)  # PNG round trip of the photo
    store = RunStore.open(run)
    codes = encode_pixels(store, ctx.handle, ctx.run_pixels([2]), ["block1"])[1]["block1"]
    torch.testing.assert_close(codes, run_codes(store, "block1", [2]), atol=1e-3, rtol=1e-3)
    result = ablate(ctx, "block1", [1], images=[photo])
    assert result.source == "photos" and result.image_ids == [None] and "_photos-" in result.path.name
    assert int(result.targets[0]) == int(result.original_logits[0].argmax())  # default target: the prediction


def test_refuses_unknown_layer_concept_and_image(ctx):
    with pytest.raises(ConfigError, match="'block9'"):
        ablate(ctx, "block9", [0], save=False)
    K = ctx.dictionary("block1").shape[0]
    with pytest.raises(ConfigError, match=f"concept {K} .*'block1'"):
        ablate(ctx, "block1", [K], save=False)
    with pytest.raises(ConfigError, match="99"):
        ablate(ctx, "block1", [0], image_ids=[99], save=False)


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 5, 12).astype(float)  # ties
        y = x + rng.normal(size=12)
        assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3])) and np.isnan(spearman([1, 2], [2, 1]))


def test_gig_and_ablation_agree_where_the_head_is_linear(run, ctx):
    """block2 → class is linear: GIG and the ablation drop are equal, so every rank correlation
    is 1, while the random ordering is not; the zero-grid check reproduces the stored Δ."""
    result = ablation_correlation(ctx, top_n=None, n_random=10)
    linear = result["transitions"]["block2->class"]
    assert linear["spearman"]["per_target"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert linear["spearman"]["pooled"] == pytest.approx(1.0, abs=1e-6)
    assert linear["random"]["per_target"]["mean"] < 0.8
    assert linear["sign_agreement"] == 1.0
    assert linear["completeness"]["delta_check_median"] < 1e-4
    assert linear["completeness"]["ablation_sum_ratio_median"] == pytest.approx(1.0, rel=1e-4)
    conv = result["transitions"]["block1->block2"]
    assert conv["n_images"] == 4 and conv["n_targets"] == 4 * SMALL["top_k"]
    assert -1 <= conv["spearman"]["per_target"]["mean"] <= 1
    assert conv["completeness"]["delta_check_median"] < 1e-4
    store = RunStore.open(result["run"])
    saved = load_json(correlation_path(store))["transitions"]["block2->class"]
    assert saved["spearman"] == linear["spearman"] and saved["n_pairs"] == linear["n_pairs"]
    pairs = load_tensors(correlation_path(store).with_name("correlation_pairs.safetensors"))
    assert pairs["block2->class/predicted"].numel() == linear["n_pairs"]
    torch.testing.assert_close(pairs["block2->class/predicted"], pairs["block2->class/measured"], rtol=1e-3, atol=1e-5)


def test_ablate_command(run, monkeypatch):
    import gig.models
    from gig.cli import app

    monkeypatch.setattr(gig.models, "load_model", lambda *a, **k: _bundle())
    result = CliRunner().invoke(app, ["ablate", str(run), "block1", "0", "1", "--image-id", "0", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["concepts"] == [0, 1] and doc["n_images"] == 1
    table = CliRunner().invoke(app, ["ablate", str(run), "block1", "0"])
    assert table.exit_code == 0 and "target" in table.stdout
    bad = CliRunner().invoke(app, ["ablate", str(run), "block1", "999"])
    assert bad.exit_code == 2 and "999" in bad.output


def test_cli_ablation_correlation(tiny_run, tmp_path) -> None:
    import json
    import shutil

    from gig.cli import app

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    result = CliRunner().invoke(
        app,
        [
            "ablation-correlation",
            str(run),
            "--max-images",
            "1",
            "--top-n",
            "2",
            "--others",
            "1",
            "--n-random",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout[result.stdout.index("{") :])
    assert printed == load_json(run / "graph" / "ablation" / "correlation.json")
    assert set(printed["transitions"]) == {"_blocks.8->_blocks.15", "_blocks.15->class"}
    for t in printed["transitions"].values():
        assert -1.0 <= t["spearman"]["per_target"]["mean"] <= 1.0


def test_a_decoder_bias_is_what_removing_every_concept_leaves(tmp_path):
    """A layer whose basis has a decoder bias ``b_dec``: the reconstruction is ``U V + b_dec`` and
    every concept removed leaves ``b_dec`` at every position (the GIG path's start), computed here
    by running the network; the ablation check reproduces the Δ the attribute stage stored."""
    from conftest import biased_basis, biased_codes

    tensors = biased_basis(tmp_path / "basis.safetensors", channels=12)
    config = Config(**{**SMALL, "max_images": 3}, bases={"block1": str(tmp_path / "basis.safetensors")})
    Pipeline(config, tmp_path / "run", model=_bundle(), progress=False).run(
        ["collect", "concepts", "decompose", "attribute"]
    )
    ctx = open_run(tmp_path / "run", model=_bundle())
    result = ablate(ctx, "block1", list(range(10)), image_ids=[0, 1, 2], save=False)
    pixels = ctx.run_pixels([0, 1, 2])
    with torch.no_grad():
        _, grids = ctx.handle.capture(pixels, ["block1"])
    n, c, h, w = grids["block1"].shape
    U = biased_codes(grids["block1"].permute(0, 2, 3, 1).reshape(-1, c), tensors)
    full = (U @ tensors["W_dec"] + tensors["b_dec"]).view(n, h, w, c).permute(0, 3, 1, 2).contiguous()
    start = tensors["b_dec"].view(1, c, 1, 1).expand(n, c, h, w).contiguous()
    with torch.no_grad():
        torch.testing.assert_close(
            result.logits[:, 0], ctx.handle.run_from(pixels, "block1", full), rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            result.logits[:, 1], ctx.handle.run_from(pixels, "block1", start), rtol=1e-4, atol=1e-5
        )
        read = ConceptReadout("block2", ctx.dictionary("block2")).all(
            ctx.handle.run_from(pixels, "block1", start, read="block2")
        )
    torch.testing.assert_close(result.readouts["block2"][:, 1], read, rtol=1e-4, atol=1e-5)
    conv = ablation_correlation(ctx, top_n=2, n_others=1, n_random=2)["transitions"]["block1->block2"]
    assert conv["completeness"]["delta_check_median"] < 1e-4


def test_cli_text_speaks_of_a_probe_heads_outputs(tmp_path, monkeypatch):
    """A run whose top is a probe head: `gig ablate` lists the most changed outputs, and the
    evaluation's results.md ranks by concept → output GIG; neither speaks of classes there."""
    import gig.models
    from gig.cli import app
    from gig.models import with_head
    from gig.store import save_tensors

    g = torch.Generator().manual_seed(2)
    probe = tmp_path / "probe.safetensors"
    save_tensors(
        probe,
        {"weight": torch.randn(3, 16, generator=g), "bias": torch.randn(3, generator=g)},
        metadata={"names": json.dumps(["cat", "dog", "other"])},
    )
    config = Config(**{**SMALL, "max_images": 3}, head=str(probe))
    run = tmp_path / "run"
    Pipeline(config, run, model=with_head(_bundle(), probe), progress=False).run(["collect", "concepts", "decompose"])
    monkeypatch.setattr(gig.models, "load_model", lambda *a, **k: _bundle())
    result = CliRunner().invoke(app, ["ablate", str(run), "block1", "0", "1"])
    assert result.exit_code == 0, result.output
    changed = [line for line in result.stdout.splitlines() if "most changed" in line]
    assert changed and all("output" in line and "class" not in line for line in changed)
    args = ["evaluate", str(run), "-m", "ours", "--extraction-images", "2", "--interlayer-images", "0", "--no-plots"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = (run / "evaluate" / "results.md").read_text()
    assert "target-output probability" in text and "concept → output GIG" in text and "class" not in text
