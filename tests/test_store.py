"""The run directory under faults: one writer at a time, inputs fingerprinted by content,
atomic artefacts, caches keyed by what they depend on."""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from gig.cli import app
from gig.config import Config
from gig.erf import erf_dir, save_png
from gig.models import wrap_module
from gig.pipeline import Pipeline
from gig.store import RunBusyError, RunStore, run_lock, save_json

SMALL = dict(layers=["_blocks.15"], samples_per_image=4, top_k=2, batch_size=2, gig_tol=0.05)


def _photos(root, n=3):
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (64, 48), (40 * i, 90, 200 - 30 * i)).save(root / f"p{i}.png")
    return root


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "r"
    with run_lock(run):
        with pytest.raises(RunBusyError, match=r"in use by process \d+"):
            Pipeline(Config(max_images=1, **SMALL), run, progress=False)
        result = CliRunner().invoke(app, ["collect", str(run), "--max-images", "1", "--layer", "_blocks.15"])
        assert result.exit_code == 2 and "in use by process" in result.output
    Pipeline(Config(max_images=1, **SMALL), run, progress=False)  # free again once released


def test_replaced_photo_recomputes_from_collect(tmp_path):
    photos = _photos(tmp_path / "photos")
    run = tmp_path / "r"
    config = Config(images=str(photos), **SMALL)
    Pipeline(config, run, progress=False).collect()
    store = RunStore.open(run)
    before = store.expected_hash("collect")
    assert store.is_done("collect")
    Pipeline(config, run, progress=False)  # the same files: nothing to redo
    assert RunStore.open(run).is_done("collect")
    Image.new("RGB", (64, 48), (250, 10, 10)).save(photos / "p1.png")  # same path, new contents
    with pytest.warns(UserWarning, match="changed since its stages ran"):
        pipe = Pipeline(config, run, progress=False)
    assert not pipe.store.is_done("collect") and pipe.store.expected_hash("collect") != before
    assert erf_dir(pipe.store, "_blocks.15") != tmp_path / "r" / "erf" / before / "_blocks.15"
    pipe.collect()
    assert pipe.store.is_done("collect")
    # Replaced the way `cp -p` or `rsync -a` replaces it: same size, modification time kept.
    target = photos / "p1.png"
    stat = target.stat()
    swapped = bytearray(target.read_bytes())
    swapped[-20] ^= 0xFF  # inside the last chunk's data: same size, other contents
    target.write_bytes(bytes(swapped))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert target.stat().st_size == stat.st_size and target.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.warns(UserWarning, match="changed since its stages ran"):
        assert not Pipeline(config, run, progress=False).store.is_done("collect")


def test_a_run_with_a_stat_based_fingerprint_adopts_the_content_one_without_recompute(tmp_path):
    """Runs made before 0.3 recorded the images by path, size and time: the first run of 0.3
    on unchanged images keeps their stage hashes and adds the content key."""
    from gig.access import inputs_key

    photos = _photos(tmp_path / "photos")
    run = tmp_path / "r"
    config = Config(images=str(photos), **SMALL)
    pipe = Pipeline(config, run, progress=False)
    pipe.collect()
    old_key = inputs_key(pipe.source, pipe.bundle, config.max_images, content=False)
    manifest = pipe.store.manifest()
    manifest["inputs"] = {"key": old_key}  # as 0.2 wrote it
    save_json(pipe.store.manifest_path, manifest)
    store = RunStore.open(run)
    manifest["stages"]["collect"]["hash"] = store.expected_hash("collect")  # collect done under that key
    save_json(store.manifest_path, manifest)
    again = Pipeline(config, run, progress=False)
    assert again.store.is_done("collect")
    inputs = again.store.manifest()["inputs"]
    assert inputs["key"] == old_key and inputs["content"] == inputs_key(again.source, again.bundle, config.max_images)


def test_run_from_before_fingerprints_is_adopted_without_recompute(tmp_path):
    run = tmp_path / "r"
    store = RunStore.create(run, Config(max_images=1, **SMALL))
    manifest = store.manifest()
    manifest["stages"]["collect"] = {"hash": store.expected_hash("collect"), "status": "done"}
    save_json(store.manifest_path, manifest)
    assert store.record_inputs("abc") is False and store.is_done("collect")
    assert store.record_inputs("abc") is False and store.is_done("collect")
    assert store.record_inputs("other") is True and not store.is_done("collect")


def test_weights_fingerprint_follows_the_values():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    bundle = wrap_module(model)
    first = bundle.fingerprint()
    assert wrap_module(model).fingerprint() == first
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] += 1e-3
    assert bundle.fingerprint() != first


def test_png_written_atomically_on_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "erf" / "s1.png"

    def full(self, fp, *args, **kwargs):
        open(fp, "wb").write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OSError):
        save_png(Image.new("RGB", (4, 4)), target)
    assert list(target.parent.iterdir()) == []  # neither a truncated crop nor a temporary file


@pytest.mark.parametrize("library", [False, True])
def test_full_disk_is_one_line_and_keeps_finished_work(tmp_path, monkeypatch, library):
    """``library``: the error safetensors really raises on a full disk (a SafetensorError that is
    no OSError, measured on a 64 kB tmpfs), which used to escape as a traceback."""
    from safetensors import SafetensorError

    import gig.store

    run = tmp_path / "r"
    assert CliRunner().invoke(app, ["collect", str(run), "--max-images", "2", "--layer", "_blocks.15"]).exit_code == 0
    real = gig.store.save_file

    def full(tensors, path, *a, **k):
        if library:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(gig.store, "save_file", full)
    result = CliRunner().invoke(app, ["run", "--out", str(run), "--max-images", "2", "--layer", "_blocks.15"])
    assert result.exit_code == 2 and "disk full" in result.output and "Traceback" not in result.output
    monkeypatch.setattr(gig.store, "save_file", real)
    assert RunStore.open(run).is_done("collect")


_KILLED_RUN = """
import os, signal, sys
import gig.collect, gig.decompose, gig.store
from gig.config import Config
from gig.pipeline import Pipeline

gig.collect.SHARD_IMAGES = gig.decompose.SHARD_IMAGES = 2   # two shards of two images
stage, out = sys.argv[1], sys.argv[2]
mark = gig.store.RunStore.mark_shard

def mark_then_die(self, name, shard, info=None):
    mark(self, name, shard, info)
    if name == stage:
        os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no exception handlers, no atexit

gig.store.RunStore.mark_shard = mark_then_die
Pipeline(Config(**{config!r}), out, progress=False).run()
"""
KILL_CONFIG = dict(
    max_images=4,
    layers=["_blocks.15"],
    gig_tol=0.05,
    top_k=2,
    batch_size=2,
    samples_per_image=6,
    min_cluster=2,
    calibration_size=40,
)


@contextmanager
def _one_thread():
    """Bit-for-bit comparisons across processes need the same thread count everywhere: a
    convolution's summation order, hence its last bits, depends on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    import gig.collect
    import gig.decompose

    root = tmp_path_factory.mktemp("clean")
    saved = gig.collect.SHARD_IMAGES, gig.decompose.SHARD_IMAGES
    gig.collect.SHARD_IMAGES = gig.decompose.SHARD_IMAGES = 2
    try:
        with _one_thread():
            Pipeline(Config(**KILL_CONFIG), root / "r", progress=False).run(
                ["collect", "concepts", "decompose", "attribute"]
            )
    finally:
        gig.collect.SHARD_IMAGES, gig.decompose.SHARD_IMAGES = saved
    return root / "r"


@pytest.mark.parametrize("stage", ["collect", "decompose", "attribute"])
def test_sigkill_mid_stage_resumes_to_identical_results(stage, uninterrupted, tmp_path, monkeypatch):
    """A process killed with SIGKILL right after a stage's first shard: the rerun keeps that
    shard, computes the rest, and every tensor equals an uninterrupted run's."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    import gig.collect
    import gig.decompose

    run = tmp_path / "r"
    script = _KILLED_RUN.replace("{config!r}", repr(KILL_CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", script, stage, str(run)], capture_output=True, text=True, env=env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    store = RunStore.open(run)
    assert store.stage_state(stage) == "did not finish"
    assert store.shard_done(stage, "00000") and not store.shard_done(stage, "00001")
    kept = (run / stage / "shards" / "00000.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(gig.collect, "SHARD_IMAGES", 2)
    monkeypatch.setattr(gig.decompose, "SHARD_IMAGES", 2)
    with _one_thread():
        Pipeline(Config(**KILL_CONFIG), run, progress=False).run(["collect", "concepts", "decompose", "attribute"])
    assert (run / stage / "shards" / "00000.safetensors").stat().st_mtime_ns == kept  # not redone
    files = sorted(p.relative_to(uninterrupted) for p in (uninterrupted / stage).rglob("*.safetensors"))
    assert files
    for rel in files:
        want, got = load_file(str(uninterrupted / rel)), load_file(str(run / rel))
        assert want.keys() == got.keys(), rel
        for key in want:
            assert torch.equal(want[key], got[key]), f"{rel}:{key}"


def test_damaged_manifest_config_and_artefact_are_one_line(tmp_path):
    """A truncated manifest.json, config.yaml or JSON artefact (issue 25): exit 2 with one line
    naming the file, not a JSONDecodeError traceback or a config read as 'weights: defau'."""
    run = tmp_path / "r"
    (run / "collect").mkdir(parents=True)
    Config(max_images=1).save(run / "config.yaml")
    (run / "manifest.json").write_text('{"fingerprint": {"images": "ab')  # cut mid-string
    result = CliRunner().invoke(app, ["inspect", str(run)])
    assert result.exit_code == 2 and "damaged" in result.output and "manifest.json" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    (run / "manifest.json").unlink()
    (run / "collect" / "images.json").write_text('{"images": [')
    from gig.errors import RunMismatchError
    from gig.store import load_json

    with pytest.raises(RunMismatchError, match=r"damaged artefact .*images\.json \(Expecting value, line 1\)"):
        load_json(run / "collect" / "images.json")
    (run / "config.yaml").write_text("model: efficientnet-lite0\nweig")  # cut mid-key
    result = CliRunner().invoke(app, ["inspect", str(run)])
    assert result.exit_code == 2 and "not valid YAML at line 2" in result.output and "config.yaml" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_a_read_only_run_is_read_without_writing_into_it(tiny_run, tmp_path, monkeypatch):
    """A finished run that cannot be written (a read-only mount; simulated, since the tests may
    run as root): the report with --out elsewhere and an ablation write nothing into it (issue
    25: the report wrote ERF crops into the run); what they derive goes to the user's cache."""
    import shutil

    import gig.store
    from gig.ablate import ablate
    from gig.report import ReportOptions, build_report

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    shutil.rmtree(run / "erf", ignore_errors=True)  # the crops must be made anew
    shutil.rmtree(run / "graph" / "ablation", ignore_errors=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = gig.store.run_is_writable
    monkeypatch.setattr(
        gig.store,
        "run_is_writable",
        lambda root: (
            Path(root).resolve() != run.resolve()
            and not str(Path(root).resolve()).startswith(str(run.resolve()) + "/")
            and real(root)
        ),
    )

    def listing():
        return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*")}

    before = listing()
    build_report(
        run, tmp_path / "report", ReportOptions(atlas_per_layer=3, n_images=2, max_classes=1), model=tiny_run["bundle"]
    )
    result = ablate(run, "_blocks.15", [0], model=tiny_run["bundle"])
    assert listing() == before
    assert (tmp_path / "report" / "index.html").is_file()
    assert any((tmp_path / "cache" / "gig" / "runs").rglob("s*.png"))
    assert str(result.path).startswith(str(tmp_path / "cache"))


def test_damaged_shards_are_one_line_naming_the_file(tiny_run, tmp_path):
    """A cut or overwritten safetensors header in an attribute or decompose shard (issue 25):
    the readers every command uses raise RunMismatchError naming the file, not SafetensorError."""
    import shutil

    from gig.attribution import load_attributions
    from gig.decompose import CodeReader
    from gig.errors import RunMismatchError

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    store = RunStore.open(run)
    for stage in ("attribute", "decompose"):
        shard = sorted((run / stage / "shards").glob("*.safetensors"))[0]
        data = bytearray(shard.read_bytes())
        data[8:40] = b"x" * 32  # the header's JSON
        shard.write_bytes(bytes(data))
    with pytest.raises(RunMismatchError, match=r"damaged artefact .*attribute/shards/00000\.safetensors"):
        load_attributions(store)
    with pytest.raises(RunMismatchError, match=r"damaged artefact .*decompose/shards/00000\.safetensors"):
        CodeReader(store, store.config.layers[0])


def test_readers_refuse_a_run_whose_photo_was_replaced(tiny_run, tmp_path, monkeypatch):
    """The report and ablate read a run through RunAccess, which checks the run's images and
    weights against its fingerprint (issue 25: after a photo was replaced, the report drew the
    old photo's GIG maps over the new one; after the weights were, ablate ran them with the old
    dictionaries; both exit 0). The images' fingerprint itself is tested with the pipeline."""
    import copy

    import gig.images
    from gig.ablate import ablate
    from gig.errors import RunMismatchError
    from gig.report import ReportOptions, build_report

    bundle = tiny_run["bundle"]
    options = ReportOptions(atlas_per_layer=2, n_images=1, max_classes=1)
    build_report(tiny_run["run"], tmp_path / "ok", options, model=bundle)  # the same inputs: accepted
    other = copy.deepcopy(bundle)
    with torch.no_grad():
        next(other.model.parameters()).add_(1e-3)  # weights replaced under the same name
    with pytest.raises(RunMismatchError, match="weights changed"):
        ablate(tiny_run["run"], "_blocks.15", [0], model=other, save=False)
    from gig.access import RunAccess

    with pytest.raises(RunMismatchError, match="the model's weights changed"):
        RunAccess(tiny_run["run"], model=other).bundle  # what explain of new photos reads alone
    assert RunAccess(tiny_run["run"], model=bundle).bundle is bundle
    real = gig.images.ImageSource.content_fingerprint
    monkeypatch.setattr(
        gig.images.ImageSource, "content_fingerprint", lambda self, records=None: "x" + real(self, records)
    )
    with pytest.raises(RunMismatchError, match="images or model weights changed"):
        build_report(tiny_run["run"], tmp_path / "changed", options, model=bundle)


def test_flipped_bits_in_a_shard_are_caught_on_every_read(tiny_run, tmp_path):
    """Five flipped bits in the data of an attribute and a decompose shard (issue 25: they changed
    a graph's edge weights from 0.012 to 6e-22 with every command exiting 0): the readers and
    `gig graph --force` refuse the file in one line naming it; the checksum in the header is
    BLAKE2b of the tensors' names, dtypes, shapes and bytes, computed here by hand."""
    import hashlib
    import shutil

    from safetensors import safe_open
    from typer.testing import CliRunner

    from gig.attribution import load_attributions
    from gig.cli import app
    from gig.decompose import CodeReader
    from gig.errors import RunMismatchError
    from gig.store import CHECKSUM_KEY

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    shard = run / "attribute" / "shards" / "00000.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        assert f.metadata()[CHECKSUM_KEY] == digest.hexdigest()
    for stage in ("attribute", "decompose"):
        path = sorted((run / stage / "shards").glob("*.safetensors"))[0]
        data = bytearray(path.read_bytes())
        header = 8 + int.from_bytes(data[:8], "little")
        for k in range(5):  # one bit in each of five bytes of the tensors' data
            data[header + 7 + 13 * k] ^= 1 << k
        path.write_bytes(bytes(data))
    store = RunStore.open(run)
    with pytest.raises(RunMismatchError, match=r"attribute/shards/00000\.safetensors: its content does not match"):
        load_attributions(store)
    with pytest.raises(RunMismatchError, match=r"decompose/shards/00000\.safetensors: its content does not match"):
        CodeReader(store, store.config.layers[0])
    result = CliRunner().invoke(app, ["graph", str(run), "--force"])
    assert result.exit_code == 2 and "does not match the checksum" in result.output
    assert "Traceback" not in result.output
    assert any(
        line.startswith("error: damaged artefact") and "shards/00000.safetensors: its content" in line
        for line in result.output.splitlines()
    )


def test_json_artefacts_carry_a_checksum_verified_on_every_read(tmp_path):
    """save_json adds BLAKE2b-128 of the object's compact JSON (computed here by hand) as one more
    key; load_json checks it and gives back the object as written (numpy numbers, tuples, int keys
    and NaN included); one changed digit is refused naming the file; files from before checksums
    and non-objects are read as they are."""
    import hashlib
    import json
    import math

    import numpy as np

    from gig.errors import RunMismatchError
    from gig.store import JSON_CHECKSUM_KEY, load_json, save_json

    data = {"w": np.float32(0.1), "pair": (1, 2), 3: "three", "nan": float("nan"), "n": np.int64(7), "é": [0.25]}
    path = tmp_path / "a.json"
    save_json(path, data)
    raw = json.loads(path.read_text())
    written = raw.pop(JSON_CHECKSUM_KEY)
    compact = json.dumps(raw, separators=(",", ":"))
    assert written == hashlib.blake2b(compact.encode(), digest_size=16).hexdigest()
    back = load_json(path)
    assert JSON_CHECKSUM_KEY not in back and list(back) == ["w", "pair", "3", "nan", "n", "é"]
    assert back["w"] == float(np.float32(0.1)) and back["pair"] == [1, 2] and math.isnan(back["nan"])
    save_json(path, back)  # saving what was read gives the same file
    assert json.loads(path.read_text())[JSON_CHECKSUM_KEY] == written

    path.write_text(path.read_text().replace('"n": 7', '"n": 8'))
    with pytest.raises(RunMismatchError, match=r"a\.json: its content does not match the checksum"):
        load_json(path)
    old = tmp_path / "old.json"
    old.write_text('{"n": 7}')
    assert load_json(old) == {"n": 7}
    save_json(tmp_path / "list.json", [1, 2])
    assert load_json(tmp_path / "list.json") == [1, 2]


def test_an_edited_front_or_manifest_is_refused_in_one_line(tiny_run, tmp_path):
    import re
    import shutil

    from typer.testing import CliRunner

    from gig.cli import app

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    front = run / "decompose" / "front.json"
    text = front.read_text()
    # one digit of the first number changed: still valid JSON, another value
    edited = re.sub(r"(\d)(,\n)", lambda m: f"{(int(m.group(1)) + 1) % 10}{m.group(2)}", text, count=1)
    assert edited != text
    front.write_text(edited)
    result = CliRunner().invoke(app, ["inspect", str(run)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "front.json: its content does not match the checksum" in result.output
    front.write_text(text)
    manifest = run / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"done"', '"dome"', 1))
    result = CliRunner().invoke(app, ["inspect", str(run)])
    assert result.exit_code == 2 and "damaged" in result.output and "manifest.json" in result.output


def test_a_layer_the_run_does_not_analyse_is_one_error_everywhere(tiny_run):
    """The store's one layer check: labels, the notebook API, stability and `gig concept` all
    raise LayerNotAnalysedError (a ConfigError and a LayerNotFoundError) naming the run's layers."""
    import gig
    from gig.errors import ConfigError, LayerNotAnalysedError, LayerNotFoundError
    from gig.labels import set_label
    from gig.stability import concept_stability

    store = RunStore.open(tiny_run["run"])
    assert store.analysed(list(store.config.layers)) == list(store.config.layers)
    calls = [
        lambda: store.analysed("_blocks.99"),
        lambda: set_label(store, "_blocks.99", 0, "x"),
        lambda: gig.open(tiny_run["run"], model=tiny_run["bundle"]).concepts("_blocks.99"),
        lambda: concept_stability(store, seeds=1, layers=["_blocks.99"], progress=False),
    ]
    for call in calls:
        with pytest.raises(LayerNotAnalysedError, match="'_blocks.99' not analysed.*_blocks.8, _blocks.15") as info:
            call()
        assert isinstance(info.value, ConfigError) and isinstance(info.value, LayerNotFoundError)
    from typer.testing import CliRunner

    from gig.cli import app

    shown = CliRunner().invoke(app, ["concept", str(tiny_run["run"]), "_blocks.99", "0"])
    assert shown.exit_code == 2 and "not analysed" in shown.output and "Traceback" not in shown.output


def _flip_bits(path: Path) -> None:
    """Five flipped bits in the tensors' data of a safetensors file (the header left intact)."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for k in range(5):
        data[header + 7 + 13 * k] ^= 1 << k
    path.write_bytes(bytes(data))


def _assert_same(got: dict, want: dict) -> None:
    """The same tensors, bit for bit (NaN where NaN: error estimates on a fixed grid)."""
    assert got.keys() == want.keys()
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_gig_run_computes_damaged_artefacts_again(tiny_run, tmp_path):
    """`gig run` recomputes what a stage finds damaged (a shard alone), and with --verify it first
    checks every finished stage's artefacts: flipped bits in an attribute and a decompose shard
    and an edited concept card come back as they were (every stage is deterministic), the
    graphs unchanged, with a warning naming each file."""
    import shutil

    from gig.pipeline import Pipeline
    from gig.store import load_json, load_tensors

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run, ignore=shutil.ignore_patterns("report", "evaluate", "erf"))
    store = RunStore.open(run)
    layer = store.config.layers[0]
    attribute, decompose = (
        run / "attribute" / "shards" / "00000.safetensors",
        run / "decompose" / "shards" / "00000.safetensors",
    )
    card = run / "concepts" / f"{layer}.json"
    # copies: a loaded tensor may map the file, which the bit flips below rewrite in place
    before = {p: {k: v.clone() for k, v in load_tensors(p).items()} for p in (attribute, decompose)}
    card_before, graph_before = load_json(card), load_json(run / "graph" / "global.json")
    # A stage that reads a damaged shard: the attribute shard is computed again, then the graph,
    # though only the graph stage was asked for (without the shard it would miss images).
    _flip_bits(attribute)
    store.repair(run / "graph" / "global.json")  # the graph stage must run (and read the shards)
    with pytest.warns(UserWarning, match=r"attribute/shards/00000\.safetensors: the attribute stage computes it again"):
        Pipeline.open(run, model=tiny_run["bundle"], progress=False).run(["graph"])
    _assert_same(load_tensors(attribute), before[attribute])
    assert load_json(run / "graph" / "global.json") == graph_before
    # Damage no stage reads any more: found by --verify.
    _flip_bits(decompose)
    card.write_text(card.read_text().replace('"count": ', '"count": 1', 1))
    assert sorted(p.name for p in store.verify()) == sorted([decompose.name, card.name])
    with pytest.warns(UserWarning, match="computes it again"):
        Pipeline.open(run, model=tiny_run["bundle"], progress=False).run(verify=True)
    assert store.verify() == []
    _assert_same(load_tensors(decompose), before[decompose])
    assert load_json(card) == card_before
    assert load_json(run / "graph" / "global.json") == graph_before


def test_entry_points_take_a_run_opened_once(tiny_run, tmp_path):
    """A run opened once is passed down: the summary, the report and the evaluation accept the
    store as they accept its directory, with the same result."""
    from gig.evaluation import EvaluationSettings, evaluate_run
    from gig.report import ReportOptions, build_report
    from gig.summary import summarize

    store = RunStore.open(tiny_run["run"])
    assert summarize(store) == summarize(tiny_run["run"])
    options = ReportOptions(atlas_per_layer=1, n_images=1, max_classes=1, shared_classes=0)
    index = build_report(store, tmp_path / "report", options, model=tiny_run["bundle"])
    assert index.is_file()
    settings = EvaluationSettings(extraction_images=1, interlayer_images=0, methods=["ours"])
    evaluate_run(store, settings, out=tmp_path / "evaluate", model=tiny_run["bundle"], progress=False)
    assert (tmp_path / "evaluate" / "summary.json").is_file()
