"""The whole method as one object: stages run in order, each skipped when already done with the
same settings, each resumable (see :mod:`gig.store`).

>>> from gig import Config, Pipeline
>>> Pipeline(Config(max_images=8), "runs/demo").run()   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path

import torch

from .access import inputs_changed, inputs_differ, inputs_key
from .attribution import attribute
from .collect import collect
from .concepts import extract_concepts
from .config import STAGE_ORDER, Config
from .decompose import decompose
from .distributed import from_environment
from .erf import layer_crops
from .errors import ConfigError, DamagedArtefactError, InputError, RunMismatchError
from .graph import build_graphs
from .hooks import ModelHandle, resolve_device
from .images import ImageSource, open_source, used_records
from .labels import node_labels
from .models import ModelBundle, load_run_model
from .store import RunStore, run_is_writable, run_lock
from .visual import draw_graph


def _require_labels(source: ImageSource, max_images: int | None, handle: ModelHandle, images: str) -> None:
    """``target: label`` needs a model class for every image: refuse before any compute rather
    than fall back to the prediction for some images, or index past the model's classes."""
    records = used_records(source, max_images)
    missing = [r for r in records if r.label is None]
    if missing:
        examples = ", ".join(f"{r.path} ({r.label_name or 'no class'})" for r in missing[:3])
        raise InputError(
            f"target: label, but {len(missing)} of {len(records)} images have no model class "
            f"(e.g. {examples}); name class folders by synset id (n01440764) or class name, give "
            "a CSV 'label' column, or use target: predicted"
        )
    n_classes = len(handle.bundle.class_names)
    if not n_classes:
        with torch.no_grad():
            n_classes = int(handle.model(handle.dummy_input(1)).shape[1])
    bad = [r for r in records if not 0 <= r.label < n_classes]
    if bad:
        shown = ", ".join(f"{Path(r.path).name}: {r.label}" for r in bad[:3])
        raise InputError(
            f"{len(bad)} label(s) in {images} are not classes of the model (0 to {n_classes - 1}), "
            f"e.g. {shown}: correct them, or use target: predicted"
        )


def _resolved_basis(spec: str) -> str:
    """A basis file's absolute path (the run's later commands read it from any directory); a kind as it is."""
    from .config import is_basis_file

    return str(Path(spec).resolve()) if is_basis_file(spec) else spec


def _check_bases(config: Config, handle: ModelHandle) -> None:
    """Before any image is read: every basis file fits its layer (channels), and no ``nmf`` layer
    is signed on the dummy image (one negative value proves it signed; the concepts stage checks
    the sampled PFVs themselves)."""
    from .basis import read_basis_file, require_non_negative
    from .config import is_basis_file

    overcomplete = sorted({"sae-overcomplete", "sae-batchtopk"} & set(config.bases.values()))
    if overcomplete:
        from .concepts import overcomplete_problem

        if overcomplete_problem():
            raise InputError(f"bases: {overcomplete[0]}: {overcomplete_problem()}")
    files = {layer: spec for layer, spec in config.bases.items() if is_basis_file(spec)}
    if files:
        shapes = handle.layer_shapes(list(files))
        for layer, spec in files.items():
            read_basis_file(spec, shapes[layer][0])
    nmf = [layer for layer, spec in config.bases.items() if spec == "nmf"]
    if nmf:
        with torch.no_grad():
            _, grids = handle.capture(handle.dummy_input(1), nmf)
        for layer in nmf:
            require_non_negative(grids[layer], f"bases: {layer}: nmf")


#: Damaged artefacts one `gig run` recomputes before it gives up (each repair is one stage again).
MAX_REPAIRS = 8


class Pipeline:
    """A run directory with its model and images.

    ``model`` may be given to use a user ``nn.Module`` (through :func:`gig.models.wrap_module`);
    otherwise ``config.model`` is loaded. ``source`` likewise overrides ``config.images``.
    """

    def __init__(
        self,
        config: Config,
        out: str | Path,
        model: ModelBundle | None = None,
        source: ImageSource | None = None,
        progress: bool = True,
    ):
        self.ranks, device_name = from_environment(config.device)  # torchrun: rank, world, device
        device = resolve_device(device_name)  # before the model loads
        self.bundle = model or load_run_model(config)
        self.handle = ModelHandle(self.bundle, device)
        # Layers checked on a dummy image before any real one is read; the run saves them
        # resolved (the model's defaults where none were named) and in forward order. The
        # caller's config is left as it was.
        layers = config.layers if config.layers is not None else self.handle.default_layers()
        # A model handed in from Python is recorded under its own name, so graphs, reports and
        # a reopened run never claim it is the config's default model.
        self.config = dataclasses.replace(
            config,
            layers=self.handle.execution_order(list(layers)),
            model=self.bundle.name,
            # the run's later commands read the head from any directory
            head=str(Path(config.head).resolve()) if config.head else None,
            bases={layer: _resolved_basis(spec) for layer, spec in config.bases.items()},
        )
        _check_bases(self.config, self.handle)
        class_index = self.bundle.class_index if self.bundle.class_names else None
        self.source = source or open_source(self.config.images, class_index=class_index)
        if self.config.target == "label":
            _require_labels(self.source, self.config.max_images, self.handle, self.config.images)
        if self.ranks.is_main and (Path(out) / "config.yaml").is_file() and not run_is_writable(Path(out)):
            # A finished run on a read-only mount (or another user's) is read as it is: nothing is
            # written into it, and its inputs are checked instead of recorded.
            self.store = RunStore(out, self.config)
            self._check_inputs()
        elif self.ranks.is_main:
            with run_lock(Path(out)):  # never rewrite the config of a run another process computes
                self.store = RunStore.create(out, self.config)
                self._record_inputs()
        self.ranks.barrier()  # the other ranks of a torchrun launch read what rank 0 wrote
        if not self.ranks.is_main:
            self.store = RunStore(out, self.config)
        self.progress = progress

    def _check_inputs(self) -> None:
        if inputs_differ(self.store, self.source, self.bundle):
            raise RunMismatchError(
                f"{self.store.root}: its images or model weights changed since its stages ran, "
                "and the run directory cannot be written to recompute them; restore the inputs, "
                "or run into a writable directory"
            )

    def _record_inputs(self) -> None:
        recorded = self.store.manifest().get("inputs")
        if recorded is None:
            changed, content = True, inputs_key(self.source, self.bundle, self.config.max_images)
        else:
            changed, content = inputs_changed(recorded, self.source, self.bundle, self.config.max_images)
        if self.store.record_inputs(content if changed else recorded["key"], content, self.bundle.fingerprint()):
            warnings.warn(
                f"{self.store.root}: its images or model weights changed since its stages "
                "ran (same paths, other contents); every stage will be recomputed",
                stacklevel=3,
            )

    def _lock(self):
        """The run's lock, held by rank 0 for the whole launch's ranks."""
        return run_lock(self.store.root) if self.ranks.is_main else contextlib.nullcontext()

    @classmethod
    def open(cls, run_dir: str | Path, **kwargs) -> "Pipeline":
        """Reopen an existing run directory with its saved configuration."""
        return cls(RunStore.open(run_dir).config, run_dir, **kwargs)

    # ------------------------------------------------------------------ stages
    def collect(self, force: bool = False) -> None:
        with self._lock():
            if force or not self.store.is_done("collect"):
                collect(self.store, self.handle, self.source, self.progress, self.ranks)

    def concepts(self, force: bool = False) -> None:
        with self._lock():
            if (force or not self.store.is_done("concepts")) and self.ranks.is_main:
                extract_concepts(self.store, self.progress)
        self.ranks.barrier()

    def decompose(self, force: bool = False) -> None:
        with self._lock():
            if force or not self.store.is_done("decompose"):
                decompose(self.store, self.handle, self.source, self.progress, self.ranks)

    def attribute(self, force: bool = False) -> None:
        with self._lock():
            if force or not self.store.is_done("attribute"):
                attribute(self.store, self.handle, self.source, self.progress, self.ranks)

    def graph(self, force: bool = False) -> None:
        with self._lock():
            if (force or not self.store.is_done("graph")) and self.ranks.is_main:
                build_graphs(self.store, self.bundle.class_names, self.progress, figure_fn=self.draw_graph)
        self.ranks.barrier()

    def run(self, stages: list[str] | None = None, verify: bool = False) -> Path:
        """Run ``stages`` (all by default) in order; finished ones are skipped.

        A damaged artefact (content that no longer matches its checksum) that a stage reads is
        recomputed by the stage that wrote it (:meth:`RunStore.repair`: a shard alone where it is
        one), and the run goes on; ``verify`` first checks every artefact of the finished
        stages, so damage is found even where no stage would read it."""
        todo = set(stages or STAGE_ORDER)
        unknown = sorted(todo - set(STAGE_ORDER))
        if unknown:
            raise ConfigError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGE_ORDER)}")
        if verify and self.ranks.world == 1:
            todo |= {self._repair(path) for path in self.store.verify()}
        repairs = 0
        while True:
            try:
                for stage in (s for s in STAGE_ORDER if s in todo):
                    getattr(self, stage)()
                return self.store.root
            except DamagedArtefactError as exc:
                repairs += 1
                if self.ranks.world > 1 or repairs > MAX_REPAIRS:
                    raise
                # the stage that wrote it runs again even where it was not asked for: a stage
                # after it would otherwise read the run without the deleted shard
                todo.add(self._repair(exc.path))

    def _repair(self, path: str) -> str:
        stage = self.store.repair(path)
        warnings.warn(f"damaged artefact {path}: the {stage} stage computes it again", stacklevel=3)
        return stage

    # ------------------------------------------------------------------ pictures
    def thumbnails(self, graph: dict) -> dict[str, Path]:
        """ERF crops of the top-1 exemplar of every concept node of ``graph``."""
        by_layer: dict[str, list[tuple[str, int]]] = {}
        for node in graph["nodes"]:
            if node["layer"] in self.config.layers and node.get("exemplars"):
                by_layer.setdefault(node["layer"], []).append((node["id"], node["exemplars"][0]))
        wanted = {layer: [i for _, i in items] for layer, items in by_layer.items()}
        paths = layer_crops(self.store, self.handle, self.source, wanted)  # one forward per image
        return {node_id: path for layer, items in by_layer.items() for (node_id, _), path in zip(items, paths[layer])}

    def draw_graph(self, store: RunStore, graph: dict, out_stem: Path) -> tuple[Path, Path]:
        return draw_graph(graph, out_stem, self.thumbnails(graph), labels=node_labels(store, graph))
