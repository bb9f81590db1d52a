"""The decompose stage: the sparsity–fidelity front and its λ rule, the l0 calibration, sparse
storage, fidelity figures. (The solvers themselves: test_lasso.py.)"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from gig.collect import iter_image_batches
from gig.config import Config
from gig.decompose import (
    AGREEMENT_BLOCK,
    FidelityMeter,
    FrontImages,
    alpha_for_l0,
    from_sparse_rows,
    load_front_images,
    meets_rule,
    output_fidelity,
    sparsity_front,
    to_sparse_rows,
)
from gig.hooks import ModelHandle
from gig.images import open_source
from gig.lasso import LassoEncoder, lars_available
from gig.omp import OMPEncoder


def test_sparse_rows_round_trip():
    U = torch.randn(30, 12) * (torch.rand(30, 12) < 0.3)
    parts = to_sparse_rows(U)
    torch.testing.assert_close(from_sparse_rows(parts["indptr"], parts["indices"], parts["values"], 12), U)


def test_fidelity_meter_merge_equals_one_pass(lasso_problem):
    X, V = lasso_problem(p=60)
    U = LassoEncoder(V, 0.2).encode(X)
    whole = FidelityMeter(X.shape[1])
    whole.add(X, U @ V, U)
    parts = []
    for s in (slice(0, 25), slice(25, 60)):
        m = FidelityMeter(X.shape[1])
        m.add(X[s], U[s] @ V, U[s])
        parts.append(m.state())
    merged = FidelityMeter.merge(parts).result()
    for key, value in whole.result().items():
        assert merged[key] == pytest.approx(value, rel=1e-6)
    # R² against a direct computation.
    resid = ((X - U @ V) ** 2).sum()
    total = ((X - X.mean(0)) ** 2).sum()
    assert merged["r2"] == pytest.approx(float(1 - resid / total), rel=1e-5)


@pytest.mark.parametrize("coder", [LassoEncoder, OMPEncoder])
def test_alpha_for_l0_reaches_the_target_sparsity(coder, lasso_problem):
    X, V = lasso_problem(k=24, p=200)
    V = V * torch.linspace(0.2, 0.6, 24)[:, None]  # short atoms: OMP's λ_max is the unit atoms'
    alpha, l0 = alpha_for_l0(X, V, 0.1, coder)
    measured = float((coder(V, alpha).encode(X) != 0).float().mean())
    assert measured == pytest.approx(l0)
    assert 0.07 < l0 <= 0.1
    assert float((coder(V, alpha * 0.7).encode(X) != 0).float().mean()) > l0


@pytest.fixture()
def tiny_front(tiny_bundle, tmp_path):
    """A tiny network's block1 on 6 generated images, with a k-means-free dictionary (its own
    sampled PFVs), and the front measured under the default rule (relaxed to fit 6 images)."""
    from PIL import Image

    g = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(g.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    source = open_source(str(tmp_path))
    handle = ModelHandle(tiny_bundle)
    config = Config(layers=["block1"], min_r2=0.8, min_top1_agreement=0.8, front_images=6, batch_size=4)
    records = source.records
    with torch.no_grad():
        preds = torch.cat(
            [handle.capture(b.pixels, ["block1"])[0].argmax(1) for b in iter_image_batches(source, records, handle, 4)]
        )
    images = load_front_images(source, records, preds, handle, ["block1"], config)
    rows = torch.cat([g_.permute(0, 2, 3, 1).reshape(-1, g_.shape[1]) for g_ in images.grids["block1"]])
    V = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:36]]
    return handle, images, V, config, rows


@pytest.mark.parametrize("coder", ["lasso", "omp"])
def test_front_choice_is_the_largest_lambda_meeting_the_rule(coder, tiny_front):
    handle, images, V, config, rows = tiny_front
    config = dataclasses.replace(config, coder=coder)
    front = sparsity_front(images, "block1", V, handle, config)
    alphas = [p["alpha"] for p in front["points"]]
    assert alphas == sorted(alphas, reverse=True)
    assert front["met"]
    chosen = next(p for p in front["points"] if p["alpha"] == front["alpha"])
    assert meets_rule(chosen, config) and chosen["meets"]
    # Every larger λ measured misses the rule: the choice is the sparsest that meets it.
    assert not any(p["meets"] for p in front["points"] if p["alpha"] > front["alpha"])
    # Sparsity falls as λ grows along the front (LARS/FISTA are exact to 1e-4).
    l0 = [p["l0_ratio"] for p in front["points"]]
    assert all(a <= b + 1e-9 for a, b in zip(l0, l0[1:]))


@pytest.mark.parametrize("coder", ["lasso", "omp"])
def test_front_figures_match_a_direct_computation(coder, tiny_front):
    """Every point's R², l0 and top-1 agreement recomputed by hand from codes made from scratch
    (the front resumes each λ from the one above and measures agreements in blocks)."""
    handle, images, V, config, rows = tiny_front
    # Without SPAMS the Lasso is FISTA, exact to its duality-gap tolerance (1e-6 here): codes
    # resumed along the front and codes made from scratch agree to that, OMP's exactly.
    config = dataclasses.replace(config, coder=coder, lasso_tol=1e-6, lasso_max_iter=20000)
    exact = coder == "omp" or lars_available()
    front = sparsity_front(images, "block1", V, handle, config)
    assert len(front["points"]) >= 6
    model = handle.bundle.model
    for point in front["points"]:
        enc = (
            LassoEncoder(V, point["alpha"], debias=True, tol=1e-6, max_iter=20000)
            if coder == "lasso"
            else OMPEncoder(V, point["alpha"])
        )
        U = enc.encode(rows)
        X_hat = U @ V
        r2 = 1 - float(((rows - X_hat) ** 2).sum() / ((rows - rows.mean(0)) ** 2).sum())
        assert point["r2"] == pytest.approx(r2, rel=1e-4 if exact else 2e-3, abs=1e-6)
        assert point["l0_ratio"] == pytest.approx(float((U != 0).float().mean()), rel=1e-6 if exact else 0.02)
        agree, start = 0, 0
        for pixels, grid in zip(images.pixels, images.grids["block1"]):
            b, c, h, w = grid.shape
            part = X_hat[start : start + b * h * w].reshape(b, h, w, c).permute(0, 3, 1, 2)
            start += b * h * w
            with torch.no_grad():
                logits = model.head(model.block2(part).mean((2, 3)))
            agree += int((logits.argmax(1) == images.preds[start // (h * w) - b : start // (h * w)]).sum())
        assert point["top1_agreement"] == pytest.approx(agree / images.preds.numel())


class _LinearProbe(torch.nn.Module):
    """A 1×1 conv and a linear head on its mean: every replacement can move the prediction."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block1 = torch.nn.Conv2d(3, 4, 1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.block1(x).mean((2, 3)))


def test_output_fidelity_of_more_reconstructions_than_one_block_match_the_model():
    """output_fidelity over more reconstructions than one forward takes (two blocks) equals, per
    image, the model's own agreement and torch's KL divergence, computed one at a time by hand."""
    from gig.models import wrap_module

    model = _LinearProbe().eval()
    handle = ModelHandle(wrap_module(model, "probe", input_size=8))
    g = torch.Generator().manual_seed(1)
    pixels = [torch.randn(5, 3, 8, 8, generator=g) for _ in range(2)]
    with torch.no_grad():
        grids = [model.block1(p) for p in pixels]
        logits = torch.cat([model(p) for p in pixels])
    images = FrontImages(pixels, {"block1": grids}, logits.argmax(1), logits.log_softmax(1))
    recons = [
        [grid + torch.randn(grid.shape, generator=g) * 0.3 * k for grid in grids] for k in range(AGREEMENT_BLOCK + 3)
    ]
    agree, kl = output_fidelity(images, "block1", handle, recons)
    assert agree.shape == kl.shape == (len(recons), 10)
    for recon, hits, div in zip(recons, agree, kl):
        with torch.no_grad():
            replaced = torch.cat([model.head(grid.mean((2, 3))) for grid in recon])
        assert torch.equal(hits, replaced.argmax(1) == logits.argmax(1))
        # KL(p ‖ q) per image by torch: kl_div(log q, log p, log_target) sums p (log p − log q).
        want = torch.nn.functional.kl_div(
            replaced.log_softmax(1), logits.log_softmax(1), log_target=True, reduction="none"
        ).sum(1)
        torch.testing.assert_close(div.float(), want, rtol=1e-4, atol=1e-6)
    assert bool(agree[0].all()) and float(kl[0].max()) < 1e-6 and float(kl[-1].mean()) > 0.01


def test_rule_with_target_error_picks_the_largest_lambda_below_it(tiny_front):
    handle, images, V, _, _ = tiny_front
    config = Config(layers=["block1"], target_rel_error=0.2, front_images=6)
    front = sparsity_front(images, "block1", V, handle, config)
    chosen = next(p for p in front["points"] if p["alpha"] == front["alpha"])
    assert chosen["rel_error"] <= 0.2
    assert all(p["rel_error"] > 0.2 for p in front["points"] if p["alpha"] > front["alpha"])


def test_front_with_unit_atoms_has_its_grid_in_the_penalty_units(tiny_front):
    """With unit-norm atoms the λ grid is in the normalised atoms' units: its first point
    (λ_max/2) codes something, and the rule still picks the sparsest λ that meets it."""
    handle, images, V, config, rows = tiny_front
    config = dataclasses.replace(config, unit_atoms=True)
    front = sparsity_front(images, "block1", V * torch.linspace(0.5, 2.0, V.shape[0])[:, None], handle, config)
    assert front["points"][0]["l0_ratio"] > 0
    assert front["met"]
    assert not any(p["meets"] for p in front["points"] if p["alpha"] > front["alpha"])


def test_code_reader_matches_whole_shards(tiny_run) -> None:
    """The lazy per-image reader (safetensors slices) against whole shards read eagerly."""
    import torch

    from gig.decompose import CodeReader, from_sparse_rows
    from gig.store import RunStore, load_tensors

    store = RunStore.open(tiny_run["run"])
    for layer in store.config.layers:
        reader = CodeReader(store, layer)
        ids = reader.image_ids()[::2]
        got = {i: reader.codes(i) for i in ids}
        # Independently: whole shards read eagerly, split into images by their row pointers.
        for path in sorted((store.root / "decompose" / "shards").glob("*.safetensors")):
            t = load_tensors(path)
            dense = from_sparse_rows(t[f"{layer}/indptr"], t[f"{layer}/indices"], t[f"{layer}/values"], reader.K)
            shard_ids = t["image_id"].tolist()
            per_image = dense.shape[0] // len(shard_ids)
            for j, image_id in enumerate(shard_ids):
                if image_id in got:
                    assert torch.equal(got[image_id], dense[j * per_image : (j + 1) * per_image])


def test_stage_with_omp_codes_stores_what_its_coder_gives(tiny_bundle, tmp_path):
    """The decompose stage with ``coder: omp`` on a tiny network: its stored codes are the OMP
    codes of every position at the chosen λ (residuals correlate by at most λ with every unit
    atom), ``encode_pixels`` gives them back, and the recorded l0 is the stored codes' own."""
    from gig.collect import load_images
    from gig.concepts import load_dictionary
    from gig.decompose import CodeReader, encode_pixels, load_fidelity, run_alpha
    from gig.pipeline import Pipeline
    from gig.store import RunStore

    config = Config(
        layers=["block1", "block2"],
        max_images=5,
        samples_per_image=8,
        min_cluster=4,
        batch_size=5,
        coder="omp",
        min_r2=0.8,
        min_top1_agreement=0.8,
    )
    Pipeline(config, tmp_path / "run", model=tiny_bundle, progress=False).run(["collect", "concepts", "decompose"])
    store = RunStore.open(tmp_path / "run")
    handle = ModelHandle(tiny_bundle)
    source = open_source("embedded")
    by_id = {r.image_id: r for r in source.records}
    records = [by_id[i["image_id"]] for i in load_images(store)["images"]]
    pixels = torch.cat([b.pixels for b in iter_image_batches(source, records, handle, 5)])
    _, grids = handle.capture(pixels, config.layers)
    _, again = encode_pixels(store, handle, pixels)
    for layer in config.layers:
        reader = CodeReader(store, layer)
        U = torch.cat([reader.codes(r.image_id) for r in records])  # (N·H·W, K)
        X = grids[layer].permute(0, 2, 3, 1).reshape(-1, grids[layer].shape[1])
        V = load_dictionary(store, layer)
        unit = V / V.norm(dim=1, keepdim=True)
        assert 0 < float((U != 0).float().mean()) < 0.9  # sparse codes, not none
        assert float(((X - U @ V) @ unit.T).abs().max()) <= run_alpha(store, layer) * (1 + 1e-4)
        torch.testing.assert_close(again[layer].reshape(-1, V.shape[0]), U, atol=1e-5, rtol=1e-4)
        assert load_fidelity(store)[layer]["l0_ratio"] == pytest.approx(float((U != 0).float().mean()))


def test_front_intervals_and_stability_match_an_explicit_bootstrap_loop(tiny_front):
    """assess_front's vectorised resamples against a loop that redoes every resample by hand: R²
    from the resampled rows themselves, mean KL over the resampled images, the rule applied to
    each point, the first (largest λ) point meeting it."""
    from gig.decompose import BOOTSTRAP, SAME_CHOICE, assess_front, code_front_point, encoder_for, image_moments

    handle, images, V, config, rows = tiny_front
    # This network's output barely moves (KL ~1e-6): a bound where KL, not R², binds the choice.
    config = dataclasses.replace(config, max_kl=4.2e-6, min_r2=0.7)
    n = images.preds.numel()
    points = []
    for alpha in [p["alpha"] for p in sparsity_front(images, "block1", V, handle, config)["points"]]:
        point, _, recons = code_front_point(encoder_for(config, V, alpha), images, "block1")
        agree, kl = output_fidelity(images, "block1", handle, [recons])
        point.update(top1_agreement=float(agree[0].double().mean()), kl=float(kl[0].mean()), _agree=agree[0], _kl=kl[0])
        point["meets"] = meets_rule(point, config)
        points.append(point)
    grids = images.grids["block1"]
    front = assess_front(points, image_moments(grids), config)
    # The same resamples, redone one at a time.
    per_image_rows = [
        g_.permute(0, 2, 3, 1).reshape(g_.shape[0], -1, g_.shape[1])[i] for g_ in grids for i in range(g_.shape[0])
    ]
    g = torch.Generator().manual_seed(config.seed)
    draws = torch.randint(n, (BOOTSTRAP, n), generator=g)
    chosen = [p["alpha"] for p in points].index(front["alpha"])
    kl_by_resample, same = [], 0
    recon_rows = {}
    for j, p in enumerate(points):
        enc = encoder_for(config, V, p["alpha"])
        recon_rows[j] = [enc.encode(x) @ V for x in per_image_rows]
    for b in range(BOOTSTRAP):
        idx = draws[b].tolist()
        X = torch.cat([per_image_rows[i] for i in idx]).double()
        sst = float(((X - X.mean(0)) ** 2).sum())
        figures = []
        for j, p in enumerate(points):
            sse = sum(float(((per_image_rows[i] - recon_rows[j][i]).double() ** 2).sum()) for i in idx)
            figures.append(
                {
                    "r2": 1 - sse / sst,
                    "kl": float(p["_kl"][idx].mean()),
                    "top1_agreement": float(p["_agree"][idx].double().mean()),
                }
            )
        kl_by_resample.append([f["kl"] for f in figures])
        first = next((j for j, f in enumerate(figures) if meets_rule(f, config)), None)
        same += first is not None and abs(math.log(points[first]["alpha"] / points[chosen]["alpha"])) <= math.log(
            SAME_CHOICE
        )
    kl_by_resample = np.array(kl_by_resample)
    for j, p in enumerate(points):
        lo, hi = np.quantile(kl_by_resample[:, j], [0.025, 0.975])
        assert p["kl_ci"] == pytest.approx([lo, hi], rel=1e-6, abs=1e-9)
    assert front["met"] and front["stability"] == pytest.approx(same / BOOTSTRAP)
    assert 0 < front["stability"] < 1  # the resamples do move the choice here


def test_check_over_all_images_misses_only_beyond_the_interval():
    """check_layer against the intervals written out: KL's normal interval over images, the
    proportion's for agreement, R² below both min_r2 and the front's interval."""
    from gig.decompose import check_layer

    config = Config(max_kl=0.1, min_r2=0.9, min_top1_agreement=0.95)
    front = {"met": True, "alpha": 1.0, "points": [{"alpha": 1.0, "r2_ci": [0.88, 0.93]}]}
    good = {"kl": 0.12, "kl_se": 0.0103, "r2": 0.885, "top1_agreement": 0.94, "n_images": 100}
    assert check_layer(good, front, config) is None  # 0.12 − 1.96·0.0103 < 0.1; 0.885 ≥ 0.88; 0.94 + 0.0465 ≥ 0.95
    assert "mean KL" in check_layer({**good, "kl_se": 0.0101}, front, config)
    assert "R²" in check_layer({**good, "r2": 0.879}, front, config)
    assert check_layer({**good, "n_images": 2000}, front, config) is None  # 0.94 + 0.0104 ≥ 0.95
    assert "agreement" in check_layer({**good, "n_images": 5000}, front, config)  # 0.94 + 0.0066 < 0.95
    assert check_layer({**good, "kl": 5.0}, {**front, "met": False}, config) is None  # reported as unmet instead
    assert check_layer({**good, "kl": 5.0}, front, dataclasses.replace(config, max_kl=None)) is None


def test_stage_steps_a_layer_that_misses_over_all_images_and_recodes_it(tiny_bundle, tmp_path, monkeypatch):
    """A layer whose codes miss the rule over all images at the front's λ (the check is made to say
    so there: the rule itself is tested above) and meet it one step denser: the stage steps once
    and re-codes the layer; the stored codes are then the encoder's own at the new λ (computed
    here from scratch), the other layer keeps its λ, and the figures are the stored codes' own."""
    import gig.decompose
    from gig.collect import load_images
    from gig.concepts import load_dictionary
    from gig.decompose import CHECK_STEP, CHECK_STEPS, CodeReader, encoder_for, load_fidelity, load_front
    from gig.pipeline import Pipeline
    from gig.store import RunStore, load_json

    monkeypatch.setattr(
        gig.decompose,
        "check_layer",
        lambda figures, front, config: (
            "forced miss" if figures["alpha"] == front["alpha"] and front is fronts["block1"] else None
        ),
    )
    fronts = {}
    measure = gig.decompose.sparsity_front
    monkeypatch.setattr(
        gig.decompose, "sparsity_front", lambda images, layer, *a: fronts.setdefault(layer, measure(images, layer, *a))
    )
    config = Config(
        layers=["block1", "block2"],
        max_images=12,
        samples_per_image=8,
        min_cluster=4,
        batch_size=4,
        front_images=6,
        min_r2=0.5,
    )
    Pipeline(config, tmp_path / "run", model=tiny_bundle, progress=False).run(["collect", "concepts", "decompose"])
    store = RunStore.open(tmp_path / "run")
    fidelity = load_fidelity(store)["block1"]
    check = load_json(tmp_path / "run" / "decompose" / "check.json")["block1"]
    front = load_front(store)["block1"]
    assert check["steps"][0]["alpha"] == front["alpha"] and check["steps"][0]["miss"] == "forced miss"
    assert fidelity["check"] == {"steps": 1, "miss": None} and CHECK_STEPS >= 1
    # One step: the largest front point at least CHECK_STEP denser (to rounding: refined points lie exactly that apart).
    assert (
        fidelity["alpha"]
        == check["alpha"]
        == max(p["alpha"] for p in front["points"] if p["alpha"] <= front["alpha"] / CHECK_STEP * (1 + 1e-6))
    )
    assert load_fidelity(store)["block2"]["alpha"] == load_front(store)["block2"]["alpha"]
    handle = ModelHandle(tiny_bundle)
    source = open_source("embedded")
    by_id = {r.image_id: r for r in source.records}
    records = [by_id[i["image_id"]] for i in load_images(store)["images"]]
    pixels = torch.cat([b.pixels for b in iter_image_batches(source, records, handle, 4)])
    _, grids = handle.capture(pixels, ["block1"])
    X = grids["block1"].permute(0, 2, 3, 1).reshape(-1, grids["block1"].shape[1])
    V = load_dictionary(store, "block1")
    want = encoder_for(store.config, V, fidelity["alpha"]).encode(X)
    reader = CodeReader(store, "block1")
    got = torch.cat([reader.codes(r.image_id) for r in records])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert fidelity["l0_ratio"] == pytest.approx(float((got != 0).float().mean()))


def test_a_stage_killed_while_recoding_resumes_to_the_same_codes(tiny_bundle, tmp_path, monkeypatch):
    """The check steps a layer (made to miss, as above) and the stage dies after re-coding one of
    three shards: run again, it re-codes only what is left and ends with the shards and figures
    of a stage that was never interrupted."""
    import gig.decompose
    from gig.pipeline import Pipeline
    from gig.store import load_json, load_tensors

    fronts = {}
    measure = gig.decompose.sparsity_front
    monkeypatch.setattr(gig.decompose, "SHARD_IMAGES", 4)
    monkeypatch.setattr(
        gig.decompose, "sparsity_front", lambda images, layer, *a: fronts.setdefault(layer, measure(images, layer, *a))
    )
    monkeypatch.setattr(
        gig.decompose,
        "check_layer",
        lambda figures, front, config: "forced miss" if figures["alpha"] == front["alpha"] else None,
    )
    config = Config(layers=["block1"], max_images=12, samples_per_image=8, min_cluster=4, batch_size=4, front_images=6)
    Pipeline(config, tmp_path / "whole", model=tiny_bundle, progress=False).run(["collect", "concepts", "decompose"])

    recode, calls = gig.decompose._recode_shard, []

    def dies_on_the_second(*args, **kwargs):
        calls.append(args[-1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return recode(*args, **kwargs)

    monkeypatch.setattr(gig.decompose, "_recode_shard", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(config, tmp_path / "killed", model=tiny_bundle, progress=False).run(
            ["collect", "concepts", "decompose"]
        )
    monkeypatch.setattr(gig.decompose, "_recode_shard", recode)
    Pipeline(config, tmp_path / "killed", model=tiny_bundle, progress=False).run(["decompose"])
    for name in ("00000", "00001", "00002"):
        a = load_tensors(tmp_path / "whole" / "decompose" / "shards" / f"{name}.safetensors")
        b = load_tensors(tmp_path / "killed" / "decompose" / "shards" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    whole = load_json(tmp_path / "whole" / "decompose" / "fidelity.json")
    assert load_json(tmp_path / "killed" / "decompose" / "fidelity.json") == whole
    assert whole["block1"]["check"] == {"steps": 1, "miss": None}


def test_output_figures_through_the_folded_copy_equal_the_models_own(lite0):
    """The fronts' agreement and KL run through ``ModelHandle.measuring`` (batch norms folded,
    channels-last): on real photos and reconstructions at three distances from the grid, they
    equal the unmodified model's ``run_from`` with ``kl_from_original`` computed here, and the
    copy is made once per set of layers."""
    from gig.decompose import FrontImages, kl_from_original, output_fidelity

    handle = ModelHandle(lite0)
    source = open_source("embedded")
    pixels = next(iter(iter_image_batches(source, source.records[:4], handle, 4))).pixels
    layers = ["_blocks.8", "_blocks.15"]
    with torch.no_grad():
        logits, grids = handle.capture(pixels, layers)
    images = FrontImages([pixels], {k: [v] for k, v in grids.items()}, logits.argmax(1), logits.log_softmax(1))
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        grid = grids[layer]
        recons = [[grid + s * grid.std() * torch.randn(grid.shape, generator=g)] for s in (0.0, 0.3, 1.0)]
        agree, kl = output_fidelity(images, layer, handle, recons)
        for j, (recon,) in enumerate(recons):
            with torch.no_grad():
                want = handle.run_from(pixels, layer, recon)
            assert torch.equal(agree[j], want.argmax(1) == images.preds)
            torch.testing.assert_close(kl[j].float(), kl_from_original(images.log_probs, want), atol=2e-5, rtol=1e-3)
        assert kl[0].abs().max() < 1e-4 and kl[2].mean() > kl[1].mean() > kl[0].mean()
    assert handle.measuring(layers) is handle.measuring(layers)
