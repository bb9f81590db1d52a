"""gig.labels: the labels.yaml round trip (comments kept, atomic, validated against the run),
suggestions from concept cards with known classes, the offline WordNet hierarchy, `gig label`."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from gig.config import Config
from gig.errors import ConfigError, InputError
from gig.labels import (
    build_hierarchy,
    check_concepts,
    concept_label,
    labels_path,
    load_hierarchy,
    load_labels,
    set_label,
    shared_ancestor,
    suggest_labels,
)
from gig.models import imagenet_class_names
from gig.store import RunStore, save_json

LAYERS = ["_blocks.8", "_blocks.15"]
#: ImageNet-1k classes: 151-153 Chihuahua, Japanese spaniel, Maltese dog (toy dogs); 281, 282,
#: 285 tabby, tiger cat, Egyptian cat (domestic cats); 0, 1 tench, goldfish (cyprinids);
#: 409, 530 analog and digital clock.
CARDS = {
    0: [[151, 5], [152, 4], [153, 3]],
    1: [[281, 6], [282, 5], [285, 2]],
    2: [[0, 20], [1, 2]],  # one class dominates
    3: [],  # no members
    4: [[409, 4], [0, 4], [151, 4]],  # nothing specific in common
}


@pytest.fixture()
def run(tmp_path):
    """A run directory holding only what labels need: the config and two layers' concept cards."""
    store = RunStore.create(tmp_path / "run", Config(layers=list(LAYERS)))
    (store.root / "concepts").mkdir()
    for layer in LAYERS:
        cards = [{"id": q, "count": sum(n for _, n in c), "top_classes": c, "exemplars": []} for q, c in CARDS.items()]
        save_json(store.root / "concepts" / f"{layer}.json", {"layer": layer, "K": len(cards), "concepts": cards})
    return store.root


def test_round_trip_keeps_comments_and_other_entries(run):
    assert load_labels(run) == {}
    set_label(run, "_blocks.15", 2, "fish body", note="tench mostly")
    text = labels_path(run).read_text()
    assert text.startswith("# Concept labels")
    path = labels_path(run)
    path.write_text(text + "# my own comment\n")
    set_label(run, "_blocks.8", 0, "small dog faces")
    set_label(run, "_blocks.15", 4, 'clock "hands": 12')  # quotes and a colon survive
    set_label(run, "_blocks.15", 2, "fish")  # renamed; its note is kept
    labels = load_labels(run)
    assert labels == {
        "_blocks.15": {2: {"name": "fish", "note": "tench mostly"}, 4: {"name": 'clock "hands": 12'}},
        "_blocks.8": {0: {"name": "small dog faces"}},
    }
    assert "# my own comment" in path.read_text()
    assert yaml.safe_load(path.read_text())["_blocks.15"][2]["name"] == "fish"
    assert (
        concept_label(labels, "_blocks.15", 4) == 'clock "hands": 12' and concept_label(labels, "_blocks.8", 3) is None
    )
    assert not list(path.parent.glob("*.tmp"))  # written through a temporary file, then renamed


def test_hand_edits_survive(run):
    path = labels_path(run)
    path.write_text(
        "# notes by Ana\n_blocks.8:\n  # the dogs\n  0: toy dogs\n  1:\n    name: cats\n    seen_by: ana\n"
        "_blocks.15: {3: {name: empty}}\n"
    )
    set_label(run, "_blocks.8", 1, "domestic cats", note="tabby and tiger cat")
    set_label(run, "_blocks.15", 4, "clocks")  # a flow-style layer: the file is rewritten whole
    labels = load_labels(run)
    assert labels["_blocks.8"] == {
        0: {"name": "toy dogs"},
        1: {"name": "domestic cats", "seen_by": "ana", "note": "tabby and tiger cat"},
    }
    assert labels["_blocks.15"] == {3: {"name": "empty"}, 4: {"name": "clocks"}}
    assert path.read_text().startswith("# notes by Ana\n")


def test_refuses_unknown_layer_and_concept(run):
    with pytest.raises(ConfigError, match="'_blocks.99'.*_blocks.8, _blocks.15"):
        set_label(run, "_blocks.99", 0, "x")
    with pytest.raises(ConfigError, match="concept 5 .*'_blocks.8'.*0..4"):
        set_label(run, "_blocks.8", 5, "x")
    with pytest.raises(ConfigError, match="non-empty"):
        set_label(run, "_blocks.8", 1, "  ")
    with pytest.raises(ConfigError, match="'x'"):
        check_concepts(RunStore.open(run), "_blocks.8", ["x"])
    assert not labels_path(run).exists()
    labels_path(run).write_text("_blocks.8:\n  zero: {name: a}\n")
    with pytest.raises(InputError, match="'zero'"):
        load_labels(run)


def test_suggestions_from_known_classes(run):
    s = suggest_labels(run, "_blocks.15", class_names=imagenet_class_names())
    assert s[0]["ancestor"]["name"] == "toy dog" and s[0]["name"] == "toy dog" and s[0]["ancestor"]["n_classes"] == 3
    assert s[1]["name"] == "domestic cat" and s[1]["ancestor"]["share"] == pytest.approx(1.0)
    assert s[0]["class_ids"] == [151, 152, 153] and s[0]["classes"][0] == [imagenet_class_names()[151], 5]
    assert s[2]["ancestor"] is None and s[2]["name"] == "tench"  # 20 of 22 members: the class itself
    assert s[3] == {"name": None, "classes": [], "class_ids": [], "members": 0, "ancestor": None}
    # A clock, a fish and a dog share only a very general synset: reported, not used as the name.
    assert s[4]["ancestor"]["depth"] < 6 and s[4]["name"] == f"{imagenet_class_names()[409]} / tench"
    # A model with other classes: the frequent classes only.
    plain = suggest_labels(run, "_blocks.8", class_names=["a"] * 1001)
    assert plain[0]["ancestor"] is None and plain[0]["name"] == "a / a"


def test_shared_ancestor_and_hierarchy_builder(tmp_path):
    h = load_hierarchy()
    assert len(h["classes"]) == 1000 and h["classes"][0] == "n01440764"
    assert h["synsets"]["n02084071"]["name"] == "dog" and h["depth"]["n00001740"] == 0  # entity
    assert shared_ancestor([(0, 5), (1, 4), (2, 3)])["name"] == "cyprinid"  # tench + goldfish = 75 %
    assert shared_ancestor([(409, 5), (530, 4), (0, 3)])["name"] == "clock"  # analog + digital clock
    assert shared_ancestor([(0, 5), (1, 4), (2, 3)], coverage=0.9)["name"] not in ("cyprinid", None)
    # The builder on a two-line WordNet excerpt (wndb format; offsets made up).
    data = tmp_path / "data.noun"
    data.write_text(
        "  1 licence header\n"
        "00000001 03 n 01 thing 0 000 | a thing\n"
        "00000002 05 n 02 small_dog 0 toy 0 002 @ 00000001 n 0000 ~ 00000003 n 0000 | a dog\n"
        "00000003 05 n 01 chihuahua 0 001 @i 00000002 n 0000 | tiny\n"
    )
    built = build_hierarchy(data, ["n00000003"])
    assert built == {
        "classes": ["n00000003"],
        "synsets": {
            "n00000001": {"name": "thing", "parents": []},
            "n00000002": {"name": "small dog", "parents": ["n00000001"]},
            "n00000003": {"name": "chihuahua", "parents": ["n00000002"]},
        },
    }
    with pytest.raises(InputError, match="n00000009"):
        build_hierarchy(data, ["n00000009"])


def test_label_command(run):
    from gig.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["label", str(run), "_blocks.8", "1", "cats", "--note", "striped"])
    assert done.exit_code == 0, done.output
    listed = runner.invoke(app, ["label", str(run), "--json"])
    assert json.loads(listed.stdout) == {"_blocks.8": {"1": {"name": "cats", "note": "striped"}}}
    bad = runner.invoke(app, ["label", str(run), "_blocks.3", "1", "x"])
    assert bad.exit_code == 2 and "_blocks.3" in bad.output
    suggested = runner.invoke(app, ["label", str(run), "--suggest", "_blocks.8", "--json"])
    assert suggested.exit_code == 0, suggested.output
    assert json.loads(suggested.stdout)["_blocks.8"]["0"]["name"] == "toy dog"  # the lite0 model's classes
    table = runner.invoke(app, ["label", str(run), "--suggest"])
    assert table.exit_code == 0 and "domestic cat" in table.stdout
