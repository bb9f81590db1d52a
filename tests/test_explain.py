"""Tests for gig.explain: new images explained with a finished run's concepts.

The independent answers: an image that *is* in the run, explained as if it were new, must give
back the run's own artefacts (the decompose stage's codes, the attribute stage's walk, the graph
stage's single-image graph), because explain reuses the stages' functions on the same inputs;
GIG completeness holds for a new image; the page loads in headless Chromium without a console
error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gig.decompose import CodeReader
from gig.errors import ImageLoadError
from gig.explain import explain, write_explanations
from gig.graph import build_graph
from gig.store import RunStore, load_json


def _run_photo(tiny_run, image_id: int) -> Path:
    """The file of one of the run's images."""
    info = load_json(tiny_run["run"] / "collect" / "images.json")
    path = next(i["path"] for i in info["images"] if i["image_id"] == image_id)
    return Path(path)


@pytest.fixture(scope="module")
def new_photo(tmp_path_factory) -> Path:
    """A photo from another source than the tiny run's (matplotlib's sample, not in the run)."""
    import matplotlib
    from PIL import Image

    path = tmp_path_factory.mktemp("new") / "grace.jpg"
    with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg") as im:
        im.convert("RGB").save(path)
    return path


@pytest.fixture(scope="module")
def explained(tiny_run, new_photo):
    return explain(tiny_run["run"], [new_photo], model=tiny_run["bundle"])


def test_an_image_of_the_run_gets_back_the_runs_codes_walk_and_graph(tiny_run) -> None:
    store = RunStore.open(tiny_run["run"])
    images = load_json(tiny_run["run"] / "collect" / "images.json")["images"]
    first = images[0]
    (e,) = explain(store, [_run_photo(tiny_run, first["image_id"])], target=first["target"], model=tiny_run["bundle"])
    for layer in store.config.layers:
        run_codes = CodeReader(store, layer).codes(first["image_id"])
        assert torch.allclose(e.codes[layer], run_codes, atol=1e-5), layer
    from gig.attribution import load_attributions

    data = load_attributions(store)
    row = int((data["image_id"] == first["image_id"]).nonzero())
    for layer in store.config.layers:
        assert torch.equal(e.walk[f"{layer}/top"], data[f"{layer}/top"][row])
        assert torch.allclose(e.walk[f"{layer}/score"], data[f"{layer}/score"][row], atol=1e-5)
    run_graph = build_graph(store, "image", image_id=first["image_id"], data=data, class_names=tiny_run["names"])
    assert [n["id"] for n in e.graph["nodes"]] == [n["id"] for n in run_graph["nodes"]]
    assert [(x["source"], x["target"]) for x in e.graph["edges"]] == [
        (x["source"], x["target"]) for x in run_graph["edges"]
    ]


def test_a_new_image_targets_its_prediction_and_its_graph_reads_its_walk(explained) -> None:
    (e,) = explained
    top = e.graph["layers"][-1]
    assert e.target == e.pred == int(e.probabilities.argmax())
    assert abs(float(e.probabilities.sum()) - 1.0) < 1e-5
    classes = [n for n in e.graph["nodes"] if n["layer"] == "classifier"]
    assert [n["class"] for n in classes] == [e.pred]
    assert e.graph["kind"] == "image" and e.graph["n_images"] == 1
    # the top-layer nodes are the walk's top concepts, with the walk's shares as importance,
    # and the edges into the class carry the same shares
    score = e.walk[f"{top}/score"]
    nodes = {n["concept"]: n["importance"] for n in e.graph["nodes"] if n["layer"] == top}
    assert set(nodes) == set(score.topk(len(nodes)).indices.tolist())
    for q, importance in nodes.items():
        assert importance == pytest.approx(float(score[q]), abs=1e-6)
    for edge in (x for x in e.graph["edges"] if x["target"] == f"class:{e.pred}"):
        assert edge["weight"] == pytest.approx(float(score[int(edge["source"].split(":")[1])]), abs=1e-6)


def test_target_explains_another_class(tiny_run, new_photo, explained) -> None:
    other = (explained[0].pred + 1) % 1000
    (e,) = explain(tiny_run["run"], [new_photo], target=other, model=tiny_run["bundle"])
    assert e.target == other and e.pred == explained[0].pred
    assert [n["class"] for n in e.graph["nodes"] if n["layer"] == "classifier"] == [other]


def test_a_missing_file_is_named(tiny_run, tmp_path) -> None:
    with pytest.raises(ImageLoadError, match="nope.jpg"):
        explain(tiny_run["run"], [tmp_path / "nope.jpg"], model=tiny_run["bundle"])


def test_page_loads_in_chromium_without_errors(explained, tiny_run, tmp_path, browser) -> None:
    from browser_page import Page

    index = write_explanations(tiny_run["run"], explained, tmp_path / "explain", model=tiny_run["bundle"])
    summary = load_json(tmp_path / "explain" / "explanations.json")
    assert summary["images"][0]["graph"] == "image_0.json"
    graph = load_json(tmp_path / "explain" / "image_0.json")
    assert graph == json.loads(json.dumps(explained[0].graph))
    assert (tmp_path / "explain" / "image_0.svg").is_file() and (tmp_path / "explain" / "image_0.png").is_file()
    page = Page(browser, index)
    try:
        page.page.wait_for_timeout(300)
        page.shot("explain_01_loaded")
        assert page.errors == []
        drawn = page.page.evaluate("window.gigReport.cy.nodes().map(n => n.id()).sort()")
        assert drawn == sorted(n["id"] for n in graph["nodes"])
        own = page.page.evaluate("document.querySelectorAll('img.mini.own').length")
        assert own == sum(len(t) for t in [explained[0].walk[f"{layer}/top"] for layer in graph["layers"]])
    finally:
        page.page.close()


def test_cli_explain(tiny_run, new_photo, tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    import gig.models
    from gig.cli import app

    loads = []
    real_load = gig.models.load_model
    monkeypatch.setattr(gig.models, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))

    missing = CliRunner().invoke(app, ["explain", str(tiny_run["run"]), str(tmp_path / "gone.png")])
    assert missing.exit_code == 2 and "gone.png" in " ".join(missing.output.split())
    assert loads == []  # refused before the model loads
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["explain", str(tiny_run["run"]), str(new_photo), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout[result.stdout.index("{") :])
    assert printed == load_json(out / "explanations.json")
    assert printed["images"][0]["target"] == printed["images"][0]["pred"]
    assert (out / "index.html").is_file()
    assert len(loads) == 1  # the model is loaded once for the explanations and their page (issue 25)


def _counting(monkeypatch, photo: Path) -> dict:
    """Count model loads, handles built, preprocessings of ``photo`` and attribute shards opened."""
    import gig.artefacts
    import gig.explain
    import gig.hooks
    import gig.models

    counts = {"loads": 0, "handles": 0, "gradient copies": 0, "preprocessed": 0, "shards": 0}
    photos: list = []

    def count(key, real):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return real(*args, **kwargs)

        return wrapper

    real_load_rgb = gig.explain.load_rgb
    monkeypatch.setattr(gig.explain, "load_rgb", lambda path: photos.append(real_load_rgb(path)) or photos[-1])
    monkeypatch.setattr(gig.models, "load_run_model", count("loads", gig.models.load_run_model))
    monkeypatch.setattr(gig.hooks.ModelHandle, "__init__", count("handles", gig.hooks.ModelHandle.__init__))
    monkeypatch.setattr(
        gig.hooks.ModelHandle, "for_gradients", count("gradient copies", gig.hooks.ModelHandle.for_gradients)
    )
    real_preprocess = gig.models.ModelBundle.preprocess

    def preprocess(self, image):
        counts["preprocessed"] += any(image is p for p in photos)
        return real_preprocess(self, image)

    monkeypatch.setattr(gig.models.ModelBundle, "preprocess", preprocess)
    real_open = gig.artefacts.open_tensors  # the attribute shards' reader (gig.artefacts.iter_attributions)

    def open_tensors(path):
        counts["shards"] += "attribute" in Path(path).parts
        return real_open(path)

    monkeypatch.setattr(gig.artefacts, "open_tensors", open_tensors)
    return counts


def test_cli_explain_of_one_image_loads_the_model_once_and_reads_no_shard(
    tiny_run, new_photo, tmp_path, monkeypatch
) -> None:
    """Issue 25: `gig explain` of one new image loaded the model twice, built two handles,
    preprocessed the image twice and read every attribute shard twice for the page's concept
    cards. Now: one load, one handle (and the one folded copy GIG runs on, made from it), one
    preprocessing, and no shard: the cards' run-wide figures come from the graph stage's run sums."""
    from typer.testing import CliRunner

    from gig.cli import app

    counts = _counting(monkeypatch, new_photo)
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["explain", str(tiny_run["run"]), str(new_photo), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "index.html").is_file()
    assert counts == {"loads": 1, "handles": 2, "gradient copies": 1, "preprocessed": 1, "shards": 0}


def test_notebook_explain_and_save_reuse_the_runs_model_and_handles(tiny_run, new_photo, tmp_path, monkeypatch) -> None:
    """``gig.open(RUN).explain(image).save(DIR)``, twice: the run's one model, handle and folded
    copy serve both explanations and both pages."""
    import gig

    counts = _counting(monkeypatch, new_photo)
    run = gig.open(tiny_run["run"], model=tiny_run["bundle"])
    for i in range(2):
        assert run.explain(new_photo).save(tmp_path / f"page{i}").is_file()
    assert counts == {"loads": 0, "handles": 2, "gradient copies": 1, "preprocessed": 2, "shards": 0}


def test_a_run_without_run_sums_still_explains_reading_the_shards(tiny_run, new_photo, tmp_path, monkeypatch) -> None:
    """A run whose graph stage ran before the run sums existed: the page reads the attribute
    shards (importances, then the shown concepts' edges) and shows the same concept cards."""
    import re
    import shutil

    from gig.graph import RUN_SUMS

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run, ignore=shutil.ignore_patterns("report", "evaluate"))
    (run / "graph" / RUN_SUMS).unlink()
    explained = explain(run, [new_photo], model=tiny_run["bundle"])
    counts = _counting(monkeypatch, new_photo)
    old = write_explanations(run, explained, tmp_path / "old", model=tiny_run["bundle"])
    assert counts["shards"] == 2 * len(list((run / "attribute" / "shards").glob("*.safetensors")))  # two passes
    monkeypatch.undo()
    new = write_explanations(tiny_run["run"], explained, tmp_path / "new", model=tiny_run["bundle"])

    def cards(index: Path) -> dict:
        text = index.read_text(encoding="utf-8")
        data = json.loads(re.search(r'<script type="application/json" id="gig-data">(.*?)</script>', text, re.S)[1])
        return {
            node: {k: card[k] for k in ("importance", "rank", "parents", "children")}
            for node, card in data["concepts"].items()
        }

    assert cards(old) == cards(new) and cards(new)
