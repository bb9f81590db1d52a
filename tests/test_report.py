"""Tests for gig.report: the offline HTML report (builder, escaping, CLI) and, in a real headless
browser (Debian chromium driven by Playwright; installed by .ci/install-browser), the graph viewer.

One tiny run (6 embedded photos saved under hostile file names, 2 layers, 4 GIG steps, top-3,
class names carrying HTML and script) is built once for the module; browser tests skip cleanly
when no browser is installed. Screenshots go to tests/report_browser/screenshots/ (ignored by
git), or to $GIG_REPORT_SCREENSHOTS.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gig.config import Config
from gig.report import ReportOptions, build_report, markdown_blocks, safe_json
from gig.report.builder import _evaluation

HOSTILE = '<img src=x onerror="window.__xss=1"></script><script>window.__xss=2</script>&amp;'
#: The last is not valid UTF-8 (byte 0xff), as file names from other systems can be.
HOSTILE_FILES = ["<svg onload=window.__xss=3>", 'quote" onmouseover="window.__xss=4', "plain & simple",
                 b"latin\xff1".decode("utf-8", "surrogateescape")]
LAYERS = ["_blocks.8", "_blocks.15"]
SCREENSHOTS = Path(os.environ.get("GIG_REPORT_SCREENSHOTS", Path(__file__).parent / "report_browser" / "screenshots"))


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """A finished tiny run whose class names and image file names are hostile, with a fake
    evaluation folder, and its report (default options)."""
    from gig.images import EmbeddedSource
    from gig.models import load_model
    from gig.pipeline import Pipeline

    root = tmp_path_factory.mktemp("report")
    photos = root / "photos"
    photos.mkdir()
    embedded = EmbeddedSource()
    for i, record in enumerate(embedded.records[:6]):
        stem = HOSTILE_FILES[i] if i < len(HOSTILE_FILES) else record.path.split(":")[1]
        image = embedded.load(record)
        image.thumbnail((256, 256))
        image.save(photos / f"{i}_{stem}.png")
    bundle = load_model("efficientnet-lite0")
    names = [f"{n} {HOSTILE}" for n in bundle.class_names]
    bundle.class_names = names
    config = Config(images=str(photos), layers=list(LAYERS), n_steps=4, top_k=3, samples_per_image=8,
                    calibration_size=200, lasso_max_iter=100)
    run = root / "run"
    started = time.perf_counter()
    Pipeline(config, run, model=bundle, progress=False).run()
    evaluate = run / "evaluate"
    evaluate.mkdir()
    (evaluate / "summary.json").write_text(json.dumps(
        {"c_deletion": {"_blocks.8": {"ours": 0.31, "kmeans": 0.25}, "_blocks.15": {"ours": 0.42, "kmeans": 0.4}},
         "n_images": 6, "note": HOSTILE}))
    (evaluate / "tables.md").write_text(f"# Results\n\n| method | AUC |\n| --- | --- |\n| ours | 0.5 |\n| {HOSTILE} | 0.1 |\n")
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(evaluate / "curve.png")
    (evaluate / "settings.json").write_text(json.dumps({"n_images": 6, "timings": {"total_s": 1.5}}))
    (evaluate / "parts").mkdir()
    (evaluate / "parts" / "00000.json").write_text("{}")
    index = build_report(run, model=bundle)
    return {"run": run, "index": index, "names": names, "bundle": bundle,
            "seconds": time.perf_counter() - started}


@pytest.fixture(scope="module")
def page_data(tiny_run) -> dict:
    text = tiny_run["index"].read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="gig-data">(.*?)</script>', text, re.S)
    assert match, "the data block is missing"
    return json.loads(match.group(1))


# ------------------------------------------------------------------------------ builder
def test_report_files_are_offline(tiny_run) -> None:
    index = tiny_run["index"]
    assert index == tiny_run["run"] / "report" / "index.html"
    text = index.read_text(encoding="utf-8")
    out = index.parent
    for name in ("cytoscape.min.js", "report.js", "report.css", "cytoscape.LICENSE"):
        assert (out / "static" / name).is_file()
    assert (out / "static" / "cytoscape.min.js").read_text()[:200].count("Copyright") == 1  # licence header kept
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), "no CDN or remote reference"
    for ref in re.findall(r'(?:src|href)="([^"#][^"]*)"', text):
        if not ref.startswith("data:"):
            assert (out / ref).is_file(), f"missing {ref}"
    assert "Content-Security-Policy" in text


def test_graph_json_is_embedded_verbatim(tiny_run, page_data) -> None:
    from gig.graph import build_graph
    from gig.store import RunStore

    run = tiny_run["run"]
    index = json.loads((run / "graph" / "index.json").read_text())
    by_key = {g["key"]: g for g in page_data["graphs"]}
    for c, file in index["files"]["class"].items():
        entry = by_key[f"class:{c}"]
        assert entry["file"] == file
        assert entry["graph"] == json.loads((run / "graph" / file).read_text())
    assert by_key["global"]["graph"] == json.loads((run / "graph" / "global.json").read_text())
    if index["files"]["shared"]:
        shared = [g for g in page_data["graphs"] if g["file"] == index["files"]["shared"]]
        assert shared and shared[0]["graph"] == json.loads((run / "graph" / "shared.json").read_text())
    images = [g for g in page_data["graphs"] if g["mode"] == "image"]
    assert images, "single-image graphs are included"
    store = RunStore.open(run)
    first = images[0]
    assert first["graph"] == json.loads(json.dumps(build_graph(store, "image", image_id=first["image_id"],
                                                               class_names=tiny_run["names"])))
    # every concept node of every graph has a card with its exemplar crops
    for g in page_data["graphs"]:
        for node in g["graph"]["nodes"]:
            if node["layer"] != "classifier":
                card = page_data["concepts"][node["id"]]
                assert card["exemplars"] and all(e["url"] for e in card["exemplars"])
                assert [e["s"] for e in card["exemplars"]] == node["exemplars"][: len(card["exemplars"])]


def test_hostile_names_never_become_markup(tiny_run, page_data) -> None:
    text = tiny_run["index"].read_text(encoding="utf-8")
    for bad in ("<img src=x", "<script>window.__xss", "<svg onload", 'onmouseover="window'):
        assert bad not in text
    assert html.escape(HOSTILE, quote=False).split(" ")[0] in text  # shown as text somewhere (escaped)
    assert text.count("<script") == 3  # the JSON block and our two scripts, nothing else
    data_block = text.split('id="gig-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in data_block and ">" not in data_block and "&" not in data_block
    names = set(page_data["classNames"].values())
    assert any(HOSTILE in n for n in names)
    paths = [i["path"] for i in page_data["images"].values()]
    assert any("<svg onload" in p for p in paths)
    assert any("latin\ufffd1" in p for p in paths)  # the undecodable byte shown as U+FFFD


def test_atlas_and_localisation_content(tiny_run, page_data) -> None:
    text = tiny_run["index"].read_text(encoding="utf-8")
    cards = re.findall(r'<article class="concept-card"[^>]*data-id="([^"]+)"', text)
    for layer in LAYERS:
        K = page_data["run"]["K"][layer]
        assert len([c for c in cards if c.startswith(layer + ":")]) == min(30, K)
    loc = re.findall(r'<article class="loc" id="loc-(\d+)"', text)
    assert len(loc) == len(page_data["images"]) == 6
    assert len(re.findall(r'class="heat gig"', text)) == 6 * len(LAYERS) * 3
    assert "Reconstruction" in text and "completeness" in text


def test_evaluation_section(tiny_run) -> None:
    text = tiny_run["index"].read_text(encoding="utf-8")
    section = text.split('id="evaluation"', 1)[1]
    assert "tables.md" in section and "curve.png" in section and "c_deletion" in section
    assert "kmeans" in section and "0.420" in section
    assert "settings.json" in section and "total_s" in section and "parts/" in section
    assert "00000.json" not in section
    assert "<img src=x" not in section
    assert _evaluation(tiny_run["run"] / "no-such-folder", None) is None


def test_read_codes_matches_code_reader(tiny_run) -> None:
    import torch

    from gig.decompose import CodeReader, from_sparse_rows
    from gig.report.builder import read_codes
    from gig.store import RunStore, load_tensors

    store = RunStore.open(tiny_run["run"])
    for layer in LAYERS:
        reader = CodeReader(store, layer)
        ids = reader.image_ids()[::2]
        got = read_codes(store, layer, ids)
        # Independently: whole shards read eagerly, split into images by their row pointers.
        for path in sorted((store.root / "decompose" / "shards").glob("*.safetensors")):
            t = load_tensors(path)
            dense = from_sparse_rows(t[f"{layer}/indptr"], t[f"{layer}/indices"], t[f"{layer}/values"], reader.K)
            shard_ids = t["image_id"].tolist()
            per_image = dense.shape[0] // len(shard_ids)
            for j, image_id in enumerate(shard_ids):
                if image_id in got:
                    assert torch.equal(got[image_id], dense[j * per_image : (j + 1) * per_image])


def test_safe_json_escapes_and_round_trips() -> None:
    data = {"a": "</script><b>&\u2028", "n": float("nan"), "list": [1, 2.5, float("inf")]}
    text = str(safe_json(data))
    assert not set("<>&") & set(text)
    assert json.loads(text) == {"a": "</script><b>&\u2028", "n": None, "list": [1, 2.5, None]}


def test_markdown_blocks() -> None:
    blocks = markdown_blocks("# Title\n\nsome text\nmore\n\n| a | b |\n|---|:--:|\n| 1 | `2` |\n| x | **y** |\ntail")
    assert blocks[0] == {"type": "heading", "text": "Title"}
    assert blocks[1] == {"type": "text", "text": "some text more"}
    assert blocks[2] == {"type": "table", "columns": ["a", "b"], "rows": [["1", "2"], ["x", "y"]]}
    assert blocks[3] == {"type": "text", "text": "tail"}


@pytest.fixture(scope="module")
def single_file_report(tiny_run, tmp_path_factory) -> Path:
    """The report built again through the CLI: one file, 2 atlas concepts per layer, 1 image."""
    from typer.testing import CliRunner

    from gig.cli import app

    out = tmp_path_factory.mktemp("single")
    result = CliRunner().invoke(app, ["report", str(tiny_run["run"]), "--out", str(out), "--atlas-per-layer", "2",
                                      "--n-images", "1", "--shared-classes", "0", "--single-file"])
    assert result.exit_code == 0, result.output
    return out / "index.html"


def test_cli_single_file_and_caps(single_file_report) -> None:
    out = single_file_report.parent
    assert sorted(p.name for p in out.iterdir()) == ["index.html"]
    text = single_file_report.read_text(encoding="utf-8")
    assert 'src="img/' not in text and 'src="static/' not in text
    assert len(re.findall(r'<article class="concept-card"', text)) == 2 * len(LAYERS)
    assert len(re.findall(r'<article class="loc"', text)) == 1
    assert "<img src=x" not in text and "<script>window" not in text
    assert text.count("</script>") == 3  # the data block and the two inlined scripts


def test_cli_errors_cleanly(tmp_path) -> None:
    from typer.testing import CliRunner

    from gig.cli import app

    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a gig run directory" in " ".join(result.output.split())


# ------------------------------------------------------------------------------ browser
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    for candidate in (os.environ.get("GIG_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (.ci/install-browser)",
                                   exc_type=ImportError)
    executable = _chromium()
    if executable is None:
        pytest.skip("no chromium found (.ci/install-browser installs Debian's)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A page of the report with its console errors collected."""

    def __init__(self, browser, index: Path):
        self.page = browser.new_page(viewport={"width": 1400, "height": 950})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.errors.append(f"dialog: {d.message}"), d.dismiss()))
        self.page.goto(index.resolve().as_uri(), wait_until="load")
        self.page.wait_for_function("document.body.getAttribute('data-graph-ready')", timeout=15000)

    def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))

    def node_point(self, node_id: str) -> tuple[float, float]:
        p = self.page.evaluate("""id => { const n = window.gigReport.cy.getElementById(id); const p = n.renderedPosition();
            const r = document.getElementById('cy').getBoundingClientRect(); return [r.left + p.x, r.top + p.y]; }""", node_id)
        return p[0], p[1]


@pytest.fixture(scope="module")
def page(browser, tiny_run):
    p = Page(browser, tiny_run["index"])
    yield p
    p.page.close()


def test_browser_loads_without_errors_and_draws_the_json(page, page_data) -> None:
    page.page.wait_for_timeout(300)
    page.shot("01_loaded")
    assert page.errors == []
    assert page.page.evaluate("window.__xss") is None
    for entry in page_data["graphs"]:
        assert page.page.evaluate("key => window.gigReport.draw(key)", entry["key"])
        drawn = page.page.evaluate("""() => ({counts: window.gigReport.counts(),
            nodes: window.gigReport.cy.nodes().map(n => n.id()).sort(),
            edges: window.gigReport.cy.edges().map(e => e.source().id() + '>' + e.target().id()).sort()})""")
        g = entry["graph"]
        assert drawn["counts"] == {"nodes": len(g["nodes"]), "edges": len(g["edges"]), "visibleEdges": len(g["edges"])}
        assert drawn["nodes"] == sorted(n["id"] for n in g["nodes"])
        assert drawn["edges"] == sorted(e["source"] + ">" + e["target"] for e in g["edges"])
    assert page.errors == []


def test_browser_click_pins_card_with_exemplars(page, page_data) -> None:
    first = next(g for g in page_data["graphs"] if g["mode"] == "class")
    page.page.evaluate("key => window.gigReport.draw(key)", first["key"])
    node = next(n for n in first["graph"]["nodes"] if n["layer"] == LAYERS[-1])
    x, y = page.node_point(node["id"])
    page.page.mouse.click(x, y)
    try:
        page.page.wait_for_function("() => document.querySelector('#card .pin-note')", timeout=10000)
    except Exception as exc:  # noqa: BLE001 - say what the page shows instead
        state = page.page.evaluate("(() => ({card: document.getElementById('card').textContent.slice(0, 200), "
                                   "graph: window.gigReport.current(), y: window.scrollY}))()")
        pytest.fail(f"no pinned card after clicking {node['id']} at {(x, y)}: {state} ({exc})")
    card = page.page.evaluate("""() => ({node: document.getElementById('card').getAttribute('data-node'),
        title: document.querySelector('#card .card-title').textContent,
        imgs: Array.from(document.querySelectorAll('#card img')).map(i => i.getAttribute('src')),
        edges: window.gigReport.cy.edges('.in, .out').length})""")
    assert card["node"] == node["id"] and card["title"] == f"concept #{node['concept']}"
    want = [e["url"] for e in page_data["concepts"][node["id"]]["exemplars"]]
    assert card["imgs"][: 1 + len(want)] == want[:1] + want
    n_edges = sum(1 for e in first["graph"]["edges"] if node["id"] in (e["source"], e["target"]))
    assert card["edges"] == n_edges > 0
    page.page.wait_for_function("() => Array.from(document.querySelectorAll('#card img')).every(i => i.complete && i.naturalWidth > 0)",
                                timeout=10000)
    page.shot("02_pinned")
    page.page.mouse.click(*_background_point(page))
    assert page.page.evaluate("document.querySelectorAll('#card .pin-note').length") == 0
    assert page.errors == []


def _background_point(page) -> tuple[float, float]:
    r = page.page.evaluate("(() => { const r = document.getElementById('cy').getBoundingClientRect(); return [r.left, r.top]; })()")
    return r[0] + 5, r[1] + 5


def test_browser_switching_class_and_modes(page, page_data) -> None:
    classes = [g for g in page_data["graphs"] if g["mode"] == "class"]
    assert len(classes) >= 2
    page.page.click("button[data-mode=class]")
    page.page.select_option("#class-select", classes[1]["key"])
    page.page.wait_for_function("key => document.getElementById('cy').getAttribute('data-graph') === key", arg=classes[1]["key"])
    ids = page.page.evaluate("window.gigReport.cy.nodes().map(n => n.id()).sort()")
    assert ids == sorted(n["id"] for n in classes[1]["graph"]["nodes"])
    page.page.click("button[data-mode=global]")
    assert page.page.evaluate("window.gigReport.current()") == "global"
    if any(g["mode"] == "shared" for g in page_data["graphs"]):
        page.page.click("button[data-mode=shared]")
        key = page.page.evaluate("window.gigReport.current()")
        assert key.startswith("shared:")
        page.shot("03_shared")
    page.page.click("button[data-mode=image]")
    assert page.page.evaluate("window.gigReport.current()").startswith("image:")
    page.page.fill("#threshold", "100")
    page.page.dispatch_event("#threshold", "input")
    visible = page.page.evaluate("window.gigReport.counts().visibleEdges")
    assert visible < page.page.evaluate("window.gigReport.counts().edges") or visible <= 3
    page.page.fill("#threshold", "0")
    page.page.dispatch_event("#threshold", "input")
    page.shot("04_image")
    assert page.errors == []


def test_browser_hostile_labels_stay_text(page, page_data) -> None:
    first = next(g for g in page_data["graphs"] if g["mode"] == "class")
    page.page.evaluate("key => window.gigReport.draw(key)", first["key"])
    head = next(n for n in first["graph"]["nodes"] if n["layer"] == "classifier")
    page.page.evaluate("id => window.gigReport.pin(id)", head["id"])
    assert page.page.evaluate("document.querySelector('#card .card-title').textContent") == head["name"]
    assert HOSTILE in head["name"]
    options = page.page.evaluate("Array.from(document.querySelectorAll('#class-select option')).map(o => o.textContent)")
    assert any(HOSTILE in o for o in options)
    assert page.page.evaluate("document.querySelectorAll('img[src=x], svg[onload], [onmouseover], [onerror]').length") == 0
    assert page.page.evaluate("document.scripts.length") == 3
    page.page.evaluate("document.getElementById('localisation').scrollIntoView()")
    page.page.wait_for_timeout(300)
    page.shot("05_localisation")
    page.page.evaluate("document.getElementById('atlas').scrollIntoView()")
    page.page.fill("#atlas-search", str(page_data["graphs"][0]["graph"]["nodes"][0]["concept"]))
    page.page.dispatch_event("#atlas-search", "input")
    page.page.wait_for_timeout(300)
    page.shot("06_atlas_search")
    assert page.page.evaluate("window.__xss") is None
    assert page.errors == []


def test_browser_single_file_report(browser, single_file_report) -> None:
    p = Page(browser, single_file_report)
    try:
        data = p.page.evaluate("window.gigReport.data")
        assert {g["mode"] for g in data["graphs"]} == {"class", "global", "image"}
        for entry in data["graphs"]:
            p.page.evaluate("key => window.gigReport.draw(key)", entry["key"])
            counts = p.page.evaluate("window.gigReport.counts()")
            assert (counts["nodes"], counts["edges"]) == (len(entry["graph"]["nodes"]), len(entry["graph"]["edges"]))
        p.page.wait_for_function("() => Array.from(document.images).filter(i => i.loading !== 'lazy').every(i => i.complete)")
        broken = p.page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0).length")
        assert broken == 0
        p.shot("07_single_file")
        assert p.errors == []
    finally:
        p.page.close()
