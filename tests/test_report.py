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
import re
from pathlib import Path

import pytest
from browser_page import Page
from conftest import HOSTILE, LAYERS

from gig.report import ReportOptions, markdown_blocks, safe_json
from gig.report.metrics import evaluation_section as _evaluation
from gig.store import load_json


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def page_data(tiny_run) -> dict:
    text = tiny_run["index"].read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="gig-data">(.*?)</script>', text, re.S)
    assert match, "the data block is missing"
    return json.loads(match.group(1))


# ------------------------------------------------------------------------------ builder
def test_report_options_are_checked_and_hashed() -> None:
    from gig.config import settings_hash
    from gig.errors import ConfigError

    with pytest.raises(ConfigError, match=r"n_images=-1.*heatmap_size=4"):
        ReportOptions(n_images=-1, heatmap_size=4)
    assert settings_hash(ReportOptions()) == settings_hash(ReportOptions())
    assert settings_hash(ReportOptions(n_images=3)) != settings_hash(ReportOptions())


def test_page_data_records_the_options(page_data) -> None:
    from gig.config import settings_hash

    options = page_data["run"]["options"]
    assert options["hash"] == settings_hash(ReportOptions())
    assert options["n_images"] == ReportOptions().n_images


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


def _listed(graph: dict) -> dict:
    """A graph as the page carries it: without its list of image ids (which grows with the run)."""
    return {k: v for k, v in graph.items() if k != "image_ids"}


def test_graph_json_is_embedded_verbatim(tiny_run, page_data) -> None:
    from gig.graph import build_graph
    from gig.store import RunStore, load_json

    run = tiny_run["run"]
    index = load_json(run / "graph" / "index.json")
    by_key = {g["key"]: g for g in page_data["graphs"]}
    for c, file in index["files"]["class"].items():
        entry = by_key[f"class:{c}"]
        assert entry["file"] == file
        assert entry["graph"] == _listed(load_json(run / "graph" / file))
    assert by_key["global"]["graph"] == _listed(load_json(run / "graph" / "global.json"))
    if index["files"]["shared"]:
        shared = [g for g in page_data["graphs"] if g["file"] == index["files"]["shared"]]
        assert shared and shared[0]["graph"] == _listed(load_json(run / "graph" / "shared.json"))
    images = [g for g in page_data["graphs"] if g["mode"] == "image"]
    assert images, "single-image graphs are included"
    store = RunStore.open(run)
    first = images[0]
    assert first["graph"] == _listed(
        json.loads(json.dumps(build_graph(store, "image", image_id=first["image_id"], class_names=tiny_run["names"])))
    )
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
    result = CliRunner().invoke(
        app,
        [
            "report",
            str(tiny_run["run"]),
            "--out",
            str(out),
            "--atlas-per-layer",
            "2",
            "--n-images",
            "1",
            "--shared-classes",
            "0",
            "--single-file",
        ],
    )
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
        # Edges whose 95 % interval contains 0, or that are not significant against random
        # directions, are drawn dotted, and the info line counts both.
        dotted = page.page.evaluate(
            "() => window.gigReport.cy.edges('.uncertain').map(e => e.source().id() + '>' + e.target().id()).sort()"
        )
        contains_zero = [e for e in g["edges"] if e.get("ci") and e["ci"][0] <= 0 <= e["ci"][1]]
        weak = [e for e in g["edges"] if e.get("beats_random") is False]
        assert dotted == sorted({e["source"] + ">" + e["target"] for e in contains_zero + weak})
        if g.get("intervals"):
            assert f"dotted: {len(contains_zero)} edge(s)" in page.page.inner_text("#edges-uncertain")
        if g.get("significance"):
            assert f"; {len(weak)} not significantly stronger than" in page.page.inner_text("#edges-uncertain")
            labels = page.page.evaluate("() => window.gigReport.cy.edges().map(e => e.data('wlabel'))")
            assert sum(" q=" in label for label in labels) == sum(e.get("p_adjusted") is not None for e in g["edges"])
    assert any(entry["graph"].get("significance") for entry in page_data["graphs"])  # the global graph's
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
        state = page.page.evaluate(
            "(() => ({card: document.getElementById('card').textContent.slice(0, 200), "
            "graph: window.gigReport.current(), y: window.scrollY}))()"
        )
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
    page.page.wait_for_function(
        "() => Array.from(document.querySelectorAll('#card img')).every(i => i.complete && i.naturalWidth > 0)",
        timeout=10000,
    )
    page.shot("02_pinned")
    page.page.mouse.click(*_background_point(page))
    assert page.page.evaluate("document.querySelectorAll('#card .pin-note').length") == 0
    assert page.errors == []


def _background_point(page) -> tuple[float, float]:
    r = page.page.evaluate(
        "(() => { const r = document.getElementById('cy').getBoundingClientRect(); return [r.left, r.top]; })()"
    )
    return r[0] + 5, r[1] + 5


def test_browser_switching_class_and_modes(page, page_data) -> None:
    classes = [g for g in page_data["graphs"] if g["mode"] == "class"]
    assert len(classes) >= 2
    page.page.click("button[data-mode=class]")
    page.page.select_option("#class-select", classes[1]["key"])
    page.page.wait_for_function(
        "key => document.getElementById('cy').getAttribute('data-graph') === key", arg=classes[1]["key"]
    )
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
    options = page.page.evaluate(
        "Array.from(document.querySelectorAll('#class-select option')).map(o => o.textContent)"
    )
    assert any(HOSTILE in o for o in options)
    assert (
        page.page.evaluate("document.querySelectorAll('img[src=x], svg[onload], [onmouseover], [onerror]').length") == 0
    )
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
        p.page.wait_for_function(
            "() => Array.from(document.images).filter(i => i.loading !== 'lazy').every(i => i.complete)"
        )
        broken = p.page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0).length")
        assert broken == 0
        p.shot("07_single_file")
        assert p.errors == []
    finally:
        p.page.close()


@pytest.fixture(scope="module")
def on_demand_report(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's report with only the graph stage's classes inline: every other class is
    loaded on demand."""
    from gig.report import build_report

    out = tmp_path_factory.mktemp("on-demand") / "report"
    return build_report(
        tiny_run["run"],
        out,
        ReportOptions(max_classes=1, shared_classes=0, n_images=1, atlas_per_layer=2),
        model=tiny_run["bundle"],
    )


def _on_demand_payload(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("window.gigOnDemand(") and text.endswith(");\n")
    return json.loads(text[len("window.gigOnDemand(") : -3])


def test_other_classes_are_written_for_loading_on_demand(tiny_run, on_demand_report) -> None:
    from gig.attribution import load_attributions
    from gig.graph import build_graph
    from gig.store import RunStore

    text = on_demand_report.read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script type="application/json" id="gig-data">(.*?)</script>', text, re.S).group(1))
    inline = [c for g in data["graphs"] if g["mode"] == "class" for c in g["classes"]]
    store = RunStore.open(tiny_run["run"])
    walk = load_attributions(store)
    targets = {
        int(i["image_id"]): int(i["target"]) for i in load_json(tiny_run["run"] / "collect" / "images.json")["images"]
    }
    every = {targets[int(i)] for i in walk["image_id"]}
    assert len(data["onDemand"]) == len(every) - len(inline) >= 1
    assert {int(m["key"].split(":")[1]) for m in data["onDemand"]} | set(inline) == every
    for m in data["onDemand"]:
        payload = _on_demand_payload(on_demand_report.parent / m["file"])
        c = payload["entry"]["classes"][0]
        # the same graph as one built from the whole walk in memory, in one piece
        whole = build_graph(store, "class", [c], class_names=tiny_run["names"], data=walk)
        assert (
            payload["entry"]["graph"]["nodes"] == whole["nodes"]
            and payload["entry"]["graph"]["edges"] == whole["edges"]
        )
        concept_ids = {n["id"] for n in whole["nodes"] if n["layer"] != "classifier"}
        assert concept_ids <= set(payload["concepts"]) | set(data["concepts"])
        for card in payload["concepts"].values():
            assert (on_demand_report.parent / card["exemplars"][0]["url"]).is_file()
        assert HOSTILE in payload["classNames"][str(c)] and "<" not in (on_demand_report.parent / m["file"]).read_text()


def test_browser_loads_a_class_on_demand(browser, on_demand_report) -> None:
    p = Page(browser, on_demand_report)
    try:
        menu = p.page.evaluate("window.gigReport.data.onDemand")
        assert p.page.evaluate("document.scripts.length") == 3  # nothing loaded before it is chosen
        p.page.select_option("#class-select", menu[0]["key"])
        p.page.wait_for_function(
            "key => document.getElementById('cy').getAttribute('data-graph') === key", arg=menu[0]["key"], timeout=15000
        )
        graph = _on_demand_payload(on_demand_report.parent / menu[0]["file"])["entry"]["graph"]
        ids = p.page.evaluate("window.gigReport.cy.nodes().map(n => n.id()).sort()")
        assert ids == sorted(n["id"] for n in graph["nodes"])
        node = next(n for n in graph["nodes"] if n["layer"] == LAYERS[-1])
        p.page.evaluate("id => window.gigReport.pin(id)", node["id"])
        assert (
            p.page.evaluate("document.querySelector('#card .card-title').textContent") == f"concept #{node['concept']}"
        )
        p.page.wait_for_function(
            "() => { const i = Array.from(document.querySelectorAll('#card img'));"
            " return i.length > 0 && i.every(x => x.complete && x.naturalWidth > 0); }",
            timeout=10000,
        )
        p.shot("08_on_demand")
        assert p.page.evaluate("window.__xss") is None
        assert p.errors == []
    finally:
        p.page.close()


def test_ablation_section_shows_saved_ablations_beside_their_gig_share(tiny_run, tmp_path) -> None:
    import shutil

    import torch

    from gig.ablate import ablate
    from gig.attribution import load_attributions
    from gig.report.metrics import ablation_section
    from gig.store import RunStore

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    store = RunStore.open(run)
    assert ablation_section(store, {}) is None  # nothing saved yet
    result = ablate(store, LAYERS[-1], [0, 2], image_ids=[0, 1, 2], model=tiny_run["bundle"])
    data = load_attributions(store)
    importance = {layer: data[f"{layer}/score"].mean(0) for layer in LAYERS}
    section = ablation_section(store, importance)
    (row,) = section["results"]
    rows = torch.arange(3)
    assert row["concepts"] == [0, 2] and row["n_images"] == 3
    assert row["delta_prob"] == pytest.approx(float(result.delta_probs[rows, result.targets].mean()), abs=1e-6)
    assert row["gig_share"] == pytest.approx(float(importance[LAYERS[-1]][0] + importance[LAYERS[-1]][2]), abs=1e-6)
    assert section["correlation"] == []


def test_front_figure_marks_the_evaluations_baselines() -> None:
    from gig.report.figure import front_figure

    layers = [
        {
            "name": "a",
            "alpha": 1.0,
            "front": [
                {"alpha": 2.0, "l0_ratio": 0.01, "r2": 0.5, "top1_agreement": 0.8},
                {"alpha": 1.0, "l0_ratio": 0.1, "r2": 0.95, "top1_agreement": 1.0},
            ],
        }
    ]
    plain = front_figure(layers, 0.9, 0.95).decode()
    marked = front_figure(
        layers,
        0.9,
        0.95,
        {
            "a": {
                "ours": {"l0_ratio": 0.1, "r2": 0.95, "top1_agreement": 1.0},
                "sae": {"l0_ratio": 0.05, "r2": 0.7, "top1_agreement": 0.9},
            }
        },
    ).decode()
    assert "sae" in marked and "sae" not in plain
    assert "ours" not in marked  # the run's own point is the ringed front point, not a marker


# ------------------------------------------------------------------------------ run sums
def test_the_graph_stages_run_sums_give_the_shards_numbers(tiny_run, tmp_path, monkeypatch) -> None:
    """The run-wide importances, class shares and every concept's strongest parents and children
    that the cards show are read from the graph stage's run sums (issue 25: every explain page
    read the run's shards twice); they equal the two shard passes older runs still use, for every
    concept, and sums left by an earlier attribute stage are not read."""
    import shutil

    import torch

    import gig.report.sections as sec
    from gig.attribution import iter_attributions
    from gig.concepts import load_concept_cards
    from gig.graph import RUN_SUMS, load_run_sums, run_targets
    from gig.store import RunStore

    store = RunStore.open(tiny_run["run"])
    layers = list(store.config.layers)
    targets = run_targets(store)
    saved = load_run_sums(store)
    assert saved is not None and saved.n == sum(int(p["image_id"].numel()) for p in iter_attributions(store, ()))
    K = {layer: len(load_concept_cards(store, layer)["concepts"]) for layer in layers}
    every = {layer: set(range(K[layer])) for layer in layers}
    fast = sec.RunNeighbours.of_run(store, targets).read_edges(store, every, targets)
    with monkeypatch.context() as m:
        m.setattr(sec, "load_run_sums", lambda store: None)
        shards = sec.RunNeighbours.of_run(store, targets).read_edges(store, every, targets)
    assert fast.saved is not None and shards.saved is None
    for layer in layers:
        assert torch.equal(fast.importance[layer], shards.importance[layer]), layer
    assert fast.class_ids == shards.class_ids
    pairs = 0
    for layer in layers:
        for q in range(K[layer]):
            assert fast.of(layer, q, K) == shards.of(layer, q, K), (layer, q)
            pairs += sum(len(side) for side in fast.of(layer, q, K))
    assert pairs > 0  # some parents, children and classes are compared, not only empty lists

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run, ignore=shutil.ignore_patterns("report", "evaluate"))
    copy = RunStore.open(run)
    assert load_run_sums(copy) is not None
    manifest = copy.manifest()
    manifest["stages"]["attribute"]["hash"] = "0" * 16  # the attribute stage ran again with other settings
    copy._write_manifest(manifest)
    assert load_run_sums(copy) is None
    (run / "graph" / RUN_SUMS).unlink()
    assert load_run_sums(copy) is None


def test_report_reads_each_attribute_shard_at_most_twice(tiny_run, page_data, tmp_path, monkeypatch) -> None:
    """Every graph the page needs in one two-pass read of the shards (the localisation rows in
    the second), the run-wide figures from the graph stage's run sums and the attribute stage's
    path records: no shard is opened more than twice. The page's graphs equal the first build's."""
    import collections

    import gig.artefacts
    from gig.report import build_report

    opens = collections.Counter()
    real_open = gig.artefacts.open_tensors  # also opens the decompose shards (CodeReader): count the attribute ones

    def counted(path, *args, **kwargs):
        if "attribute" in Path(path).parts:
            opens[Path(path).name] += 1
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(gig.artefacts, "open_tensors", counted)
    index = build_report(tiny_run["run"], tmp_path / "report", model=tiny_run["bundle"], progress=False)
    shards = sorted(p.name for p in (tiny_run["run"] / "attribute" / "shards").glob("*.safetensors"))
    assert shards and set(opens) == set(shards)
    assert max(opens.values()) <= 2, opens
    text = index.read_text(encoding="utf-8")
    again = json.loads(re.search(r'<script type="application/json" id="gig-data">(.*?)</script>', text, re.S).group(1))
    assert again["graphs"] == page_data["graphs"] and again["images"] == page_data["images"]


def test_report_takes_the_graph_stages_figures_instead_of_drawing_them_again(tiny_run, tmp_path, monkeypatch) -> None:
    """Issue 25 (figures drawn once): a class figure the graph stage drew is the same picture
    (graph, crops, labels), so the report takes its files and draws only the other classes; once a
    concept of such a graph is named, the picture differs and the report draws it again, linking
    the stage's older figure beside it."""
    import shutil

    import gig.report.sections as sec
    from gig.artefacts import class_figure_stem, graph_index
    from gig.labels import set_label
    from gig.report import build_report
    from gig.store import RunStore

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run, ignore=shutil.ignore_patterns("report", "evaluate"))
    store = RunStore.open(run)
    staged = [int(c) for c in graph_index(store)["classes"]]
    assert staged and all(class_figure_stem(store, c).with_suffix(".png").is_file() for c in staged)
    drawn: list[str] = []
    real = sec.draw_graph
    monkeypatch.setattr(
        sec, "draw_graph", lambda graph, stem, *a, **k: drawn.append(stem.name) or real(graph, stem, *a, **k)
    )

    build_report(run, progress=False)
    figures = run / "report" / "figures"
    shown = {p.stem for p in figures.glob("class_*.png")}
    assert {f"class_{c}" for c in staged} <= shown and len(shown) > len(staged)  # other classes too
    assert sorted(drawn) == sorted(shown - {f"class_{c}" for c in staged})
    for c in staged:
        stage = class_figure_stem(store, c)
        assert (figures / f"class_{c}.png").read_bytes() == stage.with_suffix(".png").read_bytes()
        assert (figures / f"class_{c}.svg").read_bytes() == stage.with_suffix(".svg").read_bytes()
    assert not list(figures.glob("pipeline_*"))  # no second copy of the same picture

    c = staged[0]
    node = next(n for n in load_json(run / "graph" / f"class_{c}.json")["nodes"] if n.get("concept") is not None)
    set_label(run, node["layer"], int(node["concept"]), "a name")
    drawn.clear()
    build_report(run, progress=False)
    assert f"class_{c}" in drawn
    assert (figures / f"class_{c}.png").read_bytes() != class_figure_stem(store, c).with_suffix(".png").read_bytes()
    assert (figures / f"pipeline_class_{c}.png").is_file()


def test_a_first_report_makes_every_crop_from_one_read_of_each_image(tiny_run, tmp_path, monkeypatch) -> None:
    """Without the ERF cache, the report makes the crops of every layer image by image: each
    image is loaded once for all of them, and each crop on the page (JPEG, encoded from memory)
    is the JPEG of the PNG written to the cache."""
    import collections
    import shutil

    import gig.images
    import gig.report.sections
    from gig.report import build_report
    from gig.report.page import jpeg_bytes, slug

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run, ignore=shutil.ignore_patterns("report", "evaluate", "erf"))
    loads = collections.Counter()
    real = gig.images.ImageSource.load
    monkeypatch.setattr(gig.images.ImageSource, "load", lambda self, r: loads.update([r.image_id]) or real(self, r))
    monkeypatch.setattr(gig.report.sections, "jpeg_bytes", lambda p: pytest.fail(f"{p} read back"))
    index = build_report(run, progress=False)
    monkeypatch.undo()
    cropped = sorted((run / "erf").rglob("s*.png"))
    assert len({p.parent.name for p in cropped}) == len(LAYERS)  # crops of every layer
    panels = json.loads(re.search(r'id="gig-data">(.*?)</script>', index.read_text(encoding="utf-8"), re.S).group(1))
    shown = len(panels["images"])  # the localisation panels load their images once more each
    assert max(loads.values()) <= 2 and sum(loads.values()) <= len(loads) + shown, loads
    for png in cropped:
        page_jpeg = run / "report" / "img" / "erf" / slug(png.parent.name) / f"{png.stem}.jpg"
        assert page_jpeg.read_bytes() == jpeg_bytes(png), png
