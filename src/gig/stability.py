"""Concept stability: would a layer's concepts come back with another seed and other images?

A run's concepts are the centroids one bisecting k-means found with one seed on one set of
sampled PFVs. For each of ``seeds`` refits, this module draws a share ``fraction`` of the run's
images (each refit its own draw), takes their sampled PFVs in a shuffled row order and clusters
them again with a new seed, never the run's initialisation (a shared start is what made
published stability figures look better than they were), into the run's ``K`` concepts. Each
refit's concepts are matched one to one to the run's by the Hungarian assignment on cosine
similarity (``scipy.optimize.linear_sum_assignment``), so no refit concept stands in for two.

Figures (``RUN/stability/stability.json``, ``gig stability RUN``):

* per concept: its matched cosine in each refit and their mean (``similarity``);
* per layer: the share of concepts whose mean matched cosine is at least ``threshold``
  (``share_matched``), its median, and per refit the share matched in that refit alone; and, as a
  reference without cluster structure, the same figures for the run's concepts matched to ``K``
  sampled PFVs drawn at random (``baseline_*``).

A concept with a high matched similarity is found again by a fresh clustering of other images;
a low one is an accident of this seed and these images. The matching is by vectors, which is
sound here because every refit clusters the same layer of the same model (two models need the
response-based matching of a comparison instead).

**Graphs** (``graphs=True``, ``gig stability RUN --graphs``; the run's graph stage must be done).
For each refit, and once for a *control* made of the run's own dictionaries, a derived run
``RUN/stability/graphs/<hash>/`` (named by a hash of its dictionaries' bytes, so a rerun resumes
it and a changed refit never reuses it) runs every stage again on the images of the run's graph
classes alone, with that refit's dictionaries given as user dictionaries (``dictionaries``; the
layers not refitted keep the run's) and the run's graph classes. Each of the run's class graphs
is then mapped onto the derived run's graph of that class through the refit's one-to-one
matching (:func:`gig.compare.graph_difference`): per class graph, the share of its concept nodes
(per layer and over all layers; the class node on top is not counted) whose counterpart is among
the derived graph's nodes, and the share of its edges (concept to concept, concept to class)
whose two ends' counterparts are joined there too. The control shows what the procedure alone
changes (the λ rule chosen again on those images alone); ``top_k / K`` per layer is what
a top-k drawn at random would recur by (``chance_nodes``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import BisectingKMeans
from tqdm.auto import tqdm

from .artefacts import (  # noqa: F401  (load_stability re-exported: moved to gig.artefacts)
    class_graph_path,
    graph_index,
    graph_path,
    load_dictionary,
    load_images,
    load_samples,
    load_stability,
    stability_path,
    stability_run_dir,
)
from .errors import ConfigError, RunMismatchError
from .store import RunStore, as_store, load_json, save_json, save_tensors

#: Mean matched cosine at which a concept counts as found again.
THRESHOLD = 0.9


def match_concepts(reference: torch.Tensor, other: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of ``other (K', C)`` to ``reference (K, C)`` maximising the summed
    cosine similarity (Hungarian assignment). Returns, per reference concept, the index of its
    match in ``other`` (-1 where ``K' < K`` leaves it unmatched) and the cosine (0 there)."""
    a = torch.nn.functional.normalize(reference.double(), dim=1)
    b = torch.nn.functional.normalize(other.double(), dim=1)
    cosine = (a @ b.T).numpy()
    rows, cols = linear_sum_assignment(cosine, maximize=True)
    match = np.full(reference.shape[0], -1, dtype=np.int64)
    similarity = np.zeros(reference.shape[0])
    match[rows], similarity[rows] = cols, cosine[rows, cols]
    return match, similarity


def refit_concepts(pfv: np.ndarray, image_ids: np.ndarray, k: int, fraction: float, seed: int) -> np.ndarray:
    """Bisecting k-means concepts ``(k, C)`` of the PFVs of a ``fraction`` of the images, drawn,
    shuffled and clustered with ``seed`` (a generator of its own, not the run's)."""
    rng = np.random.default_rng(seed)
    images = np.unique(image_ids)
    chosen = rng.choice(images, size=max(1, round(fraction * len(images))), replace=False)
    rows = np.flatnonzero(np.isin(image_ids, chosen))
    rows = rows[rng.permutation(len(rows))]
    X = pfv[rows].astype(np.float32)
    km = BisectingKMeans(n_clusters=min(k, len(rows)), bisecting_strategy="biggest_inertia", random_state=seed)
    return km.fit(X).cluster_centers_.astype(np.float32)


def refit_seed(store: RunStore, r: int, base_seed: int = 1) -> int:
    """The seed of refit ``r``: the run's seed plus a large odd offset per refit (never the run's)."""
    return (store.config.seed + 7919 * (base_seed + r)) % 2**32


def _refits(
    store: RunStore, pfv: np.ndarray, image_ids: np.ndarray, k: int, seeds: int, fraction: float, base_seed: int
):
    return [refit_concepts(pfv, image_ids, k, fraction, refit_seed(store, r, base_seed)) for r in range(seeds)]


def layer_refits(store: RunStore, layer: str, seeds: int, fraction: float, base_seed: int = 1) -> list[np.ndarray]:
    """The ``seeds`` refitted dictionaries ``(K, C)`` of ``layer`` that :func:`layer_stability`
    matches to the run's (the same seeds, the same draws)."""
    samples = load_samples(store, layer)
    k = load_dictionary(store, layer).shape[0]
    return _refits(store, samples["pfv"].numpy(), samples["image_id"].numpy(), k, seeds, fraction, base_seed)


def _layer_stability(
    store: RunStore, layer: str, seeds: int, fraction: float, threshold: float, base_seed: int
) -> tuple[dict, list[np.ndarray]]:
    """:func:`layer_stability`'s figures and the refitted dictionaries they come from."""
    samples = load_samples(store, layer)
    V = load_dictionary(store, layer)
    pfv, image_ids = samples["pfv"].numpy(), samples["image_id"].numpy()
    refits = _refits(store, pfv, image_ids, V.shape[0], seeds, fraction, base_seed)
    sims = np.stack([match_concepts(V, torch.from_numpy(refit))[1] for refit in refits])  # (seeds, K)
    mean = sims.mean(0)
    # A reference without cluster structure: the run's concepts matched to K sampled PFVs drawn at
    # random (what a "refit" that only picked data points would give).
    rng = np.random.default_rng(store.config.seed + 7919 * base_seed)
    drawn = pfv[rng.choice(len(pfv), size=min(V.shape[0], len(pfv)), replace=False)]
    _, baseline = match_concepts(V, torch.from_numpy(drawn.astype(np.float32)))
    figures = {
        "K": int(V.shape[0]),
        "share_matched": float((mean >= threshold).mean()),
        "median_similarity": float(np.median(mean)),
        "baseline_median_similarity": float(np.median(baseline)),
        "baseline_share_matched": float((baseline >= threshold).mean()),
        "share_matched_per_refit": [float((s >= threshold).mean()) for s in sims],
        "similarity": [round(float(s), 4) for s in mean],
        "similarity_per_refit": [[round(float(v), 4) for v in s] for s in sims],
    }
    return figures, refits


def layer_stability(
    store: RunStore, layer: str, seeds: int, fraction: float, threshold: float = THRESHOLD, base_seed: int = 1
) -> dict:
    """The stability figures of one layer (see the module docstring)."""
    return _layer_stability(store, layer, seeds, fraction, threshold, base_seed)[0]


# ---------------------------------------------------------------------------- graphs
def graph_recurrence(graph: dict, other: dict, matches: dict[str, np.ndarray]) -> dict:
    """How much of the class graph ``graph`` comes back in ``other`` (the same class's graph of a
    run with refitted concepts), its concepts mapped through ``matches`` (per layer, the index of
    each run concept's match in the refit, -1 for none; :func:`match_concepts`).

    ``nodes``: the share of ``graph``'s concept nodes whose counterpart is a node of ``other``
    (``nodes_per_layer`` per layer; None for a layer without nodes); ``edges``: the share of its
    edges whose two ends' counterparts are joined in ``other`` too (``edges_between_concepts``,
    ``edges_to_class``: the two kinds apart). The class node maps to itself and is not counted."""
    from .compare import graph_difference

    pairs = {
        layer: {
            "layer_b": layer,
            "concepts": [{"counterpart": bool(j >= 0), "match": int(j)} for j in np.asarray(match).tolist()],
        }
        for layer, match in matches.items()
    }
    diff = graph_difference(graph, other, pairs)
    layer_of = {n["id"]: n["layer"] for n in graph["nodes"] if n.get("concept") is not None}
    kept = {k["a"] for k in diff["nodes"]["kept"]} & set(layer_of)
    kept_edges = {tuple(e["a"]) for e in diff["edges"]["kept"]}
    edges = [(e["source"], e["target"]) for e in graph["edges"]]
    between = [e for e in edges if e[1] in layer_of]
    to_class = [e for e in edges if e[1] not in layer_of]

    def share(items, hits) -> float | None:
        return round(sum(i in hits for i in items) / len(items), 6) if items else None

    return {
        "nodes": share(list(layer_of), kept),
        "nodes_per_layer": {
            layer: share([i for i, l in layer_of.items() if l == layer], kept) for layer in graph["layers"]
        },
        "edges": share(edges, kept_edges),
        "edges_between_concepts": share(between, kept_edges),
        "edges_to_class": share(to_class, kept_edges),
        "n_nodes": len(layer_of),
        "n_edges": len(edges),
    }


def _mean_figures(items: list[dict]) -> dict:
    """The mean of each figure of :func:`graph_recurrence` over ``items`` (Nones left out)."""

    def mean(values):
        values = [v for v in values if v is not None]
        return round(float(np.mean(values)), 6) if values else None

    first = items[0]
    return {
        "nodes": mean([i["nodes"] for i in items]),
        "nodes_per_layer": {
            layer: mean([i["nodes_per_layer"][layer] for i in items]) for layer in first["nodes_per_layer"]
        },
        **{key: mean([i[key] for i in items]) for key in ("edges", "edges_between_concepts", "edges_to_class")},
    }


def dictionaries_hash(dictionaries: dict[str, np.ndarray]) -> str:
    """A hash of the dictionaries' layers, shapes and bytes (the derived run's directory name)."""
    h = hashlib.sha256()
    for layer, V in dictionaries.items():
        V = np.ascontiguousarray(V, dtype=np.float32)
        h.update(f"{layer}\0{V.shape}\0".encode())
        h.update(V.tobytes())
    return h.hexdigest()[:16]


def derived_run(
    store: RunStore, dictionaries: dict[str, np.ndarray], classes: list[int], source, bundle, progress=False
):
    """Every stage of ``store``'s run again on ``source`` (a subset of its images) with
    ``dictionaries`` (every layer's ``(K, C)``) as user dictionaries and ``classes`` as graph
    classes, in ``RUN/stability/graphs/<hash of the dictionaries>/`` (resumed where it exists).
    Refused, after its collect stage, when its targets are not the run's. Returns its store."""
    from .pipeline import Pipeline

    out = stability_run_dir(store, dictionaries_hash(dictionaries))
    folder = out / "dictionaries"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for layer, V in dictionaries.items():
        path = folder / f"{layer}.safetensors"
        if not path.is_file():
            save_tensors(path, {"V": np.ascontiguousarray(V, dtype=np.float32)})
        files[layer] = str(path.resolve())
    # a refitted layer is coded by the run's coder as a user dictionary, whatever basis it had
    bases = {layer: spec for layer, spec in store.config.bases.items() if layer not in files}
    config = dataclasses.replace(store.config, dictionaries=files, bases=bases, graph_classes=list(classes))
    pipe = Pipeline(config, out, model=bundle, source=source, progress=progress)
    pipe.run(["collect"])
    expected = {int(i["image_id"]): int(i["target"]) for i in load_images(store)["images"]}
    got = {int(i["image_id"]): int(i["target"]) for i in load_images(pipe.store)["images"]}
    differ = sorted(i for i in got.keys() | {r.image_id for r in source.records} if got.get(i) != expected.get(i))
    if differ:
        raise RunMismatchError(
            f"{out}: the derived run's targets differ from the run's on {len(differ)} of its "
            f"{len(source.records)} image(s) (ids {differ[:5]}); the model, its weights or the images "
            f"changed since {store.root} ran: recompute the run first, or use its own model and images"
        )
    pipe.run()  # the other stages (collect is done)
    return pipe.store


def graph_stability(
    run: str | Path | RunStore,
    refits: list[dict[str, np.ndarray]],
    model=None,
    progress: bool = True,
) -> dict:
    """How often each class graph's top-k nodes and edges come back with refitted concepts.

    ``refits``: per refit, ``{layer: (K', C)}`` refitted dictionaries (layers left out keep the
    run's). For each refit, and for a control made of the run's own dictionaries, every stage runs
    again on the images of the run's graph classes (:func:`derived_run`); each class graph of the
    run is then mapped onto the derived one of its class through the one-to-one matching of the
    refit's concepts to the run's (:func:`match_concepts`; the identity for the control and for
    layers not refitted), and :func:`graph_recurrence` gives the shares that come back. ``model``:
    the run's model bundle (default: loaded from its config once)."""
    from .models import load_run_model

    store = as_store(run)
    store.require("graph")
    classes = [int(c) for c in graph_index(store)["classes"]]
    if not classes:
        raise RunMismatchError(f"{store.root} has no class graphs to measure (its graph stage built none)")
    graphs = {f"class_{c}": load_json(class_graph_path(store, c)) for c in classes}
    layers = list(store.config.layers)
    own = {layer: load_dictionary(store, layer).float().numpy() for layer in layers}
    store.analysed(sorted({layer for refit in refits for layer in refit}))
    wanted = set(classes)
    ids = sorted(int(i["image_id"]) for i in load_images(store)["images"] if int(i["target"]) in wanted)
    bundle = model or load_run_model(store.config)
    subset = _image_subset(store, ids, bundle)
    measure = partial(_measure_refit, store, layers, own, graphs, classes, subset, bundle)
    bar = tqdm(total=len(refits) + 1, desc="stability: graphs", unit="run", disable=not progress)
    with bar:
        control = measure({})
        bar.update()
        per_refit = []
        for refit in refits:
            per_refit.append(measure(refit))
            bar.update()
    top_k = int(store.config.top_k)
    return {
        "classes": classes,
        "n_images": len(ids),
        "top_k": top_k,
        "chance_nodes": {layer: round(min(top_k, len(V)) / len(V), 6) for layer, V in own.items()},
        "matching": "refit concepts matched one to one to the run's (Hungarian, cosine); identity for the control",
        "mean": {name: _mean_figures([r["graphs"][name] for r in per_refit]) if per_refit else None for name in graphs},
        "mean_all": _mean_figures([r["mean"] for r in per_refit]) if per_refit else None,
        "control": control,
        "refits": per_refit,
    }


def _image_subset(store: RunStore, ids: list[int], bundle):
    """The run's image source, opened as :class:`gig.pipeline.Pipeline` opens it, narrowed to the
    images ``ids`` (in that order); refused where one of them is not in it."""
    from .images import open_source

    source = open_source(store.config.images, class_index=bundle.class_index if bundle.class_names else None)
    by_id = {r.image_id: r for r in source.records}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise RunMismatchError(
            f"image id(s) {missing[:5]} of {store.root} are not in its image source {store.config.images}"
        )
    subset = copy.copy(source)
    subset.records = [by_id[i] for i in ids]
    subset.skipped = []  # its own, not the opened source's
    return subset


def _measure_refit(
    store: RunStore,
    layers: list[str],
    own: dict[str, np.ndarray],
    graphs: dict[str, dict],
    classes: list[int],
    subset,
    bundle,
    dictionaries: dict[str, np.ndarray],
) -> dict:
    """One refit's figures (``dictionaries``: its refitted ``{layer: (K', C)}``; ``{}``: the
    control): every stage rerun on ``subset`` with them (:func:`derived_run`), then each of the run's
    class ``graphs`` mapped onto the derived one through the refit's one-to-one matching to the
    run's concepts ``own`` (the identity where a layer is the run's)."""
    full = {layer: np.asarray(dictionaries.get(layer, own[layer]), dtype=np.float32) for layer in layers}
    matches = {
        layer: np.arange(len(own[layer]))
        if np.array_equal(full[layer], own[layer])
        else match_concepts(torch.from_numpy(own[layer]), torch.from_numpy(full[layer]))[0]
        for layer in layers
    }
    derived = derived_run(store, full, classes, subset, bundle)
    figures = {
        name: graph_recurrence(graph, load_json(graph_path(derived, f"{name}.json")), matches)
        for name, graph in graphs.items()
    }
    return {
        "run": derived.root.relative_to(store.root).as_posix(),
        "refitted": [layer for layer in layers if not np.array_equal(full[layer], own[layer])],
        "graphs": figures,
        "mean": _mean_figures(list(figures.values())),
    }


def concept_stability(
    run: str | Path | RunStore,
    seeds: int = 3,
    fraction: float = 0.8,
    threshold: float = THRESHOLD,
    layers: list[str] | None = None,
    progress: bool = True,
    graphs: bool = False,
    model=None,
) -> dict:
    """Refit every (or each named) layer's concepts ``seeds`` times on a ``fraction`` of the
    images and match them to the run's; written to ``RUN/stability/stability.json`` and returned.

    ``graphs``: also measure how often each class graph's nodes and edges come back with the
    refitted concepts (:func:`graph_stability`, under ``"graphs"``; the run's graph stage must be
    done; the layers not named keep the run's dictionaries). ``model``: the run's model bundle for
    that (default: loaded from the run's config)."""
    store = as_store(run)
    store.require("concepts")
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds must be an integer of at least 1, not {seeds!r}")
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must lie in (0, 1], not {fraction!r}")
    if not 0 < threshold <= 1:
        raise ConfigError(f"threshold must lie in (0, 1], not {threshold!r}")
    layers = layers or list(store.config.layers)
    store.analysed(layers)
    if graphs:
        store.require("graph")  # before any refit
    figures, refits = {}, {}
    for layer in tqdm(layers, desc="stability", unit="layer", disable=not progress):
        figures[layer], refits[layer] = _layer_stability(store, layer, seeds, fraction, threshold, 1)
    result = {
        "seeds": seeds,
        "fraction": fraction,
        "threshold": threshold,
        "matching": "Hungarian assignment on cosine similarity, one to one",
        "layers": figures,
    }
    if graphs:
        per_refit = [{layer: refits[layer][r] for layer in layers} for r in range(seeds)]
        result["graphs"] = graph_stability(store, per_refit, model=model, progress=progress)
    path = stability_path(store)
    save_json(path, result)
    return result
