"""Two runs compared (gig.compare): the correlations against numpy's, the matching against a brute
force over every assignment, area pooling against block means; a run against itself, against a
copy of its model with permuted channels (matched by response though the vectors differ), against
another random model (chance level); runs on other images refused; the command and its page."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch
from conftest import TinyNet
from torch import nn
from typer.testing import CliRunner

from gig.compare import ResponseMoments, compare_runs, match_by_response, pooled_codes
from gig.config import Config
from gig.errors import ConfigError, RunMismatchError
from gig.models import wrap_module
from gig.store import load_json


def _bundle(net: nn.Module):
    return wrap_module(net, name="tiny", input_size=32, class_names=["a", "b", "c", "d"])


def _permuted_copy(perm: torch.Tensor) -> TinyNet:
    """TinyNet with block1's output channels permuted and block2 reading them in that order: the
    same function, block1's features in another channel order."""
    net = TinyNet()
    with torch.no_grad():
        conv1, conv2 = net.block1[0], net.block2[0]
        conv1.weight.copy_(conv1.weight[perm])
        conv1.bias.copy_(conv1.bias[perm])
        conv2.weight.copy_(conv2.weight[:, perm])
    return net


def _other_random_net() -> TinyNet:
    net = TinyNet()
    torch.manual_seed(7)
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
    return net


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict:
    """Finished runs of TinyNet (A), its channel-permuted copy (B), another random TinyNet (C),
    all on the 19 embedded photos, and A again on 6 of them."""
    from gig.pipeline import Pipeline

    root = tmp_path_factory.mktemp("compare")
    settings = dict(
        layers=["block1", "block2"],
        samples_per_image=8,
        min_cluster=4,
        batch_size=8,
        min_r2=0.8,
        min_top1_agreement=0.8,
        top_k=3,
        n_steps=4,
    )
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    nets = {"a": TinyNet(), "b": _permuted_copy(perm), "c": _other_random_net(), "few": TinyNet()}
    runs = {}
    for name, net in nets.items():
        extra = {"max_images": 6} if name == "few" else {}
        bundle = _bundle(net)
        Pipeline(Config(**settings, **extra), root / name, model=bundle, progress=False).run()
        runs[name] = (root / name, bundle)
    runs["perm"] = perm
    return runs


def _compare(runs, a: str, b: str, **kw) -> dict:
    (path_a, bundle_a), (path_b, bundle_b) = runs[a], runs[b]
    return compare_runs(path_a, path_b, progress=False, model_a=bundle_a, model_b=bundle_b, **kw)


# ---------------------------------------------------------------------------- the statistics
def test_correlations_equal_numpy_on_the_cells_and_on_images_shifted_by_one():
    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(6, 5, generator=g), torch.rand(6, 4, generator=g)) for _ in range(7)]
    images = [(a.double(), b.double()) for a, b in images]
    for a, _ in images:
        a[:, 4] = 2.0  # a constant concept: no response to correlate
    moments = ResponseMoments(5, 4)
    for a, b in images:
        moments.add(a, b)
    R, R_chance, active_a, active_b = moments.correlations()
    A = torch.cat([a for a, _ in images]).numpy()
    B = torch.cat([b for _, b in images]).numpy()
    B_shifted = torch.cat([images[(i + 1) % 7][1] for i in range(7)]).numpy()
    for got, other in ((R, B), (R_chance, B_shifted)):
        want = np.corrcoef(A[:, :4].T, other.T)[:4, 4:]
        np.testing.assert_allclose(got[:4].numpy(), want, atol=1e-12)
        assert torch.equal(got[4], torch.zeros(4))
    assert active_a.tolist() == [True] * 4 + [False] and bool(active_b.all())


def test_matching_is_the_best_one_to_one_assignment_by_brute_force():
    R = torch.rand(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    got = match_by_response(R)
    best = max(itertools.permutations(range(6), 4), key=lambda cols: sum(float(R[i, c]) for i, c in enumerate(cols)))
    assert got.match.tolist() == list(best)
    np.testing.assert_allclose(got.similarity, [float(R[i, c]) for i, c in enumerate(best)])


def test_pooling_to_a_coarser_grid_takes_area_means():
    codes = torch.arange(8 * 6 * 3, dtype=torch.float64).reshape(48, 3)  # (H·W, K) on an 8×6 grid
    got = pooled_codes(codes, (8, 6), (4, 3))
    maps = codes.T.reshape(3, 8, 6)
    want = maps.reshape(3, 4, 2, 3, 2).mean((2, 4)).flatten(1).T
    torch.testing.assert_close(got, want)
    assert torch.equal(pooled_codes(codes, (8, 6), (8, 6)), codes)


# ---------------------------------------------------------------------------- runs
def test_a_run_compared_with_itself_matches_every_concept_and_changes_no_graph(tiny_runs):
    result = _compare(tiny_runs, "a", "a")
    for pair in result["layers"]:
        active = [c for c in pair["concepts"] if c["active"]]
        assert active and pair["share_matched"] == 1.0
        for c in active:
            assert c["match"] == c["concept"] and c["similarity"] == pytest.approx(1.0, abs=1e-9)
            assert c["vector_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert result["graphs"]
    for diff in result["graphs"].values():
        assert not diff["nodes"]["lost"] and not diff["nodes"]["gained"] and not diff["edges"]["gained"]
        assert diff["node_recurrence"] == 1.0 and diff["edge_recurrence"] == 1.0
        for kept in diff["nodes"]["kept"] + diff["edges"]["kept"]:
            assert kept["difference"] == 0.0 and not kept.get("changed", False)


def test_a_copy_with_permuted_channels_is_matched_by_response_though_its_vectors_differ(tiny_runs):
    """block1's features are block1's of A in another channel order: every active concept of A
    has its counterpart at correlation 1, while the vector cosines (what a matching by vectors
    would use) fall well below 1."""
    result = _compare(tiny_runs, "a", "b")
    block1 = result["layers"][0]
    active = [c for c in block1["concepts"] if c["active"]]
    assert block1["share_matched"] == 1.0
    assert min(c["similarity"] for c in active) > 0.999
    assert np.median([c["vector_cosine"] for c in active]) < 0.9
    block2 = result["layers"][1]
    assert block2["share_matched"] == 1.0  # the same function after block2
    for diff in result["graphs"].values():
        assert diff["node_recurrence"] == 1.0


def test_another_random_model_matches_about_as_well_as_chance(tiny_runs):
    """Two random networks share little: the median matched correlation stays below what images
    out of correspondence give at their 95th percentile, and most concepts have no counterpart
    (against all of them for the permuted copy)."""
    result = _compare(tiny_runs, "a", "c")
    for pair in result["layers"]:
        assert pair["median_similarity"] < pair["chance_p95"]
        assert pair["share_matched"] <= 0.25


def test_runs_on_other_images_are_refused_naming_the_ids(tiny_runs):
    with pytest.raises(RunMismatchError, match=r"image id\(s\) only in .*a .*e\.g\. \[6, 7, 8\]"):
        _compare(tiny_runs, "a", "few")


def test_layer_pairs_are_checked_before_any_work(tiny_runs):
    with pytest.raises(ConfigError, match="'nope' is not a layer"):
        _compare(tiny_runs, "a", "b", pairs=["block1=nope"])
    with pytest.raises(ConfigError, match="LAYER_A=LAYER_B"):
        _compare(tiny_runs, "a", "b", pairs=["block1"])
    result = _compare(tiny_runs, "a", "b", pairs=["block2=block2"])
    assert [(p["layer_a"], p["layer_b"]) for p in result["layers"]] == [("block2", "block2")]


def test_command_writes_the_json_and_an_offline_page(tiny_runs, tmp_path, browser, monkeypatch):
    """`gig compare` from the command line (each run's model passed through the API behind it):
    compare.json equals the returned result; the page loads in headless Chromium with no console
    error and no request beyond its own files."""
    from gig import compare as compare_module
    from gig.cli import app

    models = {str(tiny_runs[k][0]): tiny_runs[k][1] for k in ("a", "b")}
    original = compare_module.compare_runs

    def with_models(run_a, run_b, *args, **kw):
        return original(run_a, run_b, *args, model_a=models[str(run_a)], model_b=models[str(run_b)], **kw)

    out = tmp_path / "cmp"
    monkeypatch.setattr(compare_module, "compare_runs", with_models)
    result = CliRunner().invoke(app, ["compare", str(tiny_runs["a"][0]), str(tiny_runs["b"][0]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = load_json(out / "compare.json")
    assert saved["schema"] == "gig.compare/1" and len(saved["layers"]) == 2
    assert "100% of" in result.output
    page = browser.new_page()
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto((out / "index.html").resolve().as_uri(), wait_until="load")
    assert page.locator("table.cmp img").count() > 0
    assert all(page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)"))
    page.close()
    assert not errors, errors
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    shutil.rmtree(out)


def test_runs_on_different_images_compare_on_a_s_images(tiny_runs):
    """``on="a"``: B's concepts coded on A's images by B's own model and λ. A against itself
    this way matches every concept to itself at r = 1 (the stored codes are the encoder's); a
    run of 6 photos compared on A's 19 reads all 19 (it is refused with the runs' own codes), and
    the same network's concepts find counterparts there."""
    result = _compare(tiny_runs, "a", "a", on="a")
    for pair in result["layers"]:
        for c in pair["concepts"]:
            if c["active"]:
                assert c["match"] == c["concept"] and c["similarity"] == pytest.approx(1.0, abs=1e-6)
    few = _compare(tiny_runs, "a", "few", on="a")
    assert len(few["image_ids"]) == 19 and few["layers"][0]["n_images"] == 19
    for pair in few["layers"]:  # B's fewer concepts (6 photos' PFVs), coded on A's 19 photos
        assert pair["K_b"] < pair["K_a"] and pair["n_cells"] == 19 * pair["pooled_grid"][0] * pair["pooled_grid"][1]
        assert 1 <= sum(c["counterpart"] for c in pair["concepts"]) <= pair["K_b"]
    with pytest.raises(ConfigError, match="on must be"):
        _compare(tiny_runs, "a", "few", on="b")


def test_the_notebook_api_compares_two_opened_runs(tiny_runs, tmp_path):
    import gig

    (path_a, bundle_a), (path_b, bundle_b) = tiny_runs["a"], tiny_runs["b"]
    result = gig.open(path_a, model=bundle_a).compare(gig.open(path_b, model=bundle_b), out=tmp_path / "c", page=False)
    assert [p["share_matched"] for p in result["layers"]] == [1.0, 1.0]
    assert load_json(tmp_path / "c" / "compare.json")["layers"][0]["layer_b"] == "block1"
    assert not (tmp_path / "c" / "index.html").exists()
