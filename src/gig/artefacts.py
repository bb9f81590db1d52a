"""Where every artefact of a run lies, and the readers of a finished run: the one artefact layer.

Every path of a run directory (:class:`gig.store.RunStore`, ``RUN/``) is spelt here once: the
stage modules write to these paths, and the readers below read them. Reading a run (``gig
inspect``, ``gig label``, the report's pages, a notebook) therefore imports neither scikit-learn,
nor the sparse coders, nor the stage modules: this module imports :mod:`gig.store` (torch,
safetensors) and PyYAML, nothing heavier (:mod:`gig.basis` only where a layer's
basis is read). The stage modules re-export their former readers under the same names.
:mod:`gig.store` keeps the run's ``config.yaml``, ``manifest.json``, ``.lock`` and the generic
stage folder and shard helpers (``stage_dir``, ``shard_path``, ``shard_info``).

=================================  ====================================  ===============================  ===============
artefact                           path (``RUN/…``)                      reader                           writer
=================================  ====================================  ===============================  ===============
images used and skipped            ``collect/images.json``               :func:`load_images`              collect
sampled PFVs of a layer            ``collect/LAYER.safetensors``         :func:`load_samples`             collect
ERF crops of sampled PFVs          ``erf/COLLECT_HASH/LAYER/sI.png``     :func:`crop_paths`               erf
concept vectors ``V``              ``concepts/LAYER.safetensors``        :func:`load_dictionary`          concepts
concept cards                      ``concepts/LAYER.json``               :func:`load_concept_cards`       concepts
a basis with its own encoder       ``concepts/LAYER.basis.safetensors``  :func:`load_basis`               concepts
sparsity–fidelity fronts           ``decompose/front.json``              :func:`load_front`               decompose
fidelity over all images           ``decompose/fidelity.json``           :func:`load_fidelity`            decompose
the check of the codes             ``decompose/check.json``              (the stage, on resuming)         decompose
sparse codes                       ``decompose/shards/*.safetensors``    :class:`CodeReader`              decompose
per-image GIG walks                ``attribute/shards/*.safetensors``    :func:`iter_attributions`        attribute
every attribution's record         ``attribute/paths.safetensors``       :func:`load_path_records`        attribute
the graphs' index                  ``graph/index.json``                  :func:`graph_index`              graph
class, shared and global graphs    ``graph/class_C.json`` …              :func:`load_graph`               graph
single-image graphs                ``graph/image_I.json``                :func:`load_graph`               gig graph-image
run-wide sums                      ``graph/run_sums.safetensors``        :func:`load_run_sums`            graph
ablations                          ``graph/ablation/LAYER_C.json``       :func:`load_ablations`           gig ablate
GIG against ablation               ``graph/ablation/correlation.json``   :func:`load_correlation`         gig ablate
concept stability                  ``stability/stability.json``          :func:`load_stability`           gig stability
evaluation summary                 ``evaluate/summary.json``             :func:`load_evaluation_summary`  gig evaluate
evaluation reconstruction figures  ``evaluate/extraction.json``          :func:`load_reconstruction`      gig evaluate
concept labels                     ``labels.yaml``                       :func:`load_labels`              gig label
the report                         ``report/index.html``                 (a browser)                      gig report
explanations of new images         ``explain/``                          (a browser)                      gig explain
=================================  ====================================  ===============================  ===============

ERF crops and ablation results go to the user's cache where the run cannot be written
(:func:`gig.store.derived_dir`); their readers look in both places.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from .errors import InputError, RunMismatchError
from .store import RunStore, as_store, derived_dir, layer_key, load_json, load_tensors, open_tensors

if TYPE_CHECKING:
    from .basis import BasisEncoder


def _root(run: str | Path | RunStore) -> Path:
    """The directory of a run given as a store or a path (nothing is read)."""
    return run.root if isinstance(run, RunStore) else Path(run)


# ====================================================================================== collect
def collect_dir(store: RunStore) -> Path:
    return store.root / "collect"


def images_path(store: RunStore) -> Path:
    """``RUN/collect/images.json``: the images used and skipped."""
    return collect_dir(store) / "images.json"


def samples_path(store: RunStore, layer: str) -> Path:
    """``RUN/collect/LAYER.safetensors``: the sampled PFVs of ``layer``."""
    return collect_dir(store) / f"{layer}.safetensors"


def load_samples(store: RunStore, layer: str) -> dict[str, torch.Tensor]:
    """The sampled PFVs of ``layer``: ``pfv (N, C)``, ``image_id``, ``pos (N, 2)``, ``target``, ``score``."""
    return load_tensors(samples_path(store, layer))


def load_images(store: RunStore) -> dict:
    """``{"images": [...], "skipped": [...]}`` as recorded by the collect stage."""
    return load_json(images_path(store))


def run_targets(store: RunStore) -> dict[int, int]:
    """``{image id: target class}`` of the run's images (collect stage)."""
    return {int(i["image_id"]): int(i["target"]) for i in load_images(store)["images"]}


# ========================================================================================== erf
def erf_dir(store, layer: str) -> Path:
    """Where new ERF crops of ``layer`` are written: ``RUN/erf/COLLECT_HASH/LAYER``. Keyed by the
    collect stage's hash (its settings and input fingerprint), so a recomputed collect, whose
    sample indices name other PFVs, never shows the crops of the old ones. A run directory that
    cannot be written (a read-only mount, another user's run) stays untouched: the crops then go
    to the user's cache (:func:`gig.store.derived_dir`)."""
    return derived_dir(store, "erf", store.expected_hash("collect"), layer)


def crop_paths(store, layer: str, sample_indices: list[int]) -> list[Path]:
    """The cached ERF crops of sampled PFVs ``sample_indices`` of ``layer``: the run's own where
    it has them (also in a read-only run), else where :func:`erf_dir` writes them. The folders
    are worked out once (each asks the manifest for the collect hash), not per crop."""
    collect = store.expected_hash("collect")
    in_run, out = store.root / "erf" / collect / layer, erf_dir(store, layer)
    return [in_run / f"s{i}.png" if (in_run / f"s{i}.png").is_file() else out / f"s{i}.png" for i in sample_indices]


# ===================================================================================== concepts
def concepts_dir(store: RunStore) -> Path:
    return store.root / "concepts"


def dictionary_path(store: RunStore, layer: str) -> Path:
    """``RUN/concepts/LAYER.safetensors``: ``V (K, C)``, the members' labels and the exemplars."""
    return concepts_dir(store) / f"{layer}.safetensors"


def concept_cards_path(store: RunStore, layer: str) -> Path:
    """``RUN/concepts/LAYER.json``: the layer's source, sizes and concept cards."""
    return concepts_dir(store) / f"{layer}.json"


def basis_path(store: RunStore, layer: str) -> Path:
    return concepts_dir(store) / f"{layer}.basis.safetensors"


def load_dictionary(store: RunStore, layer: str) -> torch.Tensor:
    """The concept vectors ``V (K, C)`` of ``layer``."""
    return load_tensors(dictionary_path(store, layer))["V"]


def load_concept_cards(store: RunStore, layer: str) -> dict:
    return load_json(concept_cards_path(store, layer))


def load_basis(store: RunStore, layer: str) -> "BasisEncoder | None":
    """The basis encoder the concepts stage saved for ``layer``, or None for a k-means layer."""
    path = basis_path(store, layer)
    if not path.is_file():
        return None
    from .basis import read_basis  # torch alone; only for layers with a basis of their own

    return read_basis(path)


def decoder_bias(store: RunStore, layer: str) -> torch.Tensor | None:
    """The decoder bias ``b_dec (C,)`` of ``layer``'s basis (GIG's path start), None where 0."""
    basis = load_basis(store, layer)
    return None if basis is None else basis.bias


# ==================================================================================== decompose
def decompose_dir(store: RunStore) -> Path:
    return store.root / "decompose"


def front_path(store: RunStore) -> Path:
    """``RUN/decompose/front.json``: every layer's sparsity–fidelity front."""
    return decompose_dir(store) / "front.json"


def fidelity_path(store: RunStore) -> Path:
    """``RUN/decompose/fidelity.json``: every layer's figures over all images."""
    return decompose_dir(store) / "fidelity.json"


def check_path(store: RunStore) -> Path:
    """``RUN/decompose/check.json``: the check of the codes over all images, per layer."""
    return decompose_dir(store) / "check.json"


def code_shards_dir(store: RunStore) -> Path:
    return decompose_dir(store) / "shards"


def load_front(store: RunStore) -> dict[str, dict]:
    """``{layer: {"points": [...], "alpha", "met", "rule"}}`` of a run's decompose stage
    (see :func:`gig.decompose.sparsity_front`); empty for runs made before fronts were measured."""
    path = front_path(store)
    return load_json(path) if path.is_file() else {}


def load_fidelity(store: RunStore) -> dict:
    return load_json(fidelity_path(store))


def run_alpha(store: RunStore, layer: str) -> float:
    """The λ the run's decompose stage coded ``layer`` with (``decompose/fidelity.json``)."""
    fidelity = load_fidelity(store)
    if layer not in fidelity or "alpha" not in fidelity[layer]:
        raise RunMismatchError(f"no λ recorded for layer {layer!r} in {fidelity_path(store)}")
    return float(fidelity[layer]["alpha"])


def from_sparse_rows(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """CSR pieces → dense ``(P, K)``."""
    n = indptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n), (indptr[1:] - indptr[:-1]).long())
    dense = torch.zeros(n, k, dtype=values.dtype)
    dense[rows, indices.long()] = values
    return dense


class CodeReader:
    """Reads the sparse codes of one layer back, per image: ``codes(image_id) → U (H·W, K)``.

    Lazy: opening reads each shard's image ids and row pointers only; ``codes`` then reads just
    that image's rows (safetensors slices), so a reader over a large run holds no codes in memory.
    """

    def __init__(self, store: RunStore, layer: str):
        self.layer = layer
        self.K = int(load_dictionary(store, layer).shape[0])
        self._index: dict[int, tuple[str, torch.Tensor, int, int]] = {}
        shard_dir = code_shards_dir(store)
        paths = sorted(shard_dir.glob("*.safetensors"))
        if not paths:
            raise RunMismatchError(f"no decomposition shards in {shard_dir}: run `gig decompose` first")
        for path in paths:
            with open_tensors(path) as f:
                if f"{layer}/indptr" not in f.keys():
                    raise RunMismatchError(f"{path} holds no codes of layer {layer!r}: run `gig decompose` again")
                ids = f.get_tensor("image_id").tolist()
                indptr = f.get_tensor(f"{layer}/indptr")
            positions = (indptr.numel() - 1) // max(len(ids), 1)
            for j, image_id in enumerate(ids):
                self._index[int(image_id)] = (str(path), indptr, j * positions, positions)

    def codes(self, image_id: int) -> torch.Tensor:
        """Dense coefficients ``(H·W, K)`` of one image (row-major positions)."""
        if image_id not in self._index:
            raise RunMismatchError(f"no codes of layer {self.layer!r} for image {image_id}")
        path, indptr, start, n = self._index[image_id]
        ptr = indptr[start : start + n + 1]
        lo, hi = int(ptr[0]), int(ptr[-1])
        with open_tensors(path) as f:
            indices = f.get_slice(f"{self.layer}/indices")[lo:hi]
            values = f.get_slice(f"{self.layer}/values")[lo:hi]
        return from_sparse_rows(ptr - lo, indices, values, self.K)

    def image_ids(self) -> list[int]:
        return sorted(self._index)


# ==================================================================================== attribute
#: Every attribution's record (:data:`SUMMARY_FIELDS`, one row per image), saved by the stage's
#: summary: what the completeness and accuracy readers read (:func:`load_path_records`).
PATHS_FILE = "paths.safetensors"

#: The per-image records of an attribution's path (no maps, no GIG vectors): what the summaries read.
SUMMARY_FIELDS = (
    "class_residual",
    "class_delta",
    "residual",
    "delta",
    "class_steps",
    "class_error",
    "class_converged",
    "steps",
    "error",
    "converged",
)


def attribute_dir(store: RunStore) -> Path:
    return store.root / "attribute"


def attribution_shards_dir(store: RunStore) -> Path:
    return attribute_dir(store) / "shards"


def attribution_shards(store: RunStore) -> list[Path]:
    """The attribute stage's shards written so far, in order."""
    return sorted(attribution_shards_dir(store).glob("*.safetensors"))


def paths_path(store: RunStore) -> Path:
    """``RUN/attribute/paths.safetensors`` (:data:`PATHS_FILE`)."""
    return attribute_dir(store) / PATHS_FILE


def load_path_records(store) -> dict[str, torch.Tensor]:
    """Every attribution's record (:data:`SUMMARY_FIELDS`) over the run's images: the stage's
    :data:`PATHS_FILE`, or, for a run made before it existed, one pass over the shards."""
    path = paths_path(store)
    return load_tensors(path) if path.is_file() else load_attributions(store, SUMMARY_FIELDS)


def iter_attributions(
    store,
    fields: Collection[str] | None = None,
    image_ids: Collection[int] | None = None,
    extra: tuple[Collection[str], Collection[int]] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """The attribute shards one at a time, in order: keys as in :func:`gig.attribution.walk`,
    first axis = that shard's images. ``fields`` keeps only the keys ``LAYER/FIELD`` with those
    FIELDs (and ``image_id``); ``image_ids`` only those images' rows. Only what is kept is read
    from disk, so memory holds one shard's selection, never the run's. ``extra = (fields,
    image_ids)`` reads other fields of a few images in the same opening of each shard: a part
    holding some of them gets ``part["extra"]``, a dict of their ``image_id`` and those fields' rows."""
    paths = attribution_shards(store)
    if not paths:
        raise RunMismatchError(f"no attribution shards in {attribute_dir(store)}: run `gig attribute` first")
    wanted = _id_tensor(image_ids)
    extra_ids = None if extra is None else _id_tensor(extra[1])
    for path in paths:
        with open_tensors(path) as shard:
            ids = shard.get_tensor("image_id")
            rows = None if wanted is None else torch.isin(ids, wanted).nonzero().flatten()
            extra_rows = None if extra_ids is None else torch.isin(ids, extra_ids).nonzero().flatten()
            if rows is not None and rows.numel() == 0 and (extra_rows is None or extra_rows.numel() == 0):
                continue
            part = _shard_rows(shard, ids, rows, fields)
            if extra_rows is not None and extra_rows.numel():
                part["extra"] = _shard_rows(shard, ids, extra_rows, extra[0])
            yield part


def _id_tensor(image_ids: Collection[int] | None) -> torch.Tensor | None:
    return None if image_ids is None else torch.tensor(sorted({int(i) for i in image_ids}), dtype=torch.long)


def _shard_rows(shard, ids: torch.Tensor, rows: torch.Tensor | None, fields: Collection[str] | None) -> dict:
    """The keys of ``fields`` (all: None) of one open shard at ``rows`` (all: None), with
    ``image_id``; only the rows' span is read from disk."""
    keys = [k for k in shard.keys() if k != "image_id" and (fields is None or k.rsplit("/", 1)[-1] in fields)]
    if rows is None:
        return {"image_id": ids, **{key: shard.get_tensor(key) for key in keys}}
    first, last = (int(rows[0]), int(rows[-1]) + 1) if rows.numel() else (0, 0)
    return {"image_id": ids[rows], **{key: shard.get_slice(key)[first:last][rows - first] for key in keys}}


def load_attributions(
    store, fields: Collection[str] | None = None, image_ids: Collection[int] | None = None
) -> dict[str, torch.Tensor]:
    """The attribute shards concatenated (see :func:`iter_attributions` for ``fields`` and
    ``image_ids``): keys as in :func:`gig.attribution.walk`, first axis = images."""
    parts = list(iter_attributions(store, fields, image_ids))
    if not parts:
        raise RunMismatchError(f"none of the images {sorted(image_ids or [])[:10]} has attributions in {store.root}")
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def completeness_residuals(store, by_layer: bool = False, data: dict[str, torch.Tensor] | None = None):
    """Relative completeness residuals ``|Σ GIG − Δg| / |Δg|`` of every recorded attribution.

    One tensor, or with ``by_layer`` a dict keyed ``"LAYER->class"`` / ``"LOWER->UPPER"``.
    """
    data = load_path_records(store) if data is None else data
    layers = store.config.layers
    top = layers[-1]
    parts = {f"{top}->class": data[f"{top}/class_residual"].abs() / data[f"{top}/class_delta"].abs().clamp_min(1e-8)}
    for lower, upper in zip(layers[:-1], layers[1:]):
        parts[f"{lower}->{upper}"] = (
            data[f"{lower}/residual"].abs() / data[f"{lower}/delta"].abs().clamp_min(1e-8)
        ).flatten()
    return parts if by_layer else torch.cat(list(parts.values()))


def path_keys(layers: list[str]) -> dict[str, tuple[str, str, str]]:
    """``{"LAYER->class" | "LOWER->UPPER": (steps, error, converged keys)}`` of the stored attributions."""
    top = layers[-1]
    keys = {f"{top}->class": (f"{top}/class_steps", f"{top}/class_error", f"{top}/class_converged")}
    for lower, upper in zip(layers[:-1], layers[1:]):
        keys[f"{lower}->{upper}"] = (f"{lower}/steps", f"{lower}/error", f"{lower}/converged")
    return keys


def load_error_estimates(store, data: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Every stored attribution's relative error estimate, flat (NaN-free; empty for runs made
    before error control or on a fixed grid without an estimate)."""
    data = load_path_records(store) if data is None else data
    parts = [data[keys[1]].flatten() for keys in path_keys(store.config.layers).values() if keys[1] in data]
    flat = torch.cat(parts) if parts else torch.zeros(0)
    return flat[~flat.isnan()]


# ======================================================================================== graph
#: The graph stage's file of run-wide sums (:func:`gig.graph.save_run_sums`, :func:`load_run_sums`):
#: what the concept cards of the report, the explain pages and the notebook's pages read, so that
#: they open none of the attribute shards.
RUN_SUMS = "run_sums.safetensors"
#: The file names of the graph stage's shared and global graphs (class graphs: :func:`class_graph_path`).
SHARED_GRAPH = "shared.json"
GLOBAL_GRAPH = "global.json"
#: The schema of an ablation result (:class:`gig.ablate.AblationResult`), how :func:`load_ablations` knows one.
ABLATION_SCHEMA = "gig.ablation/1"


def graph_dir(store: RunStore) -> Path:
    return store.root / "graph"


def graph_index_path(store: RunStore) -> Path:
    """``RUN/graph/index.json``: the graph stage's classes and file names."""
    return graph_dir(store) / "index.json"


def graph_path(store: RunStore, file: str) -> Path:
    """A graph file of the graph stage by its name in the index (``class_C.json``, ``shared.json``, …)."""
    return graph_dir(store) / file


def class_graph_path(store: RunStore, c: int) -> Path:
    """``RUN/graph/class_C.json``; its figures are :func:`class_figure_stem` ``.svg`` / ``.png``."""
    return graph_path(store, f"class_{c}.json")


def class_figure_stem(store: RunStore, c: int) -> Path:
    """``RUN/graph/class_C``: the class graph's figures without their suffix (``.svg``, ``.png``)."""
    return graph_dir(store) / f"class_{c}"


def image_graph_path(store: RunStore, image_id: int) -> Path:
    """``RUN/graph/image_I.json`` (``gig graph-image``)."""
    return graph_path(store, f"image_{image_id}.json")


def saved_graph_files(store: RunStore) -> dict[str, Path]:
    """``{name: path}`` of the global and class graph files present (``global``, ``class_C``)."""
    folder = graph_dir(store)
    return {p.stem: p for p in [folder / GLOBAL_GRAPH, *sorted(folder.glob("class_*.json"))] if p.is_file()}


def run_sums_path(store: RunStore) -> Path:
    return graph_dir(store) / RUN_SUMS


def graph_index(store: RunStore) -> dict:
    return load_json(graph_index_path(store))


def load_graph(store: RunStore, file: str) -> dict:
    """One graph file of the graph stage (:func:`graph_path`)."""
    return load_json(graph_path(store, file))


class RunSums:
    """Run-wide sums over every attributed image (:func:`gig.graph.run_sums`): each concept's mean
    importance, the images per target class, and each concept's strongest run-wide neighbours.

    ``n``: images; ``score_sums``: ``{layer: (K,)}`` importance sums; ``class_counts``:
    ``(classes,)`` images per target class; ``classes``: ``(index, weight)``, each ``(K_top,
    m)``: per top-layer concept, the ``m`` classes with the largest mean share of it over their
    images (class ids, shares), largest first; ``parents[lower]``: ``(index, weight)``, each
    ``(K_upper, m)``: per upper concept of the transition out of ``lower``, its ``m`` strongest
    lower concepts by mean ``flow`` edge weight over all images; ``children[lower]``: each
    ``(K_lower, m)``: per lower concept, its strongest upper concepts. Means are the sums over
    ``n`` (0 where an image did not reach an edge), as :class:`gig.graph.ScoreSums` and
    :class:`gig.graph.EdgeSums` give them over all images."""

    def __init__(
        self,
        layers: list[str],
        n: int,
        score_sums: dict[str, torch.Tensor],
        class_counts: torch.Tensor,
        classes: tuple[torch.Tensor, torch.Tensor],
        parents: dict[str, tuple[torch.Tensor, torch.Tensor]],
        children: dict[str, tuple[torch.Tensor, torch.Tensor]],
        image_ids: torch.Tensor,
    ):
        self.layers, self.n, self.score_sums, self.class_counts = layers, n, score_sums, class_counts
        self.classes, self.parents, self.children = classes, parents, children
        self.image_ids = image_ids  # (n,) sorted: the attributed images

    def importance(self) -> dict[str, torch.Tensor]:
        """Mean node importances ``{layer: (K,)}`` over every image (:meth:`gig.graph.ScoreSums.scores`)."""
        return {layer: v / max(self.n, 1) for layer, v in self.score_sums.items()}

    def class_ids(self) -> list[int]:
        """The target classes of at least one image."""
        return self.class_counts.nonzero().flatten().tolist()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file's tensors (:data:`RUN_SUMS`)."""
        out = {"n": torch.tensor([self.n]), "class_counts": self.class_counts, "image_ids": self.image_ids}
        out.update({f"score_sums/{layer}": v for layer, v in self.score_sums.items()})
        out.update({"classes/index": self.classes[0], "classes/weight": self.classes[1]})
        for name in ("parents", "children"):
            for lower, (index, weight) in getattr(self, name).items():
                out.update({f"{name}/{lower}/index": index, f"{name}/{lower}/weight": weight})
        return out

    @classmethod
    def from_tensors(cls, layers: list[str], tensors: dict[str, torch.Tensor]) -> "RunSums":
        """The sums of :meth:`tensors`; a ``KeyError`` where one of ``layers`` is missing."""

        def pair(key: str) -> tuple[torch.Tensor, torch.Tensor]:
            return tensors[f"{key}/index"], tensors[f"{key}/weight"]

        return cls(
            layers,
            int(tensors["n"][0]),
            {layer: tensors[f"score_sums/{layer}"] for layer in layers},
            tensors["class_counts"],
            pair("classes"),
            {lower: pair(f"parents/{lower}") for lower in layers[:-1]},
            {lower: pair(f"children/{lower}") for lower in layers[:-1]},
            tensors["image_ids"],
        )


def attribute_key(store: RunStore) -> str:
    """The attribute stage that the run sums were computed from: its settings hash, chained with
    every upstream stage's (a rerun with other settings or inputs changes it; the same settings on
    the same inputs give the same shards, so the file stays deterministic)."""
    return str(store.manifest()["stages"].get("attribute", {}).get("hash"))


def load_run_sums(store: RunStore) -> RunSums | None:
    """The run sums the graph stage saved (:func:`gig.graph.save_run_sums`), or None where the run
    has none (its graph stage has not run, or ran before the file existed), or they are not of the
    current attribute shards (the attribute stage ran again since) or layers: then read the shards."""
    path = run_sums_path(store)
    if not path.is_file():
        return None
    tensors = load_tensors(path)
    if bytes(tensors.get("attribute", torch.zeros(0, dtype=torch.uint8)).tolist()).decode() != attribute_key(store):
        return None
    try:
        return RunSums.from_tensors(list(store.config.layers), tensors)
    except KeyError:
        return None


# ------------------------------------------------------------------------------------ ablation
def ablation_dir(store: RunStore) -> Path:
    """``RUN/graph/ablation``, where ``gig ablate`` writes (the user's cache for a run it cannot write)."""
    return derived_dir(store, "graph", "ablation")


def ablation_path(store: RunStore, layer: str, concepts: Sequence[int], photos: Sequence[str] | None = None) -> Path:
    """``RUN/graph/ablation/LAYER_c1-c2.json``; for photos outside the run a hash of their paths is
    added (``…_photos-HASH.json``) so that it never overwrites the run images' result."""
    import hashlib

    name = f"{layer_key(layer)}_{'-'.join(str(c) for c in concepts)}"
    if photos is not None:
        name += "_photos-" + hashlib.blake2b("\n".join(map(str, photos)).encode(), digest_size=4).hexdigest()
    return ablation_dir(store) / f"{name}.json"


def correlation_path(store: RunStore) -> Path:
    return ablation_dir(store) / "correlation.json"


#: The raw pairs of the GIG-vs-ablation correlation, beside :func:`correlation_path`.
CORRELATION_PAIRS = "correlation_pairs.safetensors"


def correlation_pairs_path(store: RunStore) -> Path:
    return correlation_path(store).with_name(CORRELATION_PAIRS)


def load_walk(store: RunStore) -> dict[str, torch.Tensor]:
    """The per-image GIG walk of every attribute shard written so far (the stage may be
    unfinished: a shard is only ever written whole), without the maps, which ablation never reads."""
    return load_attributions(
        store, ("gig", "targets", "importance", "delta", "class_gig", "class_delta", "score", "top")
    )


def load_correlation(run: str | Path | RunStore) -> dict | None:
    """The run's saved GIG-vs-ablation correlation (:func:`gig.ablate.ablation_correlation`), or None."""
    path = correlation_path(as_store(run))
    return load_json(path) if path.is_file() else None


def load_ablations(run: str | Path | RunStore) -> list[dict]:
    """Every saved ablation result of the run (``gig.ablation/1``, :meth:`gig.ablate.AblationResult.save`), by file name."""
    store = as_store(run)
    folders = dict.fromkeys([graph_dir(store) / "ablation", ablation_dir(store)])
    found = [
        load_json(p)
        for folder in folders
        if folder.is_dir()
        for p in sorted(folder.glob("*.json"))
        if p.name != "correlation.json"
    ]
    return [r for r in found if r.get("schema") == ABLATION_SCHEMA]


# ==================================================================== derived: stability, evaluate
def stability_dir(run: str | Path | RunStore) -> Path:
    return _root(run) / "stability"


def stability_path(run: str | Path | RunStore) -> Path:
    """``RUN/stability/stability.json`` (:func:`gig.stability.concept_stability`)."""
    return stability_dir(run) / "stability.json"


def stability_run_dir(store: RunStore, key: str) -> Path:
    """``RUN/stability/graphs/KEY``: a run derived with refitted dictionaries (:func:`gig.stability.derived_run`)."""
    return stability_dir(store) / "graphs" / key


def load_stability(store: RunStore) -> dict | None:
    """``RUN/stability/stability.json`` (:func:`gig.stability.concept_stability`), or None where not measured."""
    path = stability_path(store)
    return load_json(path) if path.is_file() else None


#: The evaluation's summary and its extraction results, in its folder (``RUN/evaluate`` by default).
EVALUATION_SUMMARY = "summary.json"
EXTRACTION_RESULTS = "extraction.json"


def evaluate_dir(run: str | Path | RunStore) -> Path:
    """``RUN/evaluate``: where ``gig evaluate`` writes by default."""
    return _root(run) / "evaluate"


def load_evaluation_summary(folder: str | Path) -> dict | None:
    """An evaluation's ``summary.json`` (AUC differences), or None where there is none."""
    path = Path(folder) / EVALUATION_SUMMARY
    return load_json(path) if path.is_file() else None


def load_reconstruction(folder) -> dict[str, dict[str, dict]]:
    """``{layer: {method: {rel_error, r2, l0_ratio, top1_agreement, ...}}}`` from an evaluation's
    ``extraction.json`` (each method's codes on the evaluated images); empty when there is none."""
    path = Path(folder) / EXTRACTION_RESULTS
    if not path.is_file():
        return {}
    layers = load_json(path).get("layers", {})
    return {
        layer: {m: e["reconstruction"] for m, e in methods.items() if isinstance(e, dict) and "reconstruction" in e}
        for layer, methods in layers.items()
    }


# ============================================================================ labels, report, explain
LABELS_FILE = "labels.yaml"


def labels_path(run: str | Path | RunStore) -> Path:
    return as_store(run).root / LABELS_FILE


def load_labels(run: str | Path | RunStore) -> dict[str, dict[int, dict]]:
    """``{layer: {concept id: {"name": ..., "note": ..., other keys}}}``; ``{}`` without a file.
    A bare string entry (``12: dog snouts``) is read as its name."""
    path = labels_path(run)
    if not path.is_file():
        return {}
    return parse_labels(path.read_text(encoding="utf-8"), path)


def parse_labels(text: str, path: Path) -> dict[str, dict[int, dict]]:
    """The labels of a ``labels.yaml`` text (:func:`load_labels`); ``path`` names it in errors."""
    import yaml

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} must map layer -> concept id -> {{name, note}}")
    out: dict[str, dict[int, dict]] = {}
    for layer, entries in data.items():
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise InputError(f"{path}: layer {layer!r} must map concept ids to labels")
        for concept, entry in entries.items():
            try:
                q = int(concept)
            except (TypeError, ValueError):
                raise InputError(f"{path}: concept id {concept!r} of layer {layer!r} is not an integer") from None
            entry = {"name": entry} if isinstance(entry, str) else entry
            if not isinstance(entry, dict):
                raise InputError(f"{path}: the label of {layer} concept {q} must be a name or {{name, note}}")
            out.setdefault(str(layer), {})[q] = dict(entry)
    return out


def report_dir(run: str | Path | RunStore) -> Path:
    """``RUN/report``: where ``gig report`` writes by default."""
    return _root(run) / "report"


def explain_dir(run: str | Path | RunStore) -> Path:
    """``RUN/explain``: where ``gig explain`` writes by default."""
    return _root(run) / "explain"
