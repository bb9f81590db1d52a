"""The run as a whole: end to end from the CLI, resume after an interruption, recompute only
what a changed setting touches, bad images skipped and counted."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import gig.attribution
import gig.collect
import gig.decompose
from gig.cli import app
from gig.config import Config
from gig.pipeline import Pipeline
from gig.store import RunStore, load_json, load_tensors

SMALL = dict(
    max_images=4,
    layers=["_blocks.11", "_blocks.15"],
    gig_tol=0.05,
    top_k=3,
    batch_size=2,
    internal_batch_size=24,
    samples_per_image=6,
    min_cluster=2,
)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = out / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    result = CliRunner().invoke(app, ["run", "--out", str(out / "r"), "--config", str(cfg), "--gig-tol", "0.04"])
    assert result.exit_code == 0, result.output
    return out / "r"


def test_inspect_json_keys(finished_run):
    result = CliRunner().invoke(app, ["inspect", str(finished_run), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert [l["name"] for l in info["layers"]] == SMALL["layers"]
    for layer in info["layers"]:
        assert set(layer) >= {"name", "n_pfv", "n_concepts", "rel_error", "r2", "l0_ratio", "top1_agreement"}
        assert layer["n_pfv"] == 4 * 6 and layer["n_concepts"] == 12
        assert 0 <= layer["l0_ratio"] <= 1 and 0 <= layer["top1_agreement"] <= 1
    assert set(info["completeness"]) == {"median", "p95"} and info["completeness"]["median"] >= 0
    assert info["images"] == {"used": 4, "skipped": 0}
    assert info["graph"].endswith(".json")
    # Every attribution's step count and error estimate, per path kind (--gig-tol reached the config).
    gig = info["gig"]
    assert gig["tol"] == 0.04 and set(gig["by_source"]) == {"_blocks.15->class", "_blocks.11->_blocks.15"}
    assert gig["by_source"]["_blocks.15->class"]["n"] == 4 and gig["by_source"]["_blocks.11->_blocks.15"]["n"] == 12
    assert gig["evaluations_mean"] >= 17 and 0 <= gig["error_median"] <= gig["error_max"]
    from gig.attribution import load_attributions

    data = load_attributions(RunStore.open(finished_run))
    flags = torch.cat([data["_blocks.15/class_converged"].flatten(), data["_blocks.11/converged"].flatten()])
    assert gig["unconverged"] == pytest.approx(1 - flags.float().mean().item())
    capped = torch.cat([data["_blocks.15/class_steps"].flatten(), data["_blocks.11/steps"].flatten()]) == 513
    assert bool((flags.bool() | capped).all())  # a target stops early only when it converged
    table = CliRunner().invoke(app, ["inspect", str(finished_run)])
    assert "GIG accuracy (tolerance 0.04)" in table.output


def test_graph_json_is_consistent(finished_run):
    index = load_json(finished_run / "graph" / "index.json")
    for name in list(index["files"]["class"].values()) + [index["files"]["global"]]:
        graph = load_json(finished_run / "graph" / name)
        assert graph["schema"] == "gig.graph/1"
        ids = {n["id"] for n in graph["nodes"]}
        assert len(ids) == len(graph["nodes"])
        for edge in graph["edges"]:
            assert edge["source"] in ids and edge["target"] in ids
        levels = {n["layer"]: n["level"] for n in graph["nodes"]}
        for edge in graph["edges"]:  # edges point upwards, one layer at a time
            src, dst = edge["source"], edge["target"]
            assert (
                levels[dst.rsplit(":", 1)[0] if not dst.startswith(("class:", "logit")) else "classifier"]
                == levels[src.rsplit(":", 1)[0]] + 1
            )
    for c in index["classes"]:
        assert (finished_run / "graph" / f"class_{c}.png").stat().st_size > 1000
        assert (finished_run / "graph" / f"class_{c}.svg").exists()


def test_class_graph_edges_are_flows_of_the_logit_change(finished_run):
    """A single-image graph: an edge's weight is the upper node's importance times the share of
    its readout change that the lower concept explains (GIG / Δg), the importances are those
    flows summed, and the flows into a node add up to its importance (completeness)."""
    from gig.attribution import load_attributions
    from gig.graph import build_graph, edge_weights

    store = RunStore.open(finished_run)
    data = load_attributions(store)
    image_id = int(data["image_id"][0])
    graph = build_graph(store, "image", image_id=image_id)
    row = 0
    lower, upper = SMALL["layers"]
    share = data[f"{lower}/gig"][row] / data[f"{lower}/delta"][row][:, None]
    targets = data[f"{lower}/targets"][row].tolist()
    importance = data[f"{upper}/importance"][row]
    # The top layer's importances are the class-logit shares: they sum to 1 up to the residual.
    class_share = data[f"{upper}/class_gig"][row] / data[f"{upper}/class_delta"][row]
    torch.testing.assert_close(data[f"{upper}/score"][row], class_share)
    n_checked = 0
    for edge in graph["edges"]:
        if edge["target"].startswith(upper + ":"):
            t = int(edge["target"].rsplit(":", 1)[1])
            q = int(edge["source"].rsplit(":", 1)[1])
            j = targets.index(t)
            assert edge["weight"] == pytest.approx(float(importance[j] * share[j, q]), rel=1e-5)
            n_checked += 1
    assert n_checked > 0
    flows = edge_weights(data, torch.tensor([row]), SMALL["layers"])[lower]  # (K_upper, K_lower)
    torch.testing.assert_close(flows.sum(0), data[f"{lower}/score"][row], rtol=1e-5, atol=1e-6)
    residual = data[f"{lower}/residual"][row] / data[f"{lower}/delta"][row]
    for j, t in enumerate(targets):  # Σ_q flow(q → t) = I[t] · (1 + relative residual)
        assert float(flows[t].sum()) == pytest.approx(float(importance[j] * (1 + residual[j])), rel=1e-4, abs=1e-6)
    assert set(graph["edge_rule_agreement"]) == {"share", "flow-l1"}


def test_unknown_layer_is_a_clear_cli_error(tmp_path):
    result = CliRunner().invoke(
        app, ["run", "--out", str(tmp_path / "r"), "--layer", "_blocks.99", "--max-images", "1"]
    )
    assert result.exit_code == 2
    assert "_blocks.99" in result.output and "closest" in result.output


def test_bad_gig_settings_fail_before_any_compute(tmp_path):
    with pytest.raises(ValueError, match="gig_tol"):
        Config(gig_tol=0)
    with pytest.raises(ValueError, match="n_steps"):
        Config(n_steps=-4)
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "r"), "--gig-tol", "2"])
    assert result.exit_code == 2 and "gig_tol" in result.output
    assert not (tmp_path / "r").exists()  # refused before the run directory or the model


def test_layers_command_lists_shapes():
    result = CliRunner().invoke(app, ["layers", "efficientnet-lite0", "--json"])
    assert result.exit_code == 0
    layers = {l["name"]: l for l in json.loads(result.stdout)}
    assert layers["_blocks.8"]["grid"] == [112, 14, 14]


def test_interrupted_stage_resumes_and_matches(tmp_path, monkeypatch):
    monkeypatch.setattr(gig.collect, "SHARD_IMAGES", 2)
    monkeypatch.setattr(gig.decompose, "SHARD_IMAGES", 2)
    config = Config(**SMALL)
    clean = Pipeline(config, tmp_path / "clean", progress=False)
    clean.collect()

    calls = {"n": 0}
    real = gig.collect._collect_shard

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gig.collect, "_collect_shard", flaky)
    pipe = Pipeline(Config(**SMALL), tmp_path / "resumed", progress=False)
    with pytest.raises(KeyboardInterrupt):
        pipe.collect()
    assert not pipe.store.is_done("collect")
    assert pipe.store.shard_done("collect", "00000") and not pipe.store.shard_done("collect", "00001")
    pipe.collect()  # resumes: only the second shard runs
    assert calls["n"] == 3 and pipe.store.is_done("collect")
    for layer in SMALL["layers"]:
        a = load_tensors(clean.store.root / "collect" / f"{layer}.safetensors")
        b = load_tensors(pipe.store.root / "collect" / f"{layer}.safetensors")
        for key in a:
            assert torch.equal(a[key], b[key]), key

    # Attribution interrupted after its first shard also resumes there.
    pipe.concepts()
    pipe.decompose()
    walks = {"n": 0}
    real_walk = gig.attribution.walk

    def flaky_walk(*args, **kwargs):
        walks["n"] += 1
        if walks["n"] == 2:
            raise KeyboardInterrupt
        return real_walk(*args, **kwargs)

    monkeypatch.setattr(gig.attribution, "walk", flaky_walk)
    monkeypatch.setattr(gig.collect, "SHARD_IMAGES", 2)
    with pytest.raises(KeyboardInterrupt):
        pipe.attribute()
    first = (pipe.store.root / "attribute" / "shards" / "00000.safetensors").stat().st_mtime_ns
    pipe.attribute()
    assert walks["n"] == 3  # one batch of the second shard left to do
    assert (pipe.store.root / "attribute" / "shards" / "00000.safetensors").stat().st_mtime_ns == first


def test_changed_setting_recomputes_only_dependent_stages(finished_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    before = RunStore.open(run).manifest()["stages"]
    config = Config.load(run / "config.yaml")
    config.edges_per_node = 2  # a graph-only setting
    pipe = Pipeline(config, run, progress=False)
    assert all(pipe.store.is_done(s) for s in ("collect", "concepts", "decompose", "attribute"))
    assert not pipe.store.is_done("graph")
    pipe.run()
    after = pipe.store.manifest()["stages"]
    for stage in ("collect", "concepts", "decompose", "attribute"):
        assert after[stage]["finished"] == before[stage]["finished"]
    assert after["graph"]["hash"] != before["graph"]["hash"]
    config.top_k = 2  # attribution setting: attribute and graph go stale, not decompose
    pipe = Pipeline(config, run, progress=False)
    assert pipe.store.is_done("decompose") and not pipe.store.is_done("attribute")


def test_bad_images_are_skipped_and_counted(tmp_path):
    from gig.images import EmbeddedSource

    src = EmbeddedSource()
    folder = tmp_path / "imgs"
    folder.mkdir()
    for record in src.records[:3]:
        src.load(record).save(folder / f"{record.path.split(':')[1]}.jpg")
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    Image.new("L", (40, 30), 128).save(folder / "gray.png")  # odd but convertible
    config = Config(**{**SMALL, "images": str(folder), "max_images": None})
    pipe = Pipeline(config, tmp_path / "run", progress=False)
    with pytest.warns(UserWarning, match="broken.jpg"):
        pipe.collect()
    summary = pipe.store.summary("collect")
    assert summary["images_used"] == 4 and summary["images_skipped"] == 1
    from gig.collect import load_images

    assert load_images(pipe.store)["skipped"][0]["path"].endswith("broken.jpg")


def test_default_config_end_to_end_on_two_images(tmp_path):
    """`gig run` with the defaults (model, four layers, steps) on the embedded photos."""
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "r"), "--max-images", "2"])
    assert result.exit_code == 0, result.output
    assert "done" in result.output and str((tmp_path / "r").resolve()) in result.output.replace("\n", "")
    store = RunStore.open(tmp_path / "r")
    assert all(store.is_done(s) for s in ("collect", "concepts", "decompose", "attribute", "graph"))
    assert Config().layers is None  # the model's defaults, resolved and saved by the run
    assert store.config.layers == ["_blocks.4", "_blocks.8", "_blocks.11", "_blocks.15"]


def test_user_dictionary_channel_basis(tmp_path):
    config = Config(**{**SMALL, "max_images": 2, "dictionaries": {"_blocks.15": "channels"}})
    pipe = Pipeline(config, tmp_path / "r", progress=False)
    pipe.collect()
    pipe.concepts()
    V = load_tensors(pipe.store.root / "concepts" / "_blocks.15.safetensors")["V"]
    assert torch.equal(V, torch.eye(320))
    assert pipe.store.summary("concepts")["_blocks.15"]["source"] == "channels"
    assert pipe.store.summary("concepts")["_blocks.11"]["source"] == "bisecting-kmeans"


def test_imagefolder_labels_follow_the_model_classes(tmp_path):
    """Synset and class-name folders get the model's class, whatever their sorted position;
    a folder naming no class is unlabelled, and ``target: label`` then refuses before compute."""
    root = tmp_path / "photos"
    for folder in ("n01443537", "tench", "zz_mystery"):
        (root / folder).mkdir(parents=True)
        Image.new("RGB", (40, 30), (120, 80, 40)).save(root / folder / "a.png")
    with pytest.warns(UserWarning, match="zz_mystery"):
        pipe = Pipeline(Config(images=str(root), layers=["_blocks.15"]), tmp_path / "r", progress=False)
    assert {r.label_name: r.label for r in pipe.source.records} == {"n01443537": 1, "tench": 0, "zz_mystery": None}
    with pytest.raises(ValueError, match="1 of 3 images have no model class"):
        with pytest.warns(UserWarning):
            Pipeline(Config(images=str(root), layers=["_blocks.15"], target="label"), tmp_path / "r2", progress=False)


def test_step_cap_miss_counts_the_attributions(finished_run):
    """The step-cap sentence says how many attributions hit the cap, not only a share rounded to
    one decimal (5 of 12 800 printed as "0.0%" before); none, no sentence."""
    from gig.summary import missed_targets, summarize

    info = summarize(finished_run)
    store = RunStore.open(finished_run)
    capped = {**info, "gig": {**info["gig"], "n": 12800, "unconverged": 5 / 12800}}
    assert any(
        m.startswith("5 of 12,800 GIG attributions (0.04%) hit the step cap") for m in missed_targets(store, capped)
    )
    clean = {**info, "gig": {**info["gig"], "unconverged": 0.0}}
    assert not any("step cap" in m for m in missed_targets(store, clean))


def test_run_ends_with_what_it_misses(finished_run):
    """`gig run` (here resuming a finished run) ends with the missed targets `gig inspect` lists,
    so a user sees them without a second command."""
    from gig.summary import summarize

    missed = summarize(finished_run)["missed"]
    result = CliRunner().invoke(app, ["run", "--out", str(finished_run)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # rich wraps long lines
    assert missed, "the small run misses K = 8·C: the test needs a miss to look for"
    assert f"{len(missed)} target(s) missed" in output
    assert all(" ".join(m.split())[:60] in output for m in missed)


def test_fixed_grid_missing_completeness_is_a_miss(finished_run):
    """A fixed grid whose attributions miss most of the change (as on a model with a LayerNorm
    after the layer, where the change lies near α = 0) is named, with what to do; error control
    within its tolerance is not."""
    import dataclasses

    from gig.summary import missed_targets, summarize

    info = summarize(finished_run)
    store = RunStore.open(finished_run)
    store.config = dataclasses.replace(store.config, n_steps=16)
    broken = {**info, "completeness": {**info["completeness"], "p95": 0.998}}
    assert any(
        m.startswith("GIG completeness residual p95 0.9980 above the tolerance") and "n_steps 16" in m
        for m in missed_targets(store, broken)
    )
    fine = {**info, "completeness": {**info["completeness"], "p95": 0.5 * store.config.gig_tol}}
    assert not any("completeness" in m for m in missed_targets(store, fine))


def test_inspect_names_every_missed_target(finished_run, tmp_path):
    """`missed` has one sentence per figure past its threshold, read back from the layer table,
    and one per stage that is not done."""
    from gig.decompose import check_layer
    from gig.summary import MAX_L0_RATIO, summarize

    info = summarize(finished_run)
    config = Config.load(finished_run / "config.yaml")
    for layer in info["layers"]:
        dense = any(m.startswith(f"{layer['name']}: dense codes") for m in info["missed"])
        assert dense == (layer["l0_ratio"] > MAX_L0_RATIO)
        # The KL rule: a figure over all images misses only beyond its interval, as the check found.
        checked = any(
            m.startswith(f"{layer['name']}: over all 4 images the codes miss the rule") for m in info["missed"]
        )
        assert checked == bool(layer["check"]["miss"])
        assert (
            layer["check"]["miss"]
            == check_layer(
                {k: layer[k] for k in ("kl", "kl_se", "r2", "top1_agreement", "n_images")},
                {"alpha": layer["front_alpha"], "points": layer["front"], "met": layer["rule_met"]},
                config,
            )
            or layer["check"]["steps"] > 0
        )
        unmet = any(m.startswith(f"{layer['name']}: no λ on the sparsity–fidelity front") for m in info["missed"])
        assert unmet == (not layer["rule_met"])
        # The front printed by inspect is the one saved by the stage, chosen λ included.
        assert layer["front"] and any(p["alpha"] == layer["alpha"] for p in layer["front"])
        few = any(m.startswith(f"{layer['name']}: K = ") for m in info["missed"])
        assert few == (layer["n_concepts"] < config.concepts_per_channel * layer["channels"])
    assert not any(m.startswith("stage ") for m in info["missed"])
    partial = tmp_path / "partial"
    Pipeline(Config(**SMALL), partial, progress=False).collect()
    missed = summarize(partial)["missed"]
    assert [m for m in missed if m.startswith("stage ")] == [
        "stage concepts has not run",
        "stage decompose has not run",
        "stage attribute has not run",
        "stage graph has not run",
    ]
