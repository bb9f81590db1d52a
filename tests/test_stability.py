"""Concept stability (gig.stability): the one-to-one matching against a brute force over every
assignment, a permuted copy matched back exactly, planted clusters found again by every refit,
noise not, and the command on a finished run."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gig.errors import ConfigError
from gig.stability import THRESHOLD, concept_stability, match_concepts, refit_concepts
from gig.store import load_json


def test_matching_is_the_best_one_to_one_assignment_by_brute_force():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(5, 4, generator=g), torch.randn(6, 4, generator=g)
    match, similarity = match_concepts(A, B)
    cosine = torch.nn.functional.normalize(A.double(), dim=1) @ torch.nn.functional.normalize(B.double(), dim=1).T
    best = max(
        itertools.permutations(range(6), 5), key=lambda cols: sum(float(cosine[i, c]) for i, c in enumerate(cols))
    )
    assert match.tolist() == list(best)
    np.testing.assert_allclose(similarity, [float(cosine[i, c]) for i, c in enumerate(best)])
    assert len(set(match.tolist())) == 5  # one to one


def test_a_permuted_scaled_copy_is_matched_back_with_similarity_one():
    V = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    match, similarity = match_concepts(V, 3.0 * V[perm])
    np.testing.assert_array_equal(perm[match].numpy(), np.arange(40))
    np.testing.assert_allclose(similarity, 1.0, atol=1e-12)


def test_planted_clusters_come_back_in_every_refit_and_noise_does_not():
    """Eight well-separated clusters (200 images of 5 points each): every refit on 80 % of the
    images finds their centres again (cosine ≥ 0.99); isotropic noise clustered the same way
    does not (most concepts below the threshold)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16)) * 10
    labels = rng.integers(0, 8, size=1000)
    pfv = centres[labels] + rng.normal(size=(1000, 16)) * 0.3
    ids = np.repeat(np.arange(200), 5)
    run = refit_concepts(pfv, ids, 8, 1.0, seed=0)
    for seed in (1, 2, 3):
        _, similarity = match_concepts(torch.from_numpy(run), torch.from_numpy(refit_concepts(pfv, ids, 8, 0.8, seed)))
        assert similarity.min() >= 0.99
    noise = rng.normal(size=(1000, 16))
    base = refit_concepts(noise, ids, 40, 1.0, seed=0)
    _, similarity = match_concepts(
        torch.from_numpy(base), torch.from_numpy(refit_concepts(noise, ids, 40, 0.8, seed=1))
    )
    assert (similarity >= THRESHOLD).mean() < 0.5


def test_command_writes_the_figures_of_every_layer(tiny_run, tmp_path):
    import shutil

    from gig.cli import app

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    result = CliRunner().invoke(app, ["stability", str(run), "--seeds", "2", "--fraction", "0.75", "--json"])
    assert result.exit_code == 0, result.output
    saved = load_json(run / "stability" / "stability.json")
    assert saved == json.loads(result.stdout)
    for layer, figures in saved["layers"].items():
        assert len(figures["similarity"]) == figures["K"] and len(figures["share_matched_per_refit"]) == 2
        mean = np.mean(figures["similarity_per_refit"], axis=0)
        assert figures["share_matched"] == pytest.approx(float((mean >= saved["threshold"]).mean()), abs=1e-3)
    with pytest.raises(ConfigError, match="fraction"):
        concept_stability(run, fraction=1.5, progress=False)
    bad = CliRunner().invoke(app, ["stability", str(run), "--layer", "nope"])
    assert bad.exit_code == 2 and "not analysed" in bad.output


def test_report_cards_carry_each_concepts_stability(tiny_run, tmp_path):
    """After `gig stability`, the report's concept cards hold each concept's mean matched cosine,
    read from stability.json."""
    import re
    import shutil

    from gig.report import ReportOptions, build_report

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    saved = concept_stability(run, seeds=2, progress=False)
    index = build_report(
        run, tmp_path / "report", ReportOptions(atlas_per_layer=3, n_images=1, max_classes=1), model=tiny_run["bundle"]
    )
    text = index.read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script type="application/json" id="gig-data">(.*?)</script>', text, re.S).group(1))
    cards = data["concepts"]
    assert cards
    for key, card in cards.items():
        layer, q = key.rsplit(":", 1)
        assert card["stability"] == saved["layers"][layer]["similarity"][int(q)]


# ---------------------------------------------------------------------------- class graphs
def _recurrence_by_hand(graph: dict, other: dict, match: dict[str, np.ndarray]) -> dict:
    """The shares of ``graph``'s concept nodes and edges found in ``other``, counted over the
    two graph JSONs directly: a concept ``LAYER:q`` stands for ``LAYER:match[LAYER][q]``, the
    class node for itself."""

    def mapped(node_id: str) -> str | None:
        if node_id.startswith("class:"):
            return node_id
        layer, q = node_id.rsplit(":", 1)
        j = int(match[layer][int(q)])
        return f"{layer}:{j}" if j >= 0 else None

    concepts = [n for n in graph["nodes"] if n.get("concept") is not None]
    other_ids = {n["id"] for n in other["nodes"]}
    other_edges = {(e["source"], e["target"]) for e in other["edges"]}
    back = {n["id"]: mapped(n["id"]) in other_ids for n in concepts}
    per_layer = {layer: np.mean([back[n["id"]] for n in concepts if n["layer"] == layer]) for layer in graph["layers"]}
    edges = [(mapped(e["source"]), mapped(e["target"])) in other_edges for e in graph["edges"]]
    return {"nodes": np.mean(list(back.values())), "nodes_per_layer": per_layer, "edges": np.mean(edges)}


def _assert_figures(figures: dict, expected: dict) -> None:
    assert figures["nodes"] == pytest.approx(expected["nodes"], abs=1e-6)
    assert figures["edges"] == pytest.approx(expected["edges"], abs=1e-6)
    for layer, share in expected["nodes_per_layer"].items():
        assert figures["nodes_per_layer"][layer] == pytest.approx(share, abs=1e-6)


@pytest.fixture(scope="module")
def graph_stability_run(tiny_run, tmp_path_factory):
    """A copy of the tiny run measured with one refit and ``graphs=True``."""
    import shutil

    run = tmp_path_factory.mktemp("graphs") / "run"
    shutil.copytree(tiny_run["run"], run)
    result = concept_stability(run, seeds=1, graphs=True, model=tiny_run["bundle"], progress=False)
    return run, result


def test_graph_recurrence_of_the_runs_own_concepts_counts_what_the_rerun_reproduces(graph_stability_run, tiny_run):
    """Refits replaced by the run's own dictionaries are the control: the same derived run (named
    by the dictionaries' hash), every concept matched to itself. Its λ is chosen again on the
    graph classes' images alone (it can differ from the run's), so recurrence need not be 1.0:
    it must equal the count over the two graph JSONs by hand."""
    from gig.concepts import load_dictionary
    from gig.stability import graph_stability
    from gig.store import RunStore

    run, _ = graph_stability_run
    store = RunStore.open(run)
    own = {layer: load_dictionary(store, layer).numpy() for layer in store.config.layers}
    result = graph_stability(store, [own], model=tiny_run["bundle"], progress=False)
    refit, control = result["refits"][0], result["control"]
    assert refit["run"] == control["run"] and refit["refitted"] == [] and refit["graphs"] == control["graphs"]
    derived = run / control["run"]
    index = load_json(run / "graph" / "index.json")
    assert set(control["graphs"]) == {f"class_{c}" for c in index["classes"]}
    identity = {layer: np.arange(len(V)) for layer, V in own.items()}
    for name, figures in control["graphs"].items():
        graph, other = load_json(run / "graph" / f"{name}.json"), load_json(derived / "graph" / f"{name}.json")
        _assert_figures(figures, _recurrence_by_hand(graph, other, identity))
    assert result["chance_nodes"] == {layer: pytest.approx(store.config.top_k / len(V)) for layer, V in own.items()}


def test_graph_recurrence_of_a_refit_is_the_count_by_hand(graph_stability_run):
    """The refit's dictionaries are the ones the concept figures came from (the derived run's
    files), matched one to one to the run's; each class graph's node and edge shares are the
    count over the two graph JSONs through that matching, and stability.json holds them."""
    from gig.concepts import load_dictionary, read_dictionary
    from gig.stability import layer_refits
    from gig.store import RunStore

    run, result = graph_stability_run
    store = RunStore.open(run)
    saved = load_json(run / "stability" / "stability.json")
    assert saved == json.loads(json.dumps(result)) and "graphs" in saved
    (refit,) = result["graphs"]["refits"]
    derived = run / refit["run"]
    assert refit["run"] != result["graphs"]["control"]["run"] and refit["refitted"] == store.config.layers
    match = {}
    for layer in store.config.layers:
        V_refit, _ = read_dictionary(str(derived / "dictionaries" / f"{layer}.safetensors"), 0)
        np.testing.assert_array_equal(V_refit, layer_refits(store, layer, 1, result["fraction"])[0])
        match[layer], _ = match_concepts(load_dictionary(store, layer), torch.from_numpy(V_refit))
    for name, figures in refit["graphs"].items():
        graph, other = load_json(run / "graph" / f"{name}.json"), load_json(derived / "graph" / f"{name}.json")
        expected = _recurrence_by_hand(graph, other, match)
        _assert_figures(figures, expected)
        _assert_figures(result["graphs"]["mean"][name], expected)  # one refit: its mean is itself
        assert figures["n_nodes"] == len(graph["nodes"]) - 1  # the class node is not counted
    # The command resumes the same derived runs (same seeds, same refits) and prints the table.
    from gig.cli import app

    shown = CliRunner().invoke(app, ["stability", str(run), "--seeds", "1", "--graphs"])
    assert shown.exit_code == 0, shown.output
    assert "class graphs with refitted concepts" in shown.output and "control" in shown.output
    assert load_json(run / "stability" / "stability.json")["graphs"] == saved["graphs"]


def test_report_shows_each_class_graphs_recurrence(graph_stability_run, tiny_run, tmp_path):
    """The report's class graphs carry their recurrence under refits (nodes, edges, refits and
    the control's), read from stability.json."""
    import re

    from gig.report import ReportOptions, build_report

    run, result = graph_stability_run
    index = build_report(
        run, tmp_path / "report", ReportOptions(atlas_per_layer=2, n_images=1, max_classes=3), model=tiny_run["bundle"]
    )
    text = index.read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script type="application/json" id="gig-data">(.*?)</script>', text, re.S).group(1))
    shown = [
        g for g in data["graphs"] if g["mode"] == "class" and f"class_{g['classes'][0]}" in result["graphs"]["mean"]
    ]
    assert shown
    for entry in shown:
        name = f"class_{entry['classes'][0]}"
        mean, control = result["graphs"]["mean"][name], result["graphs"]["control"]["graphs"][name]
        assert entry["recurrence"] == {
            "nodes": mean["nodes"],
            "edges": mean["edges"],
            "refits": 1,
            "control": {"nodes": control["nodes"], "edges": control["edges"]},
        }


def test_graphs_are_refused_without_the_graph_stage_or_with_other_targets(tiny_run, tmp_path):
    import shutil

    from gig.cli import app
    from gig.errors import RunMismatchError
    from gig.store import RunStore, save_json

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    store = RunStore.open(run)
    manifest = store.manifest()
    graph_stage = manifest["stages"].pop("graph")
    save_json(store.manifest_path, manifest)
    result = CliRunner().invoke(app, ["stability", str(run), "--graphs", "--seeds", "1"])
    assert result.exit_code == 2 and "stage 'graph'" in result.output and "has not run" in result.output
    assert not (run / "stability").exists()  # refused before any refit
    # With the graph stage back, an image of another class recorded under a graph class: the
    # derived run's targets (the model's predictions) are not the run's, and it is refused.
    manifest["stages"]["graph"] = graph_stage
    save_json(store.manifest_path, manifest)
    images = load_json(run / "collect" / "images.json")
    graph_class = load_json(run / "graph" / "index.json")["classes"][0]
    other = next(i for i in images["images"] if i["target"] not in load_json(run / "graph" / "index.json")["classes"])
    other["target"] = graph_class
    save_json(run / "collect" / "images.json", images)
    with pytest.raises(RunMismatchError, match=rf"targets differ .*ids \[{other['image_id']}\]"):
        concept_stability(run, seeds=1, graphs=True, model=tiny_run["bundle"], progress=False)
