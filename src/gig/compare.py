"""Two runs compared: concepts matched by how they respond on the same images, graphs diffed.

``gig compare RUN_A RUN_B --out DIR`` (Python: ``gig.open(A).compare(gig.open(B), out=DIR)``)
compares two runs made on the same images: two models, two checkpoints of one model, or one
model analysed twice (other seeds, other settings). With ``--on a`` the runs may have analysed
different images (one model on two data sets, or two models on theirs): run B's concepts are
then coded on run A's images by B's own model, dictionaries and λ (:class:`EncodedCodes`), and
the responses compared there.

**Matching by response, not by vector.** Two separately fitted dictionaries of two models live
in two feature spaces, and even in one space vectors can look alike while they respond to
different things. A concept's *response* is its code at every position of every shared image;
for a pair of layers ``(a, b)`` (by default the runs' layers in order) both codes are pooled to
the coarser of the two grids (area averages, so that grids of other sizes line up on the image)
and every pair of concepts gets the Pearson correlation of their responses over all
(image, position) cells. The Hungarian assignment on that matrix
(``scipy.optimize.linear_sum_assignment``) matches the concepts one to one.

**What chance gives.** The same statistic with run B's images shifted by one (image ``i`` of A
against image ``i + 1`` of B, cyclically) keeps each concept's own statistics (how often it fires,
where in the frame) but no correspondence between the images; its Hungarian matching gives the
similarities that chance and position alone produce. A concept *has a counterpart* when its
matched correlation exceeds the 95th percentile of those chance similarities (and
``min_similarity``, default 0.5). A concept that never fires on the shared images has no response
to correlate: it is reported as inactive, never matched.

**Graphs.** For every graph both runs built (``global`` and each ``class_C``), a node of A is
*kept* when its counterpart is a node of B's graph, *lost* otherwise; B's nodes that are no kept
node's counterpart are *gained*; edges likewise through their two ends. Kept nodes and edges carry
both weights and their difference with an interval ``± 1.96 · (se_A² + se_B²)^½`` from the
graphs' own standard errors: conservative where the two runs' per-image values are positively
correlated (they are, on the same images), so an interval that excludes 0 is a real change.

Output: ``DIR/compare.json`` (everything above) and ``DIR/index.html``, an offline page in the
report's style (no script, no network): per layer pair the matched concepts with both runs'
top exemplar crops side by side, the concepts without counterpart, and the graph differences.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from .access import RunAccess
from .artefacts import CodeReader, load_images, saved_graph_files
from .errors import ConfigError, RunMismatchError
from .store import RunStore, load_json, save_json

#: The lowest matched correlation that can count as a counterpart, whatever chance gives.
MIN_SIMILARITY = 0.5
#: Shared images read per layer pair by default (drawn with the seed when there are more).
MAX_IMAGES = 200


# ---------------------------------------------------------------------------- the images
def shared_image_ids(a: RunStore, b: RunStore) -> list[int]:
    """The image ids both runs analysed, after checking that they name the same images.

    The runs must have used the same image list: every image id of each run must exist in the
    other with the same path. Raises :class:`RunMismatchError` naming the first ids that differ."""
    paths_a = {int(i["image_id"]): i["path"] for i in load_images(a)["images"]}
    paths_b = {int(i["image_id"]): i["path"] for i in load_images(b)["images"]}
    only_a = sorted(set(paths_a) - set(paths_b))
    only_b = sorted(set(paths_b) - set(paths_a))
    other = sorted(i for i in set(paths_a) & set(paths_b) if paths_a[i] != paths_b[i])
    if only_a or only_b or other:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} image id(s) only in {a.root} (e.g. {only_a[:3]})")
        if only_b:
            parts.append(f"{len(only_b)} image id(s) only in {b.root} (e.g. {only_b[:3]})")
        if other:
            i = other[0]
            parts.append(f"{len(other)} id(s) name other images (id {i}: {paths_a[i]!r} against {paths_b[i]!r})")
        raise RunMismatchError(
            "the runs were not made on the same images, so their concepts cannot be matched by response: "
            + "; ".join(parts)
        )
    if not paths_a:
        raise RunMismatchError(f"{a.root} and {b.root} share no images")
    return sorted(paths_a)


def layer_pairs(a: RunStore, b: RunStore, pairs: Sequence[str] | None) -> list[tuple[str, str]]:
    """``[(layer of A, layer of B)]``: ``pairs`` as ``"LA=LB"`` strings, or the runs' layers in
    order (which needs as many layers in each)."""
    la, lb = list(a.config.layers), list(b.config.layers)
    if not pairs:
        if len(la) != len(lb):
            raise ConfigError(
                f"the runs analyse {len(la)} and {len(lb)} layers: name the pairs to compare "
                f"(--pair LAYER_A=LAYER_B; A has {la}, B has {lb})"
            )
        return list(zip(la, lb))
    out = []
    for spec in pairs:
        if spec.count("=") != 1:
            raise ConfigError(f"pair {spec!r}: write LAYER_A=LAYER_B")
        x, y = (s.strip() for s in spec.split("="))
        if x not in la:
            raise ConfigError(f"pair {spec!r}: {x!r} is not a layer of {a.root} (its layers: {la})")
        if y not in lb:
            raise ConfigError(f"pair {spec!r}: {y!r} is not a layer of {b.root} (its layers: {lb})")
        out.append((x, y))
    return out


# ---------------------------------------------------------------------------- responses
class StoredCodes:
    """A run's own codes of its images (:class:`gig.decompose.CodeReader` per layer)."""

    def __init__(self, store: RunStore):
        self.store = store
        self._readers: dict = {}

    def K(self, layer: str) -> int:
        return self._reader(layer).K

    def codes(self, layer: str, image_id: int) -> torch.Tensor:
        return self._reader(layer).codes(image_id)

    def _reader(self, layer: str):
        if layer not in self._readers:
            self._readers[layer] = CodeReader(self.store, layer)
        return self._readers[layer]


class EncodedCodes:
    """Run B's codes of run A's images: A's photos read from A's image source, preprocessed as
    B's model wants, coded at ``layers`` with B's dictionaries, λ and coder
    (:func:`gig.decompose.encode_pixels`), ``batch`` images at a time; kept sparse."""

    def __init__(self, access_b: RunAccess, access_a: RunAccess, image_ids: list[int], layers: list[str], batch=16):
        from .decompose import encode_pixels

        self._codes: dict[tuple[str, int], torch.Tensor] = {}
        self._K = {layer: int(access_b.dictionary(layer).shape[0]) for layer in layers}
        records = {r.image_id: r for r in access_a.source.records}
        missing = [i for i in image_ids if i not in records]
        if missing:
            raise RunMismatchError(f"image id(s) {missing[:5]} are not in {access_a.store.root}'s image source")
        bundle = access_b.bundle
        for lo in range(0, len(image_ids), batch):
            ids = image_ids[lo : lo + batch]
            pixels = torch.stack([bundle.preprocess(access_a.source.load(records[i])) for i in ids])
            _, codes = encode_pixels(access_b.store, access_b.handle, pixels, layers)
            for layer, U in codes.items():
                for i, image_id in enumerate(ids):
                    self._codes[(layer, image_id)] = U[i].to_sparse()

    def K(self, layer: str) -> int:
        return self._K[layer]

    def codes(self, layer: str, image_id: int) -> torch.Tensor:
        return self._codes[(layer, image_id)].to_dense()


def pooled_codes(codes: torch.Tensor, grid: tuple[int, int], to: tuple[int, int]) -> torch.Tensor:
    """Codes ``(H·W, K)`` of one image pooled to the grid ``to`` by area averages: ``(h·w, K)``."""
    h, w = grid
    maps = codes.T.reshape(1, -1, h, w).double()
    if (h, w) != tuple(to):
        maps = torch.nn.functional.adaptive_avg_pool2d(maps, to)
    return maps[0].flatten(1).T


class ResponseMoments:
    """Sums for the Pearson correlation of every concept of A with every concept of B over
    (image, position) cells, for the images in correspondence and for B shifted by one image
    (the chance reference). Images arrive one at a time; memory is ``O(K_A · K_B)``."""

    def __init__(self, k_a: int, k_b: int):
        self.n = 0
        self.sum_a, self.sum_b = torch.zeros(k_a, dtype=torch.float64), torch.zeros(k_b, dtype=torch.float64)
        self.sq_a, self.sq_b = torch.zeros(k_a, dtype=torch.float64), torch.zeros(k_b, dtype=torch.float64)
        self.cross = torch.zeros(k_a, k_b, dtype=torch.float64)
        self.shifted = torch.zeros(k_a, k_b, dtype=torch.float64)
        self._first_b: torch.Tensor | None = None
        self._last_a: torch.Tensor | None = None

    def add(self, ua: torch.Tensor, ub: torch.Tensor) -> None:
        """One image's pooled codes ``ua (P, K_A)``, ``ub (P, K_B)`` (the same cells)."""
        self.n += ua.shape[0]
        self.sum_a += ua.sum(0)
        self.sum_b += ub.sum(0)
        self.sq_a += (ua * ua).sum(0)
        self.sq_b += (ub * ub).sum(0)
        self.cross += ua.T @ ub
        if self._last_a is None:
            self._first_b = ub
        else:
            self.shifted += self._last_a.T @ ub  # A's previous image against B's this one
        self._last_a = ua

    def correlations(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(R (K_A, K_B), R_chance (K_A, K_B), active_a (K_A,), active_b (K_B,))``: a concept is
        active when its response varies over the cells; an inactive one correlates with nothing."""
        if self._last_a is None:
            raise ValueError("no images added")
        shifted = self.shifted + self._last_a.T @ self._first_b  # close the cycle
        n = float(self.n)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        var_a = (self.sq_a / n - mean_a**2).clamp_min(0)
        var_b = (self.sq_b / n - mean_b**2).clamp_min(0)
        # Relative to each concept's own scale: rounding leaves ~1e-16 · E[u²] in a constant's variance.
        active_a = var_a > 1e-10 * (self.sq_a / n).clamp_min(1e-300)
        active_b = var_b > 1e-10 * (self.sq_b / n).clamp_min(1e-300)
        scale = torch.outer(var_a.sqrt(), var_b.sqrt())
        outer = torch.outer(mean_a, mean_b)
        mask = torch.outer(active_a, active_b)

        def pearson(sums: torch.Tensor) -> torch.Tensor:
            r = (sums / n - outer) / scale.clamp_min(1e-300)
            return torch.where(mask, r.clamp(-1, 1), torch.zeros_like(r))

        return pearson(self.cross), pearson(shifted), active_a, active_b


@dataclass
class Matching:
    """One to one matching of A's concepts to B's: ``match[q]`` (−1: none), ``similarity[q]``."""

    match: np.ndarray
    similarity: np.ndarray


def match_by_response(R: torch.Tensor) -> Matching:
    """The Hungarian assignment maximising the summed correlation ``R (K_A, K_B)``."""
    r = R.numpy()
    rows, cols = linear_sum_assignment(r, maximize=True)
    match = np.full(r.shape[0], -1, dtype=np.int64)
    similarity = np.zeros(r.shape[0])
    match[rows], similarity[rows] = cols, r[rows, cols]
    return Matching(match, similarity)


def compare_layers(
    access_a: RunAccess,
    access_b: RunAccess,
    la: str,
    lb: str,
    image_ids: list[int],
    min_similarity: float = MIN_SIMILARITY,
    bar=None,
    codes_a=None,
    codes_b=None,
) -> dict:
    """The matching of the concepts of ``la`` (run A) and ``lb`` (run B) on ``image_ids``;
    ``codes_a`` / ``codes_b``: where each run's codes come from (default: the runs' own,
    :class:`StoredCodes`; :class:`EncodedCodes` for B's concepts on A's images)."""
    codes_a = codes_a or StoredCodes(access_a.store)
    codes_b = codes_b or StoredCodes(access_b.store)
    grid_a = access_a.handle.layer_shapes([la])[la][1:]
    grid_b = access_b.handle.layer_shapes([lb])[lb][1:]
    to = (min(grid_a[0], grid_b[0]), min(grid_a[1], grid_b[1]))
    moments = ResponseMoments(codes_a.K(la), codes_b.K(lb))
    for image_id in image_ids:
        moments.add(
            pooled_codes(codes_a.codes(la, image_id), grid_a, to), pooled_codes(codes_b.codes(lb, image_id), grid_b, to)
        )
        if bar is not None:
            bar.update(1)
    R, R_chance, active_a, active_b = moments.correlations()
    matching = match_by_response(R)
    chance = match_by_response(R_chance).similarity[active_a.numpy()]
    chance_p95 = float(np.percentile(chance, 95)) if len(chance) else None
    threshold = max(min_similarity, chance_p95 if chance_p95 is not None else 1.0)
    act_a = active_a.numpy()
    counterpart = (matching.similarity > threshold) & act_a & (matching.match >= 0)
    return {
        "layer_a": la,
        "layer_b": lb,
        "K_a": codes_a.K(la),
        "K_b": codes_b.K(lb),
        "grid_a": list(grid_a),
        "grid_b": list(grid_b),
        "pooled_grid": list(to),
        "n_images": len(image_ids),
        "n_cells": int(moments.n),
        **_matching_summary(matching, act_a, active_b.numpy(), counterpart, chance, chance_p95, threshold),
        "concepts": _concept_rows(matching, act_a, counterpart, _vector_cosines(access_a, access_b, la, lb, matching)),
    }


def _matching_summary(
    matching: Matching,
    act_a: np.ndarray,
    act_b: np.ndarray,
    counterpart: np.ndarray,
    chance: np.ndarray,
    chance_p95: float | None,
    threshold: float,
) -> dict:
    """The layer pair's matching in numbers (:func:`compare_layers`' record from ``active_a`` to
    ``unmatched_b``): ``act_a (K_A,)``, ``act_b (K_B,)`` and ``counterpart (K_A,)`` are boolean,
    ``chance`` the chance matching's similarities of A's active concepts."""
    matched_b = set(matching.match[counterpart].tolist())
    active_sims = matching.similarity[act_a]
    return {
        "active_a": int(act_a.sum()),
        "active_b": int(act_b.sum()),
        "chance_p95": None if chance_p95 is None else round(chance_p95, 6),
        "chance_median": round(float(np.median(chance)), 6) if len(chance) else None,
        "threshold": round(threshold, 6),
        "median_similarity": round(float(np.median(active_sims)), 6) if len(active_sims) else None,
        "share_matched": round(float(counterpart.sum() / max(int(act_a.sum()), 1)), 6),
        # related beyond chance, whether or not strongly enough to count as the same concept
        "share_above_chance": round(
            float(((matching.similarity > (chance_p95 if chance_p95 is not None else 1.0)) & act_a).sum())
            / max(int(act_a.sum()), 1),
            6,
        ),
        "unmatched_a": [q for q in range(len(act_a)) if act_a[q] and not counterpart[q]],
        "unmatched_b": [r for r in range(len(act_b)) if act_b[r] and r not in matched_b],
    }


def _vector_cosines(
    access_a: RunAccess, access_b: RunAccess, la: str, lb: str, matching: Matching
) -> np.ndarray | None:
    """The cosine ``(K_A,)`` of each concept vector of A with its match's in B, or ``None``
    where the layers differ in width."""
    # Vector cosines where both layers have the same width (same model, or a copy): shown beside
    # the response correlation, never used to match.
    Va, Vb = access_a.dictionary(la), access_b.dictionary(lb)
    if Va.shape[1] != Vb.shape[1]:
        return None
    na = torch.nn.functional.normalize(Va.double(), dim=1)
    nb = torch.nn.functional.normalize(Vb.double(), dim=1)
    idx = torch.from_numpy(np.maximum(matching.match, 0))
    return (na * nb[idx]).sum(1).numpy()


def _concept_rows(
    matching: Matching, act_a: np.ndarray, counterpart: np.ndarray, cosine: np.ndarray | None
) -> list[dict]:
    """One record per concept of A: whether it is active, its match and similarity (active ones),
    whether that is a counterpart, and the vector cosine (where ``cosine (K_A,)`` is given)."""
    concepts = []
    for q in range(len(matching.match)):
        row = {
            "concept": q,
            "active": bool(act_a[q]),
            "match": int(matching.match[q]) if act_a[q] and matching.match[q] >= 0 else None,
            "similarity": round(float(matching.similarity[q]), 6) if act_a[q] else None,
            "counterpart": bool(counterpart[q]),
        }
        if cosine is not None and row["match"] is not None:
            row["vector_cosine"] = round(float(cosine[q]), 6)
        concepts.append(row)
    return concepts


# ---------------------------------------------------------------------------- graphs
def _node_map(graph_a: dict, layers: dict[str, dict]) -> dict[str, str]:
    """A node id of A → the node id its concept's counterpart has in B (only counterparts)."""
    out = {}
    for node in graph_a["nodes"]:
        pair = layers.get(node.get("layer"))
        if pair is None or node.get("concept") is None:
            continue
        row = pair["concepts"][int(node["concept"])]
        if row["counterpart"]:
            out[node["id"]] = f"{pair['layer_b']}:{row['match']}"
    return out


def _difference(a: dict, b: dict, key: str) -> dict:
    """Both weights, their difference and its interval from the two standard errors."""
    wa, wb = float(a[key]), float(b[key])
    se_a, se_b = a.get("se"), b.get("se")
    out = {"weight_a": wa, "weight_b": wb, "difference": wb - wa}
    if se_a is not None and se_b is not None:
        half = 1.96 * math.hypot(float(se_a), float(se_b))
        out["ci"] = [wb - wa - half, wb - wa + half]
        out["changed"] = not (out["ci"][0] <= 0 <= out["ci"][1])
    return out


def graph_difference(graph_a: dict, graph_b: dict, layers: dict[str, dict]) -> dict:
    """Nodes and edges of two graphs of one kind, A's mapped to B's through the counterparts:
    kept (with both weights and the difference), lost (A only) and gained (B only). Nodes that
    are not concepts (the class or logit on top) are mapped to the node of the same id."""
    to_b = _node_map(graph_a, layers)
    concept_ids_a = {n["id"] for n in graph_a["nodes"] if n.get("concept") is not None}
    for node in graph_a["nodes"]:
        if node["id"] not in concept_ids_a:
            to_b[node["id"]] = node["id"]  # the head: same output in both runs
    nodes_b = {n["id"]: n for n in graph_b["nodes"]}
    kept, lost = [], []
    for node in graph_a["nodes"]:
        other = nodes_b.get(to_b.get(node["id"], ""))
        if other is None:
            lost.append({"a": node["id"], "importance": node.get("importance")})
        else:
            kept.append({"a": node["id"], "b": other["id"], **_difference(node, other, "importance")})
    kept_b = {k["b"] for k in kept}
    gained = [{"b": n["id"], "importance": n.get("importance")} for n in graph_b["nodes"] if n["id"] not in kept_b]
    edges_b = {(e["source"], e["target"]): e for e in graph_b["edges"]}
    e_kept, e_lost = [], []
    for edge in graph_a["edges"]:
        key = (to_b.get(edge["source"]), to_b.get(edge["target"]))
        other = edges_b.get(key) if None not in key else None
        if other is None:
            e_lost.append({"a": [edge["source"], edge["target"]], "weight": edge["weight"]})
        else:
            e_kept.append({"a": [edge["source"], edge["target"]], "b": list(key), **_difference(edge, other, "weight")})
    e_kept_b = {tuple(e["b"]) for e in e_kept}
    e_gained = [
        {"b": [e["source"], e["target"]], "weight": e["weight"]}
        for e in graph_b["edges"]
        if (e["source"], e["target"]) not in e_kept_b
    ]
    return {
        "nodes": {"kept": kept, "lost": lost, "gained": gained},
        "edges": {"kept": e_kept, "lost": e_lost, "gained": e_gained},
        "node_recurrence": round(len(kept) / max(len(graph_a["nodes"]), 1), 6),
        "edge_recurrence": round(len(e_kept) / max(len(graph_a["edges"]), 1), 6),
    }


def _graph_files(store: RunStore) -> dict[str, Path]:
    """``{name: path}`` of the graphs a run's graph stage wrote (``global``, ``class_C``)."""
    if not store.is_done("graph"):
        return {}
    return saved_graph_files(store)


def graph_differences(a: RunStore, b: RunStore, layers: dict[str, dict]) -> dict:
    """:func:`graph_difference` for every graph file both runs hold (``global``, ``class_C``);
    graphs that only one run built are listed by name."""
    files_a, files_b = _graph_files(a), _graph_files(b)
    both = sorted(set(files_a) & set(files_b))
    return {
        "graphs": {name: graph_difference(load_json(files_a[name]), load_json(files_b[name]), layers) for name in both},
        "only_a": sorted(set(files_a) - set(files_b)),
        "only_b": sorted(set(files_b) - set(files_a)),
    }


# ---------------------------------------------------------------------------- the command
def compare_runs(
    run_a: str | Path | RunStore,
    run_b: str | Path | RunStore,
    out: str | Path | None = None,
    pairs: Sequence[str] | None = None,
    max_images: int = MAX_IMAGES,
    min_similarity: float = MIN_SIMILARITY,
    seed: int = 0,
    page: bool = True,
    progress: bool = True,
    model_a=None,
    model_b=None,
    on: str = "shared",
) -> dict:
    """Compare two runs on the same images (see the module docstring); written to
    ``out/compare.json`` (and ``out/index.html`` with ``page``) when ``out`` is given, and returned.

    ``pairs``: ``"LAYER_A=LAYER_B"`` strings (default: the layers in order); ``max_images``:
    shared images read per layer pair (a seeded draw when there are more); ``model_a`` /
    ``model_b``: the models of runs made from Python with a user module; ``on``: ``"shared"``
    (the runs' own codes of the images both analysed; runs on other images are refused) or
    ``"a"`` (A's images, B's concepts coded on them by B's model, dictionaries and λ: runs on
    different image sets, or a model compared on another data set)."""
    started = time.perf_counter()
    access_a = RunAccess(run_a, model=model_a)
    access_b = RunAccess(run_b, model=model_b)
    a, b = access_a.store, access_b.store
    for store in (a, b):
        store.require("decompose")
    _check_options(max_images, min_similarity, on)
    chosen_pairs = layer_pairs(a, b, pairs)
    ids = _compared_image_ids(a, b, on, max_images, seed)
    codes_b = EncodedCodes(access_b, access_a, ids, [lb for _, lb in chosen_pairs]) if on == "a" else None
    bar = tqdm(total=len(ids) * len(chosen_pairs), desc="compare", unit="img", disable=not progress)
    layers = [
        compare_layers(access_a, access_b, la, lb, ids, min_similarity, bar, codes_b=codes_b) for la, lb in chosen_pairs
    ]
    bar.close()
    result = _comparison_record(a, b, ids, on, seed, min_similarity, layers)
    by_layer_a = {pair["layer_a"]: pair for pair in layers}
    result.update(graph_differences(a, b, by_layer_a))
    result["seconds"] = round(time.perf_counter() - started, 1)
    if out is not None:
        _write_comparison(result, access_a, access_b, Path(out), page)
    return result


def _check_options(max_images: int, min_similarity: float, on: str) -> None:
    """Raise :class:`ConfigError` for a :func:`compare_runs` option out of its range."""
    if not isinstance(max_images, int) or max_images < 2:
        raise ConfigError(f"max_images must be an integer of at least 2, not {max_images!r}")
    if not 0 <= min_similarity < 1:
        raise ConfigError(f"min_similarity must lie in [0, 1), not {min_similarity!r}")
    if on not in ("shared", "a"):
        raise ConfigError(f"on must be 'shared' or 'a', not {on!r}")


def _compared_image_ids(a: RunStore, b: RunStore, on: str, max_images: int, seed: int) -> list[int]:
    """The image ids to compare on: those both runs analysed (``on="shared"``) or run A's
    (``on="a"``), at most ``max_images`` of them (a draw with ``seed`` when there are more)."""
    if on == "shared":
        ids = shared_image_ids(a, b)
    else:
        ids = sorted(int(i["image_id"]) for i in load_images(a)["images"])
    if len(ids) < 2:
        raise RunMismatchError("the comparison has one image: the chance reference needs at least two")
    if len(ids) > max_images:
        ids = sorted(np.random.default_rng(seed).choice(ids, size=max_images, replace=False).tolist())
    return ids


def _comparison_record(
    a: RunStore, b: RunStore, ids: list[int], on: str, seed: int, min_similarity: float, layers: list[dict]
) -> dict:
    """``compare.json``'s record of the runs, images, method and layer pairs (the graph
    differences and timing are added to it)."""
    return {
        "schema": "gig.compare/1",
        "run_a": {"path": str(a.root), "model": a.config.model, "layers": list(a.config.layers)},
        "run_b": {"path": str(b.root), "model": b.config.model, "layers": list(b.config.layers)},
        "image_ids": ids,
        "on": "the images both runs analysed, each run's own codes"
        if on == "shared"
        else "run A's images; run B's concepts coded on them by B's model, dictionaries and λ",
        "seed": seed,
        "min_similarity": min_similarity,
        "matching": "Hungarian assignment on the Pearson correlation of the codes over shared images and positions",
        "chance": "the same matching with run B's images shifted by one (no correspondence); "
        "a counterpart's correlation exceeds that matching's 95th percentile and min_similarity",
        "layers": layers,
    }


def _write_comparison(result: dict, access_a: RunAccess, access_b: RunAccess, out: Path, page: bool) -> None:
    """``out/compare.json``, and with ``page`` the offline page ``out/index.html``."""
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "compare.json", result)
    if page:
        from .report.compare_page import write_compare_page

        write_compare_page(result, access_a, access_b, out)
