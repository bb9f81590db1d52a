"""Tests for gig.artefacts, the one module that says where every artefact of a run lies and reads
it (issue 25): reading a finished run imports no heavy module, no other module spells a run
path, the paths are the run directory's layout, and the readers return what the files hold."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LAYERS
from safetensors.torch import load_file

import gig.artefacts as art
from gig.store import JSON_CHECKSUM_KEY, RunStore

SRC = Path(__file__).resolve().parents[1] / "src" / "gig"


@pytest.fixture(scope="module")
def store(tiny_run) -> RunStore:
    return RunStore.open(tiny_run["run"])


def _same(read: dict[str, torch.Tensor], direct: dict[str, torch.Tensor]) -> None:
    """The same keys and, bit for bit, the same tensors (NaN where the file holds NaN)."""
    assert sorted(read) == sorted(direct)
    for key, tensor in direct.items():
        torch.testing.assert_close(read[key], tensor, rtol=0, atol=0, equal_nan=True, msg=key)


def _json(path: Path):
    """A JSON artefact as written, without the checksum key the store adds."""
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data.pop(JSON_CHECKSUM_KEY, None)
    return data


# ------------------------------------------------------------------------------ light to import
#: Modules that reading a finished run must not import: scikit-learn, the sparse coders and the
#: stage modules that compute (and import those).
HEAVY = ("sklearn", "gig.lasso", "gig.omp", "gig.concepts", "gig.decompose", "gig.attribution", "gig.graph")

READ_EVERY_ARTEFACT = """
import json, sys
import gig.artefacts as art
from gig.store import RunStore

store = RunStore.open(sys.argv[1])
read = {}
read["images"] = len(art.load_images(store)["images"])
read["targets"] = len(art.run_targets(store))
for layer in store.config.layers:
    read[f"samples {layer}"] = tuple(art.load_samples(store, layer)["pfv"].shape)
    read[f"crops {layer}"] = len(art.crop_paths(store, layer, [0, 1]))
    read[f"dictionary {layer}"] = tuple(art.load_dictionary(store, layer).shape)
    read[f"cards {layer}"] = len(art.load_concept_cards(store, layer)["concepts"])
    read[f"basis {layer}"] = art.load_basis(store, layer) is None and art.decoder_bias(store, layer) is None
    read[f"alpha {layer}"] = art.run_alpha(store, layer)
    reader = art.CodeReader(store, layer)
    read[f"codes {layer}"] = tuple(reader.codes(reader.image_ids()[0]).shape)
read["front"] = sorted(art.load_front(store))
read["fidelity"] = sorted(art.load_fidelity(store))
read["shards"] = len(art.attribution_shards(store))
read["parts"] = sum(int(p["image_id"].numel()) for p in art.iter_attributions(store, ("score",)))
read["attributions"] = int(art.load_attributions(store, ("score",))["image_id"].numel())
read["records"] = len(art.load_path_records(store))
read["residuals"] = int(art.completeness_residuals(store).numel())
read["estimates"] = int(art.load_error_estimates(store).numel())
read["walk"] = len(art.load_walk(store))
index = art.graph_index(store)
files = [*index["files"]["class"].values(), index["files"]["shared"], index["files"]["global"]]
read["graphs"] = {f: len(art.load_graph(store, f)["nodes"]) for f in files if f}
read["saved graphs"] = sorted(art.saved_graph_files(store))
read["run sums"] = art.load_run_sums(store).n
read["correlation"] = art.load_correlation(store) is None
read["ablations"] = len(art.load_ablations(store))
read["stability"] = art.load_stability(store) is None
read["evaluation"] = sorted(art.load_evaluation_summary(art.evaluate_dir(store)))
read["reconstruction"] = art.load_reconstruction(art.evaluate_dir(store))
read["labels"] = art.load_labels(store)
print(json.dumps({"read": read, "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def test_reading_every_artefact_imports_no_heavy_module(tiny_run) -> None:
    """In a fresh interpreter, every artefact of a finished run read through gig.artefacts: none
    of scikit-learn, the sparse coders or the computing stage modules is imported."""
    code = f"HEAVY = {HEAVY!r}\n" + READ_EVERY_ARTEFACT
    result = subprocess.run(
        [sys.executable, "-c", code, str(tiny_run["run"])], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [], out["heavy"]
    read = out["read"]
    assert read["images"] == read["targets"] == 6
    assert read["parts"] == read["attributions"] == read["run sums"] == 6
    assert read["shards"] >= 1 and read["residuals"] > 0 and read["records"] > 0 and read["walk"] > 0
    assert sorted(read["front"]) == sorted(read["fidelity"]) == sorted(LAYERS)
    assert all(read[f"basis {layer}"] for layer in LAYERS)  # k-means layers: no basis of their own
    assert read["graphs"] and "global" in read["saved graphs"]
    assert read["evaluation"] == ["c_deletion", "n_images", "note"]  # the fixture's fake evaluation


# ------------------------------------------------------------------------------ one place for paths
#: Stage folders and artefact file names of a run: joined to a path only in gig.artefacts.
RUN_NAMES = {
    "collect",
    "erf",
    "concepts",
    "decompose",
    "attribute",
    "graph",
    "evaluate",
    "stability",
    "report",
    "explain",
    "shards",
    "ablation",
    "images.json",
    "front.json",
    "fidelity.json",
    "check.json",
    "index.json",
    "shared.json",
    "global.json",
    "run_sums.safetensors",
    "paths.safetensors",
    "correlation.json",
    "correlation_pairs.safetensors",
    "stability.json",
    "summary.json",
    "extraction.json",
    "labels.yaml",
}

#: Modules allowed to spell run paths, with the reason.
OWNERS = {
    "artefacts.py": "the one module that says where every artefact lies",
    "store.py": "owns config.yaml, manifest.json, .lock and the generic stage folder and shard helpers",
}

#: Single spellings allowed elsewhere, ``(module, expression): reason``. None is needed today;
#: an entry here must say why the path cannot come from gig.artefacts.
ALLOWED: dict[tuple[str, str], str] = {}


def _leftmost(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        node = node.left
    return node


def _called(node: ast.expr) -> str | None:
    if isinstance(node, ast.Call):
        return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
    return None


def _run_rooted(node: ast.expr) -> bool:
    """A run directory or one of its stage folders: ``….root``, ``….stage_dir(...)``, ``derived_dir(...)``."""
    return (isinstance(node, ast.Attribute) and node.attr == "root") or _called(node) in ("stage_dir", "derived_dir")


def _names_run_file(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in RUN_NAMES


def run_paths_spelt(source: str) -> list[str]:
    """The expressions of ``source`` that spell a path inside a run: a ``/`` join onto a run's
    root or a stage folder (``store.root / "graph"``, ``store.stage_dir("decompose") / "front.json"``),
    a join of a stage folder or artefact file name onto anything (``run_dir / "explain"``), a
    ``joinpath`` of one, or :func:`gig.store.derived_dir` of a stage folder."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            if (node.left is _leftmost(node) and _run_rooted(node.left)) or _names_run_file(node.right):
                found.append(ast.unparse(node))
        elif _called(node) in ("joinpath", "derived_dir") and any(_names_run_file(a) for a in node.args):
            found.append(ast.unparse(node))
    return found


def test_the_check_finds_run_paths() -> None:
    """The source check below is not vacuous: it finds each way a run path was spelt before, and
    leaves paths in other folders alone."""
    spelt = [
        'store.root / "graph" / "index.json"',
        'store.stage_dir("decompose") / "front.json"',
        'out or run_dir / "explain"',
        'derived_dir(store, "graph", "ablation")',
        'Path(run_dir) / "evaluate"',
        'store.root / "collect" / f"{layer}.safetensors"',
        "self.store.root / name",
        'store.root.joinpath("collect", "images.json")',
    ]
    for expression in spelt:
        assert run_paths_spelt(expression), expression
    for expression in ('out / "index.html"', 'Path(__file__).parent / "assets"', 'view.out / "bases" / layer'):
        assert not run_paths_spelt(expression), expression


def test_no_module_but_artefacts_spells_a_run_path() -> None:
    """Outside gig.artefacts (and gig.store), no module under src/gig joins a path inside a run:
    the writers and readers take them from gig.artefacts."""
    offences = []
    for path in sorted(SRC.rglob("*.py")):
        module = path.relative_to(SRC).as_posix()
        if module in OWNERS:
            continue
        for expression in run_paths_spelt(path.read_text(encoding="utf-8")):
            if (module, expression) not in ALLOWED:
                offences.append(f"{module}: {expression}")
    assert not offences, "run paths spelt outside gig.artefacts:\n" + "\n".join(offences)


def test_paths_are_the_run_layout(store) -> None:
    """Every path function names the file the stages have always written (README's table)."""
    root, layer = store.root, LAYERS[0]
    expected = {
        art.images_path(store): "collect/images.json",
        art.samples_path(store, layer): f"collect/{layer}.safetensors",
        art.dictionary_path(store, layer): f"concepts/{layer}.safetensors",
        art.concept_cards_path(store, layer): f"concepts/{layer}.json",
        art.basis_path(store, layer): f"concepts/{layer}.basis.safetensors",
        art.front_path(store): "decompose/front.json",
        art.fidelity_path(store): "decompose/fidelity.json",
        art.check_path(store): "decompose/check.json",
        art.code_shards_dir(store): "decompose/shards",
        art.attribution_shards_dir(store): "attribute/shards",
        art.paths_path(store): "attribute/paths.safetensors",
        art.graph_index_path(store): "graph/index.json",
        art.class_graph_path(store, 3): "graph/class_3.json",
        art.class_figure_stem(store, 3): "graph/class_3",
        art.graph_path(store, art.SHARED_GRAPH): "graph/shared.json",
        art.graph_path(store, art.GLOBAL_GRAPH): "graph/global.json",
        art.image_graph_path(store, 7): "graph/image_7.json",
        art.run_sums_path(store): "graph/run_sums.safetensors",
        art.correlation_path(store): "graph/ablation/correlation.json",
        art.correlation_pairs_path(store): "graph/ablation/correlation_pairs.safetensors",
        art.ablation_path(store, layer, [1, 2]): "graph/ablation/_blocks.8_1-2.json",
        art.erf_dir(store, layer): f"erf/{store.expected_hash('collect')}/{layer}",
        art.stability_path(store): "stability/stability.json",
        art.stability_run_dir(store, "abc"): "stability/graphs/abc",
        art.evaluate_dir(store): "evaluate",
        art.labels_path(store): "labels.yaml",
        art.report_dir(store): "report",
        art.explain_dir(store): "explain",
    }
    assert {p: p.relative_to(root).as_posix() for p in expected} == expected
    assert art.evaluate_dir(str(root)) == art.evaluate_dir(store)  # a run directory as well as a store
    assert all(p.is_file() for p in art.attribution_shards(store))
    for path in (art.images_path(store), art.front_path(store), art.fidelity_path(store), art.run_sums_path(store)):
        assert path.is_file(), path


# ------------------------------------------------------------------------------ same values
def test_tensor_readers_return_the_files_tensors(store) -> None:
    """The tensor readers give what ``safetensors.torch.load_file`` reads from the files."""
    for layer in LAYERS:
        direct = load_file(str(store.root / "collect" / f"{layer}.safetensors"))
        samples = art.load_samples(store, layer)
        _same(samples, direct)
        V = load_file(str(store.root / "concepts" / f"{layer}.safetensors"))["V"]
        assert torch.equal(art.load_dictionary(store, layer), V)
    records = load_file(str(store.root / "attribute" / "paths.safetensors"))
    read = art.load_path_records(store)
    _same(read, records)
    sums = load_file(str(store.root / "graph" / "run_sums.safetensors"))
    attribute = sums.pop("attribute")
    assert bytes(attribute.tolist()).decode() == art.attribute_key(store)
    tensors = art.load_run_sums(store).tensors()
    _same(tensors, sums)


def test_attribution_readers_concatenate_the_shards(store) -> None:
    shards = [load_file(str(p)) for p in sorted((store.root / "attribute" / "shards").glob("*.safetensors"))]
    direct = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    read = art.load_attributions(store)
    _same(read, direct)
    some = direct["image_id"][[0, -1]].tolist()
    rows = art.load_attributions(store, ("score",), image_ids=some)
    keep = torch.isin(direct["image_id"], torch.tensor(some))
    _same(rows, {k: direct[k][keep] for k in ("image_id", *(f"{layer}/score" for layer in LAYERS))})


def test_code_reader_reads_the_shards_csr(store) -> None:
    """Each image's codes are the dense form of its rows of the decompose shard's CSR."""
    shard = load_file(str(sorted((store.root / "decompose" / "shards").glob("*.safetensors"))[0]))
    for layer in LAYERS:
        reader = art.CodeReader(store, layer)
        indptr, indices, values = (shard[f"{layer}/{k}"] for k in ("indptr", "indices", "values"))
        ids = shard["image_id"].tolist()
        positions = (indptr.numel() - 1) // len(ids)
        j = len(ids) - 1
        expected = torch.zeros(positions, reader.K)
        for p in range(positions):
            lo, hi = int(indptr[j * positions + p]), int(indptr[j * positions + p + 1])
            expected[p, indices[lo:hi].long()] = values[lo:hi]
        assert torch.equal(reader.codes(ids[j]), expected)
        assert reader.K == art.load_dictionary(store, layer).shape[0]


def test_json_readers_return_the_files_content(store) -> None:
    root = store.root
    assert art.load_images(store) == _json(root / "collect" / "images.json")
    assert art.run_targets(store) == {
        i["image_id"]: i["target"] for i in _json(root / "collect" / "images.json")["images"]
    }
    for layer in LAYERS:
        assert art.load_concept_cards(store, layer) == _json(root / "concepts" / f"{layer}.json")
        assert art.run_alpha(store, layer) == _json(root / "decompose" / "fidelity.json")[layer]["alpha"]
    assert art.load_front(store) == _json(root / "decompose" / "front.json")
    assert art.load_fidelity(store) == _json(root / "decompose" / "fidelity.json")
    assert art.graph_index(store) == _json(root / "graph" / "index.json")
    for name, path in art.saved_graph_files(store).items():
        assert art.load_graph(store, path.name) == _json(root / "graph" / f"{name}.json")
    assert art.load_evaluation_summary(root / "evaluate") == _json(root / "evaluate" / "summary.json")


def test_derived_readers(store, tmp_path) -> None:
    """Labels, stability and evaluation reconstruction figures read from files written here."""
    assert art.load_stability(store) is None and art.load_reconstruction(tmp_path) == {}
    (tmp_path / "extraction.json").write_text(
        json.dumps({"layers": {"b": {"ours": {"reconstruction": {"r2": 0.9}}, "kmeans": {"auc": 1}}}})
    )
    assert art.load_reconstruction(tmp_path) == {"b": {"ours": {"r2": 0.9}}}
    assert art.parse_labels("b:\n  3: dogs\n  4: {name: cats, note: n}\n", tmp_path) == {
        "b": {3: {"name": "dogs"}, 4: {"name": "cats", "note": "n"}}
    }


def test_owner_modules_re_export_the_moved_readers() -> None:
    """Existing callers keep working: every moved reader is importable from its former module,
    as the same object (moved, not copied)."""
    import gig.ablate
    import gig.attribution
    import gig.collect
    import gig.concepts
    import gig.decompose
    import gig.erf
    import gig.evaluation.extraction
    import gig.graph
    import gig.labels
    import gig.stability

    moved = {
        gig.collect: ("load_samples", "load_images"),
        gig.concepts: ("load_dictionary", "load_concept_cards"),
        gig.decompose: ("load_front", "load_fidelity", "CodeReader", "from_sparse_rows", "run_alpha"),
        gig.attribution: (
            "load_path_records",
            "iter_attributions",
            "load_attributions",
            "load_error_estimates",
            "completeness_residuals",
            "PATHS_FILE",
            "SUMMARY_FIELDS",
        ),
        gig.graph: ("run_targets", "graph_index", "load_run_sums", "RunSums", "RUN_SUMS"),
        gig.ablate: ("load_walk", "correlation_path", "load_correlation", "load_ablations", "ablation_path"),
        gig.stability: ("load_stability",),
        gig.labels: ("labels_path", "load_labels", "LABELS_FILE"),
        gig.erf: ("erf_dir", "crop_paths"),
        gig.evaluation.extraction: ("load_reconstruction",),
    }
    for module, names in moved.items():
        for name in names:
            assert getattr(module, name) is getattr(art, name), f"{module.__name__}.{name}"
    assert gig.ablate.SCHEMA == art.ABLATION_SCHEMA
