"""The run directory: config, manifest, and every stage's artefacts.

Layout::

    RUN/
      config.yaml            the full configuration of the run
      manifest.json          per stage: settings hash, status, time, peak memory, summary
      collect/               sampled PFVs per layer (+ shards while running)
      concepts/              dictionary V (K×C), members and exemplars per layer
      decompose/             sparse coefficients U of every position, per layer, in shards
      attribute/             GIG vectors and maps per image, in shards
      graph/                 graph JSON files and static pictures

Where each artefact lies in these folders, and its reader: :mod:`gig.artefacts`.
Artefacts are safetensors (tensors) and JSON (everything else); nothing is pickled. Long stages
write shards and mark each finished shard, so an interrupted stage resumes at the next shard.
Every tensor file carries a checksum of its content in its header (:func:`tensors_checksum`),
checked when it is read: flipped bits end in one line naming the file, not in other numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from . import __version__
from .config import STAGE_ORDER, Config, stage_hash
from .errors import DamagedArtefactError, RunBusyError, RunMismatchError


@contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """Hold ``RUN/.lock`` (an advisory ``flock``) while writing to a run, so two processes can
    never compute in one directory at once: the second gets :class:`RunBusyError` naming the
    holder. The kernel drops the lock when its process dies, so a killed run leaves none behind."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, no guard
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".lock"
    if not run_is_writable(root):  # a read-only run: nobody can compute in it, nothing to guard
        yield
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunBusyError(
                f"{root} is in use by {holder}; wait for it to finish or use another --out directory"
            ) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} since {_now()}")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_is_writable(root: Path) -> bool:
    """Whether this process can write into the run directory ``root`` (not a read-only mount,
    not another user's run)."""
    return os.access(root, os.W_OK)


def derived_dir(store: "RunStore", *parts: str) -> Path:
    """Where a command that reads a finished run writes what it derives from it (ERF crops,
    ablation results): ``RUN/PARTS``, or, where the run directory cannot be written, the same
    path under the user's cache, ``$XDG_CACHE_HOME/gig/runs/RUN_KEY/PARTS`` (default
    ``~/.cache``), keyed by the run's resolved path; the run itself is never touched then."""
    if run_is_writable(store.root) and all(run_is_writable(p) for p in _existing_prefixes(store.root, parts)):
        return store.root.joinpath(*parts)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gig" / "runs"
    key = hashlib.sha256(str(store.root.resolve()).encode()).hexdigest()[:16]
    return cache.joinpath(key, *parts)


def _existing_prefixes(root: Path, parts: tuple[str, ...]) -> list[Path]:
    """The folders of ``root/parts[0]/parts[1]/…`` that already exist (each must be writable)."""
    out, path = [], root
    for part in parts:
        path = path / part
        if not path.is_dir():
            break
        out.append(path)
    return out


#: The safetensors metadata key that holds a file's :func:`tensors_checksum`.
CHECKSUM_KEY = "gig_blake2b"


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """BLAKE2b-128 of every tensor's name, dtype, shape and bytes, in name order: the content of
    a tensor file, whatever its layout on disk."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor | np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors atomically (a crash never leaves a half-written file under the real name),
    with their checksum (and any ``metadata`` strings) in the file's header; the folder is made
    where missing."""
    data = {
        k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.contiguous())
        for k, v in tensors.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        save_file(data, str(tmp), metadata={**(metadata or {}), CHECKSUM_KEY: tensors_checksum(data)})
    except SafetensorError as exc:  # its I/O failures are not OSErrors: give them their errno back
        tmp.unlink(missing_ok=True)
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an artefact, its checksum verified."""
    from safetensors import safe_open

    if not path.is_file():
        raise RunMismatchError(f"missing artefact {path}: run the stage that makes it first")
    with _readable(path), safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        written = (handle.metadata() or {}).get(CHECKSUM_KEY)
    _compare_checksum(path, tensors, written)
    return tensors


@contextmanager
def open_tensors(path: str | Path) -> Iterator[Any]:
    """``safetensors.safe_open`` on an artefact (lazy reads by key and slice), with a damaged
    file (a cut or overwritten header, a truncated tensor, content that does not match its
    checksum) answered by one line naming it. The checksum is verified the first time this
    process opens the file (as it is now: a rewritten file is verified again)."""
    from safetensors import safe_open

    with _readable(path), safe_open(str(path), framework="pt") as handle:
        stat = os.stat(path)
        key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _VERIFIED:
            written = (handle.metadata() or {}).get(CHECKSUM_KEY)
            if written is not None:
                _compare_checksum(path, {k: handle.get_tensor(k) for k in handle.keys()}, written)
            _VERIFIED.add(key)
        yield handle


#: Tensor files verified by this process: (resolved path, size, modification time in ns).
_VERIFIED: set[tuple[str, int, int]] = set()


def _compare_checksum(path: str | Path, tensors: dict[str, torch.Tensor], written: str | None) -> None:
    """Raise where ``tensors`` (read from ``path``) do not match the checksum written with them.
    Files written before checksums (gig < 0.4) have none and are read as they are."""
    if written is not None and tensors_checksum(tensors) != written:
        raise DamagedArtefactError(
            path,
            f"damaged artefact {path}: its content does not match the checksum written with it (flipped "
            "bits or an edited file); rerun the stage that writes it (gig STAGE --force RUN)",
        )


@contextmanager
def _readable(path: str | Path) -> Iterator[None]:
    try:
        yield
    except SafetensorError as exc:
        raise DamagedArtefactError(
            path, f"damaged artefact {path} ({exc}): rerun the stage that writes it (gig STAGE --force RUN)"
        ) from exc


#: The key under which :func:`save_json` writes a JSON object's :func:`json_checksum`.
JSON_CHECKSUM_KEY = "gig_blake2b"


def json_checksum(data: Any) -> str:
    """BLAKE2b-128 of ``data`` written as compact JSON (keys in their order). A value read back
    from the file gives the same text (floats round-trip exactly, key order is kept), so the
    checksum of what :func:`load_json` parses equals the one written."""
    text = json.dumps(data, separators=(",", ":"), default=_json_default)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def save_json(path: Path, data: Any) -> None:
    """Write JSON atomically; an object gets its :func:`json_checksum` as one more key
    (:data:`JSON_CHECKSUM_KEY`, last), verified and removed again by :func:`load_json`; the
    folder is made where missing."""
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != JSON_CHECKSUM_KEY}
        data[JSON_CHECKSUM_KEY] = json_checksum(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)


def load_json(path: Path) -> Any:
    """A JSON artefact, its checksum verified where it has one (files written before gig 0.5
    have none and are read as they are); a damaged file is one line naming it."""
    if not path.is_file():
        raise RunMismatchError(f"missing artefact {path}: run the stage that makes it first")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # truncated or overwritten
        what = f"{exc.msg}, line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise DamagedArtefactError(
            path,
            f"damaged artefact {path} ({what}): rerun the stage that writes it "
            f"(gig STAGE --force RUN), or the whole run",
        ) from exc
    return _verified_json(path, data)


def _verified_json(path: Path, data: Any) -> Any:
    if isinstance(data, dict) and JSON_CHECKSUM_KEY in data:
        written = data.pop(JSON_CHECKSUM_KEY)
        if json_checksum(data) != written:
            raise DamagedArtefactError(
                path,
                f"damaged artefact {path}: its content does not match the checksum written with it "
                "(flipped bits or an edited file); rerun the stage that writes it (gig STAGE --force RUN)",
            )
    return data


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def layer_key(layer: str) -> str:
    """A file-name-safe form of a qualified layer name (``_blocks.8`` → ``_blocks.8``)."""
    return layer.replace("/", "_").replace(":", "_")


class PeakMemory:
    """Samples this process's resident memory in a thread; ``peak_mb`` after the block."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.peak_mb = self._proc.memory_info().rss / 2**20
        self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
        # CUDA's own peak (allocated tensors), where the stage ran on a GPU.
        self.cuda_peak_mb = (
            torch.cuda.max_memory_allocated() / 2**20
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None
        )


class RunStore:
    """One run directory. ``RunStore.create(dir, config)`` or ``RunStore.open(dir)``."""

    def __init__(self, root: str | Path, config: Config):
        self.root = Path(root)
        self.config = config

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, root: str | Path, config: Config) -> "RunStore":
        """Open ``root`` for ``config``; stages whose settings changed will be recomputed."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root, config)
        config.save(root / "config.yaml")
        if not store.manifest_path.exists():
            save_json(store.manifest_path, {"gig_version": __version__, "created": _now(), "stages": {}})
        return store

    @classmethod
    def open(cls, root: str | Path) -> "RunStore":
        root = Path(root)
        if not (root / "config.yaml").is_file():
            raise RunMismatchError(f"{root} is not a gig run directory (no config.yaml)")
        return cls(root, Config.load_saved(root / "config.yaml"))

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        try:
            return _verified_json(self.manifest_path, json.loads(self.manifest_path.read_text()))
        except FileNotFoundError:
            return load_json(self.manifest_path)  # the one message for a missing artefact
        except (json.JSONDecodeError, UnicodeDecodeError, RunMismatchError) as exc:  # cut, or not as written
            raise RunMismatchError(
                f"damaged {self.manifest_path}: the run's record of its stages and inputs is "
                "lost; restore it from a copy, or rerun into a new directory"
            ) from exc

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        save_json(self.manifest_path, manifest)

    # ------------------------------------------------------------------ stages
    def stage_dir(self, stage: str) -> Path:
        path = self.root / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ------------------------------------------------------------------ inputs
    def inputs_seed(self) -> str:
        """The fingerprint of the images and weights the stages were computed from, chained
        into every stage hash ("" for runs made before fingerprints were recorded)."""
        inputs = self.manifest().get("inputs", {})
        return "" if inputs.get("legacy") else inputs.get("key", "")

    def record_inputs(self, key: str, content: str | None = None, weights: str | None = None) -> bool:
        """Record the fingerprint of the inputs about to be used; True when it differs from the
        one the finished stages were computed from (they are then no longer done, and recompute).
        A run from before fingerprints adopts the current one without recomputing. ``key`` is
        chained into every stage hash; ``content``, the images' and weights' content key, is what
        later runs compare (a run whose ``key`` is still stat-based keeps it, and gains
        ``content``); ``weights``, the weights' own fingerprint, lets a reader that loads only the
        model check it."""
        manifest = self.manifest()
        inputs = manifest.get("inputs")
        extra = {k: v for k, v in (("content", content), ("weights", weights)) if v is not None}
        if inputs is not None and inputs.get("key") == key:
            if any(inputs.get(k) != v for k, v in extra.items()):
                manifest["inputs"] = {**inputs, **extra}
                self._write_manifest(manifest)
            return False
        any_done = any(entry.get("status") == "done" for entry in manifest["stages"].values())
        changed = inputs is not None and any_done
        manifest["inputs"] = {"key": key, **extra, **({"legacy": True} if inputs is None and any_done else {})}
        self._write_manifest(manifest)
        return changed

    def expected_hash(self, stage: str) -> str:
        upstream = self.inputs_seed()
        for name in STAGE_ORDER:
            upstream = stage_hash(self.config, name, upstream)
            if name == stage:
                return upstream
        raise KeyError(stage)

    def is_done(self, stage: str) -> bool:
        entry = self.manifest()["stages"].get(stage, {})
        return entry.get("status") == "done" and entry.get("hash") == self.expected_hash(stage)

    def stage_state(self, stage: str) -> str:
        """``done``, ``has not run``, ``did not finish`` or ``ran with other settings``."""
        if self.is_done(stage):
            return "done"
        entry = self.manifest()["stages"].get(stage)
        return (
            "has not run"
            if entry is None
            else ("did not finish" if entry.get("status") != "done" else "ran with other settings")
        )

    def analysed(self, layers: str | list[str]) -> list[str]:
        """``layers`` (one name or several) if the run analyses all of them, else
        :class:`gig.errors.LayerNotAnalysedError` naming those it does not and the run's layers:
        the one check of a layer asked of a finished run."""
        from .errors import LayerNotAnalysedError

        asked = [layers] if isinstance(layers, str) else list(layers)
        own = list(self.config.layers or [])
        unknown = [layer for layer in asked if layer not in own]
        if unknown:
            raise LayerNotAnalysedError(
                f"layer(s) {', '.join(repr(l) for l in unknown)} not analysed in {self.root}; its layers: {', '.join(own)}"
            )
        return asked

    def require(self, stage: str) -> "RunStore":
        """Raise unless ``stage`` finished with the current settings; returns the store."""
        state = self.stage_state(stage)
        if state != "done":
            raise RunMismatchError(f"stage {stage!r} of {self.root} {state}: run `gig {stage} {self.root}` first")
        return self

    @contextmanager
    def stage(self, stage: str) -> Iterator[dict[str, Any]]:
        """Run a stage: wipes stale artefacts, records time, peak memory and the summary dict."""
        want = self.expected_hash(stage)
        manifest = self.manifest()
        entry = manifest["stages"].get(stage)
        path = self.root / stage
        if entry is not None and entry.get("hash") != want and path.exists():
            shutil.rmtree(path)  # settings changed: its shards must not be resumed
        manifest["stages"][stage] = {"hash": want, "status": "running", "started": _now()}
        self._write_manifest(manifest)
        summary: dict[str, Any] = {}
        start = time.perf_counter()
        with PeakMemory() as mem:
            yield summary
        manifest = self.manifest()
        manifest["stages"][stage] = {
            "hash": want,
            "status": "done",
            "started": manifest["stages"][stage]["started"],
            "finished": _now(),
            "seconds": round(time.perf_counter() - start, 2),
            "peak_rss_mb": round(mem.peak_mb, 1),
            **({"cuda_peak_mb": round(mem.cuda_peak_mb, 1)} if mem.cuda_peak_mb is not None else {}),
            "summary": summary,
        }
        self._write_manifest(manifest)

    def summary(self, stage: str) -> dict[str, Any]:
        return self.manifest()["stages"].get(stage, {}).get("summary", {})

    # ------------------------------------------------------------------ shards
    # ------------------------------------------------------------------ damage
    def verify(self, stages: list[str] | None = None) -> list[Path]:
        """Every artefact of the finished ``stages`` (default: all) read and checked against its
        checksum: the damaged ones (a stage's tensors and JSON files; ERF crops and reports are
        derived and not checked). Reads every file once."""
        from .config import STAGE_ORDER

        damaged = []
        for stage in stages or STAGE_ORDER:
            folder = self.root / stage
            if not self.is_done(stage) or not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                if path.suffix not in (".safetensors", ".json", ".done") or not path.is_file():
                    continue
                try:
                    load_tensors(path) if path.suffix == ".safetensors" else load_json(path)
                except DamagedArtefactError:
                    damaged.append(path)
        return damaged

    def repair(self, path: str | Path) -> str:
        """Make the stage that wrote the damaged artefact ``path`` run again, losing as little
        as possible: a shard of a sharded stage is deleted with its done-marker (the stage then
        recomputes that shard alone, and its summary); any other artefact is deleted and its
        stage marked unfinished (recomputed with the same settings; what depends on it stays
        valid, every stage being deterministic given its settings). Returns the stage."""
        from .config import STAGE_ORDER

        path = Path(path)
        stage = path.resolve().relative_to(self.root.resolve()).parts[0]
        if stage not in STAGE_ORDER:
            raise RunMismatchError(f"{path} is not an artefact of a stage of {self.root}")
        if path.parent.name == "shards":
            name = path.name.split(".", 1)[0]
            for sibling in (path.parent / f"{name}.safetensors", path.parent / f"{name}.done"):
                sibling.unlink(missing_ok=True)
        else:  # the stage writes it again (a front, a check or a dictionary is read back if present)
            path.unlink(missing_ok=True)
        manifest = self.manifest()
        entry = manifest["stages"].get(stage)
        if entry is not None:
            entry["status"] = "damaged"
            self._write_manifest(manifest)
        return stage

    def shard_done(self, stage: str, name: str) -> bool:
        return (self.root / stage / "shards" / f"{name}.done").exists()

    def shard_path(self, stage: str, name: str) -> Path:
        path = self.root / stage / "shards"
        path.mkdir(parents=True, exist_ok=True)
        return path / f"{name}.safetensors"

    def mark_shard(self, stage: str, name: str, info: dict[str, Any] | None = None) -> None:
        # A shard may have no tensors (every image of it unreadable): its folder may not exist yet.
        (self.root / stage / "shards").mkdir(parents=True, exist_ok=True)
        save_json(self.root / stage / "shards" / f"{name}.done", info or {})

    def shard_info(self, stage: str, name: str) -> dict[str, Any]:
        return load_json(self.root / stage / "shards" / f"{name}.done")


def as_store(run: "str | Path | RunStore") -> "RunStore":
    """A :class:`RunStore` from a run directory or a store (every entry point on a finished run
    takes either)."""
    return run if isinstance(run, RunStore) else RunStore.open(run)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
