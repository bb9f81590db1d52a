"""Stage 6 — dataset-wide causal concept graphs from the per-image GIG walks.

Weights are in one unit at every layer: the fraction of an image's class-logit change ``Δz``
that flows through a node or an edge. A top-layer concept's importance is ``GIG_class[q] / Δz``;
the edge from lower concept ``q`` to upper concept ``t`` carries ``I[t] · GIG_t[q] / Δg_t``,
``t``'s importance times the share of ``t``'s readout change ``Δg_t`` that ``q`` accounts for,
and a lower concept's importance is the sum of its outgoing edges. So weights compose along
paths (the edges into a node add up to its importance, up to the completeness residual), and
are comparable across layers and images. A graph over several images averages the per-image
weights (0 where an image did not reach the node or edge). ``edge_weights`` also computes two
alternative definitions; every graph records how many of its shown edges they would keep
(``edge_rule_agreement``). Kinds: ``class`` (images whose target is one class), ``shared`` (several
classes; concepts in the top-k of two or more of them are marked shared), ``global`` (all images,
one "target logit" node on top), ``image`` (one image).

JSON schema ``gig.graph/1`` (see docs/graph-schema.md)::

    {"schema": "gig.graph/1", "kind": ..., "model": ..., "layers": [bottom..top],
     "classes": [{"index": c, "name": ...}], "image_ids": [...], "n_images": n,
     "nodes": [{"id": "_blocks.15:12", "layer": "_blocks.15", "level": 3, "concept": 12,
                "importance": 0.31, "count": 40, "top_classes": [[c, n], ...],
                "exemplars": [sample indices], "shared": false, "in_top_of": [c, ...],
                "position": slot in its row (see node_rows)},
               {"id": "class:281", "layer": "classifier", "level": 4, "class": 281,
                "name": "tabby", "importance": 1.0}],
     "edges": [{"source": lower node id, "target": upper node id, "weight": share}]}
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from .artefacts import (  # noqa: F401  (readers re-exported: moved to gig.artefacts)
    GLOBAL_GRAPH,
    RUN_SUMS,
    SHARED_GRAPH,
    RunSums,
    attribute_key,
    class_figure_stem,
    class_graph_path,
    graph_index,
    graph_index_path,
    graph_path,
    iter_attributions,
    load_concept_cards,
    load_images,
    load_run_sums,
    run_sums_path,
    run_targets,
)
from .errors import ConfigError
from .method import flow, safe_denominator
from .models import class_name
from .store import RunStore, save_json, save_tensors

SCHEMA = "gig.graph/1"


#: Edge-weight definitions: ``flow`` (the default, see above); ``share`` (``GIG_t[q] / Δg_t`` alone,
#: the definition before flows: unbounded where ``Δg_t`` is small); ``flow-l1`` (``I[t] ·
#: GIG_t[q] / Σ_q' |GIG_t[q']|``: bounded by ``|I[t]|``, equal to ``flow`` when no attribution of
#: the path cancels another).
EDGE_RULES = ("flow", "share", "flow-l1")


#: The attribution fields of a graph's two passes (:func:`gig.attribution.iter_attributions`):
#: node importances first, then the edges among the nodes they keep; never the maps.
SCORE_FIELDS = ("score", "class_null", "class_delta")
EDGE_FIELDS = ("score", "gig", "delta", "importance", "targets", "null")

#: The false discovery rate at which the edges of a graph are called significant (Benjamini–Hochberg).
FDR = 0.05


def edge_sums(
    data: dict[str, torch.Tensor],
    rows: torch.Tensor,
    layers: list[str],
    rule: str = "flow",
    upper_ids: dict[str, list[int]] | None = None,
    lower_ids: dict[str, list[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Summed edge weights over the images ``rows``: ``{lower: (K_upper, K_lower)}``; an image adds
    0 to edges into targets it did not reach. ``upper_ids[lower]`` / ``lower_ids[lower]`` keep only
    those upper (rows) / lower (columns) concepts, in that order, so that a graph's sums hold its
    kept nodes' edges, not ``K_upper × K_lower`` (704 MB a transition for ResNet-50 at K = 8C).
    Never materialises ``(images, K_upper, K_lower)``."""
    return edge_power_sums(data, rows, layers, rule, upper_ids, lower_ids, (1,))[0]


def edge_power_sums(
    data: dict[str, torch.Tensor],
    rows: torch.Tensor,
    layers: list[str],
    rule: str,
    upper_ids: dict[str, list[int]] | None,
    lower_ids: dict[str, list[int]] | None,
    powers: tuple[int, ...],
) -> list[dict[str, torch.Tensor]]:
    """:func:`edge_sums` of the edge weights raised to each of ``powers`` (1: the sums, 2: the
    sums of squares, for intervals), from one pass: an image reaches each upper concept at most
    once, so its row is its own edge weights."""
    if rule not in EDGE_RULES:
        raise ConfigError(f"unknown edge rule {rule!r}: use one of {', '.join(EDGE_RULES)}")
    out: list[dict[str, torch.Tensor]] = [{} for _ in powers]
    for position, lower in enumerate(layers[:-1]):
        transition = _Transition(data, rows, layers, position, upper_ids, lower_ids, with_l1=rule == "flow-l1")
        flat = transition.weights(rule)
        for totals, power in zip(out, powers):
            totals[lower] = transition.sums(flat if power == 1 else flat**power)
    return out


class _Transition:
    """The rows of one transition's attributions that a group of images and a graph's kept nodes
    select: one row per (image, upper target) kept, columns the kept lower concepts. Each edge
    rule's per-row weights are computed from it (:meth:`weights`), so a pass reads and filters
    the attributions once for every rule, the intervals and the null test."""

    def __init__(
        self,
        data: dict[str, torch.Tensor],
        rows: torch.Tensor,
        layers: list[str],
        position: int,
        upper_ids: dict[str, list[int]] | None,
        lower_ids: dict[str, list[int]] | None,
        with_l1: bool = True,
    ):
        lower, upper = layers[position], layers[position + 1]
        gig = data[f"{lower}/gig"][rows].flatten(0, 1)  # (n·k, K_lo)
        # flow-l1 normalises by every lower concept's attribution, before the columns are kept
        self.l1 = gig.abs().sum(-1) if with_l1 else None
        self.delta = data[f"{lower}/delta"][rows].flatten()
        self.importance = data[f"{upper}/importance"][rows].flatten()
        self.null = data[f"{lower}/null"][rows].flatten() if f"{lower}/null" in data else None
        self.targets = data[f"{lower}/targets"][rows].flatten()
        if lower_ids and lower in lower_ids:
            gig = gig[:, torch.tensor(lower_ids[lower], dtype=torch.long)]
        self.n_upper = data[f"{upper}/score"].shape[1]
        if upper_ids and lower in upper_ids:  # upper concept id -> its slot, -1 where not kept
            slot = torch.full((self.n_upper,), -1, dtype=torch.long)
            slot[torch.tensor(upper_ids[lower], dtype=torch.long)] = torch.arange(len(upper_ids[lower]))
            kept = slot[self.targets] >= 0
            self.targets, gig = slot[self.targets][kept], gig[kept]
            self.delta, self.importance = self.delta[kept], self.importance[kept]
            self.l1 = None if self.l1 is None else self.l1[kept]
            self.null = None if self.null is None else self.null[kept]
            self.n_upper = len(upper_ids[lower])
        self.gig = gig

    def weights(self, rule: str) -> torch.Tensor:
        """``(R, K_lo kept)``: each row's edge weights under ``rule`` (see :data:`EDGE_RULES`)."""
        if rule == "flow":  # the walk's own rule (gig.method.flow)
            return flow(self.gig, self.delta, self.importance)
        if rule == "share":
            return self.gig / safe_denominator(self.delta)[..., None]
        return self.importance[..., None] * (self.gig / self.l1.clamp_min(1e-12)[..., None])

    def null_weights(self) -> torch.Tensor | None:
        """``(R,)``: the flow of the random directions' mean attribution (None: the run has none)."""
        return None if self.null is None else flow(self.null[..., None], self.delta, self.importance)[:, 0]

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        """``values (R, L)`` summed into their upper slots: ``(n_upper, L)``."""
        return torch.zeros(self.n_upper, values.shape[1]).index_add_(0, self.targets, values)


def edge_weights(
    data: dict[str, torch.Tensor], rows: torch.Tensor, layers: list[str], rule: str = "flow"
) -> dict[str, torch.Tensor]:
    """Mean edge weights over the images ``rows``: ``{lower: (K_upper, K_lower)}`` (:func:`edge_sums`
    over the number of images)."""
    return {lower: total / max(len(rows), 1) for lower, total in edge_sums(data, rows, layers, rule).items()}


def _add_into(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value.clone()


#: Poisson-bootstrap resamples of the images behind every node's selection frequency.
BOOTSTRAP = 200


def poisson_weights(image_ids: torch.Tensor, resamples: int = BOOTSTRAP) -> torch.Tensor:
    """``(n, resamples)`` Poisson(1) weights of the images ``image_ids (n,)``: each image's own
    draws, seeded by its id, so a resample does not depend on how the images are sharded or
    ordered (the online bootstrap: a weight is how often the image is drawn)."""
    if len(image_ids) == 0:
        return torch.empty(0, resamples)
    return torch.stack([_image_poisson(int(i), resamples) for i in image_ids.tolist()])


@functools.lru_cache(maxsize=4096)
def _image_poisson(image_id: int, resamples: int) -> torch.Tensor:
    """One image's Poisson(1) draws; cached, as an image is in several groups of one graph pass
    (its class's, the global graph's)."""
    g = torch.Generator().manual_seed(0x9E3779B1 + image_id)
    return torch.poisson(torch.ones(resamples), generator=g)


def mean_interval(total: torch.Tensor, squares: torch.Tensor, n: int, level: float = 0.95) -> dict[str, torch.Tensor]:
    """The mean over ``n`` images of values whose sum is ``total`` and sum of squares ``squares``
    (same shape), its standard error and its ``level`` t-interval: ``{"mean", "se", "lo", "hi"}``
    (``se``, ``lo``, ``hi`` NaN where ``n < 2``)."""
    from scipy.special import stdtrit  # Student's t quantile: scipy.stats.t.ppf without importing scipy.stats

    mean = total / max(n, 1)
    if n < 2:
        nan = torch.full_like(mean, float("nan"))
        return {"mean": mean, "se": nan, "lo": nan, "hi": nan}
    variance = ((squares - n * mean**2) / (n - 1)).clamp_min(0.0)
    se = (variance / n).sqrt()
    half = float(stdtrit(n - 1, 0.5 + level / 2)) * se
    return {"mean": mean, "se": se, "lo": mean - half, "hi": mean + half}


def paired_test(sum_d: torch.Tensor, sq_d: torch.Tensor, n: int) -> torch.Tensor:
    """Two-sided p-values of the paired t-test that the mean over ``n`` images of differences
    ``d`` (sums ``sum_d``, sums of squares ``sq_d``, same shape) is 0; NaN where ``n < 2``. A
    difference that is the same on every image has p = 0 (or 1 where it is 0)."""
    from scipy.special import stdtr  # Student's t distribution function: t.sf(x) = stdtr(df, -x)

    if n < 2:
        return torch.full_like(sum_d, float("nan"), dtype=torch.float64)
    sum_d, sq_d = sum_d.double(), sq_d.double()
    mean = sum_d / n
    variance = ((sq_d - n * mean**2) / (n - 1)).clamp_min(0.0)
    se = (variance / n).sqrt()
    # Cancellation in sq − n·mean² leaves ~1e-7 of the squares where the differences are all equal.
    constant = se <= 1e-6 * (sq_d / n).sqrt().clamp_min(1e-300)
    stat = mean.abs() / torch.where(constant, torch.ones_like(se), se)
    p = torch.from_numpy(2 * stdtr(n - 1, -stat.numpy()))
    return torch.where(constant, (mean.abs() <= 1e-12).double(), p)


class NullSums:
    """The sums behind each edge's test against random directions (flow rule), per group of
    images: ``cross`` ``Σ_i w_i ζ_i`` per edge, ``total`` ``Σ_i ζ_i`` and ``squares`` ``Σ_i ζ_i²``
    per target, where ``w_i`` is the edge's weight on image ``i`` and ``ζ_i`` the mean weight of
    the image's edges from random directions into the same target (0 where the image did not
    reach it). The paired differences ``w_i − ζ_i`` then have ``Σ = Σw − Σζ`` and
    ``Σ² = Σw² − 2 Σwζ + Σζ²``."""

    def __init__(self):
        self.cross: dict = {}
        self.total: dict = {}
        self.squares: dict = {}

    def add(self, key, weights: torch.Tensor, zeta: torch.Tensor, targets: torch.Tensor | None, n_upper: int) -> None:
        """``weights (R, L)``, ``zeta (R,)``, rows summed into their ``targets (R,)`` slot among
        ``n_upper`` (``targets`` None: one target, rows are images)."""
        if targets is None:
            _add_into(self.cross, key, zeta @ weights)
            _add_into(self.total, key, zeta.sum())
            _add_into(self.squares, key, (zeta**2).sum())
            return
        _add_into(
            self.cross, key, torch.zeros(n_upper, weights.shape[1]).index_add_(0, targets, weights * zeta[:, None])
        )
        _add_into(self.total, key, torch.zeros(n_upper).index_add_(0, targets, zeta))
        _add_into(self.squares, key, torch.zeros(n_upper).index_add_(0, targets, zeta**2))

    def merge(self, other: "NullSums") -> None:
        for name in ("cross", "total", "squares"):
            for key, value in getattr(other, name).items():
                _add_into(getattr(self, name), key, value)

    def tests(self, key, total_w: torch.Tensor, squares_w: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
        """``{"p": p-values, "null": mean random-direction weights}`` of the edges whose weight
        sums and sums of squares are ``total_w`` and ``squares_w`` (``(U, L)``, or ``(L,)`` for one
        target), or ``{}`` where no random directions were attributed."""
        if key not in self.cross:
            return {}
        z, zz = self.total[key], self.squares[key]
        if total_w.dim() == 2:
            z, zz = z[:, None], zz[:, None]
        sum_d = total_w.double() - z.double()
        sq_d = squares_w.double() - 2 * self.cross[key].double() + zz.double()
        return {"p": paired_test(sum_d, sq_d, n), "null": (z / max(n, 1)).expand_as(total_w)}


class ScoreSums:
    """Node-importance sums of one group of images (a class, all images, one image), added shard
    by shard: per layer ``(K,)`` sums and sums of squares (for intervals), and ``(BOOTSTRAP, K)``
    Poisson-weighted sums (for how often a node stays in the top-k), never the images' attributions."""

    def __init__(self, layers: list[str]):
        self.layers = layers
        self.n = 0
        self.image_ids: list[int] = []
        self.score_sums: dict[str, torch.Tensor] = {}
        self.square_sums: dict[str, torch.Tensor] = {}
        self.boot_sums: dict[str, torch.Tensor] = {}
        self.boot_n = torch.zeros(BOOTSTRAP)
        self.null = NullSums()  # the top concepts' edges into the class, against random directions

    def add(self, data: dict[str, torch.Tensor], rows: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        self.n += int(rows.numel())
        ids = data["image_id"][rows]
        self.image_ids += [int(i) for i in ids]
        weights = poisson_weights(ids).T  # (B, n)
        self.boot_n += weights.sum(1)
        for layer in self.layers:
            scores = data[f"{layer}/score"][rows].float()
            _add_into(self.score_sums, layer, scores.sum(0))
            _add_into(self.square_sums, layer, (scores**2).sum(0))
            _add_into(self.boot_sums, layer, weights @ scores)
        top = self.layers[-1]
        if f"{top}/class_null" in data:  # the class edge of concept q weighs its importance, GIG[q] / Δz
            zeta = data[f"{top}/class_null"][rows].float() / safe_denominator(data[f"{top}/class_delta"][rows].float())
            self.null.add(top, data[f"{top}/score"][rows].float(), zeta, None, 0)

    @classmethod
    def merged(cls, groups: list["ScoreSums"]) -> "ScoreSums":
        out = cls(groups[0].layers)
        for g in groups:
            out.n += g.n
            out.image_ids += g.image_ids
            out.boot_n += g.boot_n
            out.null.merge(g.null)
            for name in ("score_sums", "square_sums", "boot_sums"):
                for layer, v in getattr(g, name).items():
                    _add_into(getattr(out, name), layer, v)
        out.image_ids.sort()
        return out

    def scores(self) -> dict[str, torch.Tensor]:
        """Mean node importances ``{layer: (K,)}``."""
        return {layer: v / max(self.n, 1) for layer, v in self.score_sums.items()}

    def intervals(self, layer: str) -> dict[str, torch.Tensor]:
        """The layer's mean importances with standard errors and 95 % intervals (:func:`mean_interval`)."""
        return mean_interval(self.score_sums[layer], self.square_sums[layer], self.n)

    def class_edge_tests(self) -> dict[str, torch.Tensor]:
        """The top layer's edges into the class (weight = importance) against random directions:
        ``{"p", "null"}`` each ``(K,)``, or ``{}`` (see :meth:`NullSums.tests`)."""
        top = self.layers[-1]
        return self.null.tests(top, self.score_sums[top], self.square_sums[top], self.n)

    def selection_frequency(self, layer: str, top_k: int) -> torch.Tensor:
        """``(K,)``: the share of bootstrap resamples of the images in which each concept is among
        the layer's ``top_k`` by mean importance."""
        means = self.boot_sums[layer] / self.boot_n.clamp_min(1e-12)[:, None]  # (B, K)
        top = means.topk(min(top_k, means.shape[1]), dim=1).indices
        counts = torch.zeros(means.shape[1]).index_add_(0, top.flatten(), torch.ones(top.numel()))
        return counts / means.shape[0]


class EdgeSums:
    """Edge-weight sums of one group of images under each of ``rules``, restricted to the upper
    and lower concepts named (see :func:`edge_sums`), added shard by shard."""

    def __init__(
        self,
        layers: list[str],
        rules: tuple[str, ...] = EDGE_RULES,
        upper_ids: dict[str, list[int]] | None = None,
        lower_ids: dict[str, list[int]] | None = None,
    ):
        self.layers, self.rules, self.upper_ids, self.lower_ids = layers, rules, upper_ids, lower_ids
        self.n = 0
        self.totals: dict[str, dict[str, torch.Tensor]] = {rule: {} for rule in rules}
        self.squares: dict[str, torch.Tensor] = {}  # the flow rule's, for intervals
        self.null = NullSums()  # the flow rule's, for the tests against random directions

    def add(self, data: dict[str, torch.Tensor], rows: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        self.n += int(rows.numel())
        for position, lower in enumerate(self.layers[:-1]):
            # one selection of the rows for every rule, the intervals and the null test
            transition = _Transition(
                data, rows, self.layers, position, self.upper_ids, self.lower_ids, with_l1="flow-l1" in self.rules
            )
            flows = transition.weights("flow")
            for rule in self.rules:
                _add_into(
                    self.totals[rule], lower, transition.sums(flows if rule == "flow" else transition.weights(rule))
                )
            _add_into(self.squares, lower, transition.sums(flows**2))  # the flow rule's, for intervals
            zeta = transition.null_weights()
            if zeta is not None:
                self.null.add(lower, flows, zeta, transition.targets, transition.n_upper)

    def edges(self, rule: str = "flow") -> dict[str, torch.Tensor]:
        """Mean edge weights ``{lower: (upper kept, lower kept)}`` under ``rule``."""
        return {lower: v / max(self.n, 1) for lower, v in self.totals[rule].items()}

    def intervals(self, lower: str) -> dict[str, torch.Tensor]:
        """The ``flow`` edges out of ``lower``: means, standard errors and 95 % intervals over the
        images (:func:`mean_interval`), each ``(upper kept, lower kept)``."""
        return mean_interval(self.totals["flow"][lower], self.squares[lower], self.n)

    def tests(self, lower: str) -> dict[str, torch.Tensor]:
        """The ``flow`` edges out of ``lower`` against random directions: ``{"p", "null"}`` each
        ``(upper kept, lower kept)``, or ``{}`` where the run attributed none."""
        return self.null.tests(lower, self.totals["flow"][lower], self.squares[lower], self.n)


def _rows(selection: tuple, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The rows of one part that ``selection`` picks: ``("classes", {c, ...})``, ``("image", id)``
    or ``("all", None)``."""
    kind, value = selection
    if kind == "all":
        return torch.arange(len(ids))
    if kind == "image":
        return (ids == value).nonzero().flatten()
    return torch.isin(targets, torch.tensor(sorted(value), dtype=torch.long)).nonzero().flatten()


def accumulate(parts: Iterable[dict[str, torch.Tensor]], sums: dict, selections: dict, targets: dict[int, int]) -> dict:
    """One pass over the attribution ``parts`` (shards, or a walk's output): every ``sums[key]``
    (:class:`ScoreSums` or :class:`EdgeSums`) adds the rows that ``selections[key]`` picks."""
    for part in parts:
        ids = part["image_id"]
        part_targets = torch.tensor([targets[int(i)] for i in ids], dtype=torch.long)
        for key, selection in selections.items():
            sums[key].add(part, _rows(selection, ids, part_targets))
    return sums


def _shown_edges(
    kept: dict[str, list[int]], edges: dict[str, torch.Tensor], layers: list[str], edges_per_node: int
) -> list[tuple[str, int, int, float]]:
    """The ``edges_per_node`` strongest non-zero edges into every kept upper node:
    ``(lower layer, lower concept, upper concept, weight)``. ``edges[lower]`` is
    ``(len(kept[upper]), len(kept[lower]))`` in the kept lists' order."""
    shown = []
    for position, lower in enumerate(layers[:-1]):
        upper = layers[position + 1]
        for row, t in enumerate(kept[upper]):
            weights = edges[lower][row]
            ranked = sorted(range(len(kept[lower])), key=lambda j: -float(weights[j]))[:edges_per_node]
            shown += [(lower, kept[lower][j], t, float(weights[j])) for j in ranked if float(weights[j]) != 0.0]
    return shown


def rule_agreement(
    edges: EdgeSums, layers: list[str], kept: dict[str, list[int]], edges_per_node: int
) -> dict[str, float]:
    """For each alternative edge rule: the fraction of the shown ``flow`` edges it would show too
    (same nodes, same pruning); 1.0 means the picture does not depend on the choice."""
    base = {(l, q, t) for l, q, t, _ in _shown_edges(kept, edges.edges(), layers, edges_per_node)}
    out = {}
    for rule in EDGE_RULES[1:]:
        other = {(l, q, t) for l, q, t, _ in _shown_edges(kept, edges.edges(rule), layers, edges_per_node)}
        out[rule] = len(base & other) / len(base) if base else 1.0
    return out


def _groups(kind: str, value) -> dict:
    """The image groups whose importances a graph reads (one per class, else one), keyed by
    class, ``"all"`` or ``("image", id)``; ``value``: the graph's classes, or its image id."""
    if kind == "image":
        return {("image", value): ("image", value)}
    if kind == "global":
        return {"all": ("all", None)}
    if kind in ("class", "shared"):
        if not value:
            raise ConfigError(f"a {kind} graph needs at least one class")
        return {c: ("classes", {c}) for c in value}
    raise ConfigError(f"unknown graph kind {kind!r}: class, shared, global or image")


def _shared_tops(per_class: dict[int, ScoreSums], layers: list[str], top_k: int) -> dict[tuple[str, int], list[int]]:
    """``{(layer, concept): [classes whose own top-k holds it]}`` (for shared graphs)."""
    in_top_of: dict[tuple[str, int], list[int]] = {}
    for c, group in per_class.items():
        class_scores = group.scores()
        for layer in layers:
            for q in class_scores[layer].topk(min(top_k, class_scores[layer].numel())).indices.tolist():
                in_top_of.setdefault((layer, q), []).append(c)
    return in_top_of


def _concept_nodes(
    store: RunStore,
    scores: dict[str, torch.Tensor],
    in_top_of: dict,
    top_k: int,
    shared_kind: bool,
    cards_of: dict[str, list[dict]] | None = None,
) -> tuple[dict[str, list[int]], list[dict]]:
    """The kept concepts per layer (top-k by mean importance, plus every shared one in a shared
    graph) and their nodes. ``cards_of``: the layers' concept cards read so far, shared by the
    graphs of one build (each layer's file is read and verified once), filled as needed."""
    kept: dict[str, list[int]] = {}
    nodes: list[dict] = []
    cards_of = {} if cards_of is None else cards_of
    for level, layer in enumerate(store.config.layers):
        if layer not in cards_of:
            cards_of[layer] = load_concept_cards(store, layer)["concepts"]
        cards = cards_of[layer]
        chosen = scores[layer].topk(min(top_k, scores[layer].numel())).indices.tolist()
        if shared_kind:  # every concept shared by two or more classes is kept too
            chosen += [q for (l, q), cs in in_top_of.items() if l == layer and len(cs) > 1 and q not in chosen]
        kept[layer] = chosen
        nodes += [
            {
                "id": f"{layer}:{q}",
                "layer": layer,
                "level": level,
                "concept": q,
                "importance": float(scores[layer][q]),
                "count": cards[q]["count"],
                "top_classes": cards[q]["top_classes"],
                "exemplars": cards[q]["exemplars"],
                "shared": len(in_top_of.get((layer, q), [])) > 1,
                "in_top_of": in_top_of.get((layer, q), []),
            }
            for q in chosen
        ]
    return kept, nodes


def _head(
    per_class: dict[int, ScoreSums],
    kept_top: list[int],
    top_layer: str,
    scores_top: torch.Tensor,
    names: list[str],
    edges_per_node: int,
    global_kind: bool,
) -> tuple[list[dict], list[dict]]:
    """The classifier row (one node per class, or one "target logit" node) and its edges."""
    top_ids = [f"{top_layer}:{q}" for q in kept_top]
    if global_kind:
        head = [
            {
                "id": "logit",
                "layer": "classifier",
                "level": None,
                "class": None,
                "name": "target logit",
                "importance": 1.0,
            }
        ]
        return head, [
            {"source": s, "target": "logit", "weight": float(scores_top[q])} for s, q in zip(top_ids, kept_top)
        ]
    head, edges = [], []
    for c, group in per_class.items():
        class_score = group.scores()[top_layer]
        head.append(
            {
                "id": f"class:{c}",
                "layer": "classifier",
                "level": None,
                "class": c,
                "name": class_name(names, c),
                "importance": 1.0,
                "n_images": group.n,
            }
        )
        ranked = sorted(kept_top, key=lambda q: -float(class_score[q]))[:edges_per_node]
        interval, tests = group.intervals(top_layer), group.class_edge_tests()
        edges += [
            {
                "source": f"{top_layer}:{q}",
                "target": f"class:{c}",
                "weight": float(class_score[q]),
                **interval_fields(interval, q),
                **test_fields(tests, q),
            }
            for q in ranked
        ]
    return head, edges


def interval_fields(interval: dict[str, torch.Tensor], index) -> dict:
    """A node's or an edge's ``se`` and 95 % interval ``ci`` ([low, high]) from
    :func:`mean_interval`'s tensors at ``index``; ``None`` both where its graph has one image."""
    se = float(interval["se"][index])
    if se != se:  # NaN: one image
        return {"se": None, "ci": None}
    return {"se": se, "ci": [float(interval["lo"][index]), float(interval["hi"][index])]}


def test_fields(tests: dict[str, torch.Tensor], index) -> dict:
    """An edge's ``p_value`` against random directions and the mean weight of those directions'
    edges into its target, ``null_weight`` (:meth:`NullSums.tests`); ``{}`` where the run has no
    random directions, ``None`` both where the graph has one image."""
    if not tests:
        return {}
    p = float(tests["p"][index])
    if p != p:  # NaN: one image
        return {"p_value": None, "null_weight": None}
    return {"p_value": p, "null_weight": float(tests["null"][index])}


def bh_adjusted(p_values: list[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values ``(m,)`` of ``p_values`` in their order: the
    ``i``-th smallest p times ``m / i``, made monotone from the largest down, clipped to 1; the
    numbers of ``scipy.stats.false_discovery_control(p, method="bh")`` (tested), without
    importing ``scipy.stats`` (half a second in every process that builds a graph)."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.size <= 1:
        return p
    order = np.argsort(p)
    adjusted = p[order] * (p.size / np.arange(1, p.size + 1, dtype=np.float64))
    np.minimum.accumulate(adjusted[::-1], out=adjusted[::-1])
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return np.clip(out, 0.0, 1.0)


def adjust_p_values(edges: list[dict], fdr: float = FDR) -> None:
    """Benjamini–Hochberg over the graph's tested edges (every edge with a ``p_value``): each gets
    ``p_adjusted``, ``significant`` (``p_adjusted ≤ fdr``, two-sided) and ``beats_random``
    (significant, and stronger than the random directions' edge, ``|weight| > |null_weight|``: a
    significant edge can also be reliably weaker than a random direction), in place."""
    tested = [e for e in edges if e.get("p_value") is not None]
    if not tested:
        return
    adjusted = bh_adjusted([e["p_value"] for e in tested])
    for edge, q in zip(tested, adjusted):
        edge["p_adjusted"] = float(q)
        edge["significant"] = bool(q <= fdr)
        edge["beats_random"] = edge["significant"] and abs(edge.get("weight") or 0.0) > abs(
            edge.get("null_weight") or 0.0
        )


def significance(directions: int) -> dict | None:
    """What a graph's ``p_value``, ``p_adjusted`` and ``significant`` are (None: not tested)."""
    if not directions:
        return None
    return {
        "test": "paired t-test over the graph's images of each edge's weight against the mean weight of "
        f"the edges from {directions} random directions of the same layer into the same target, two-sided",
        "random_directions": directions,
        "correction": "Benjamini-Hochberg over the graph's tested edges",
        "fdr": FDR,
    }


#: What a graph's ``se``, ``ci`` and ``selection_frequency`` are (stored in every graph).
INTERVALS = {
    "level": 0.95,
    "ci": "Student-t interval of the mean over the graph's images (each image's weight, 0 where it "
    "did not reach the node or edge); null for a one-image graph",
    "selection_frequency": f"share of {BOOTSTRAP} Poisson-bootstrap resamples of the graph's images in which "
    "the node is among its layer's top_k by mean importance",
}


class GraphPlan:
    """One graph between its two passes: the nodes, chosen from its groups' importances
    (:class:`ScoreSums`: ``{class: sums}`` for a class, shared or image graph, whose one class
    is then the image's target; ``{"all": sums}`` for the global graph), and what the edge pass
    must add (:meth:`edge_sums`, :meth:`selection`); :meth:`finish` turns its edges into the graph."""

    def __init__(
        self,
        store: RunStore,
        kind: str,
        sums: dict,
        top_k: int | None = None,
        edges_per_node: int | None = None,
        class_names: list[str] | None = None,
        image_id: int | None = None,
        cards_of: dict[str, list[dict]] | None = None,
    ):
        config = store.config
        self.store, self.kind, self.layers, self.image_id = store, kind, list(config.layers), image_id
        self.top_k = top_k or config.top_k
        self.edges_per_node = edges_per_node or config.edges_per_node
        self.names = class_names or []
        self.per_class = {} if kind == "global" else sums
        self.group = ScoreSums.merged(list(sums.values()))
        if self.group.n == 0:
            raise ConfigError(f"no image in this run has target class(es) {list(self.per_class)}")
        scores = self.group.scores()
        in_top_of = _shared_tops(self.per_class, self.layers, self.top_k) if kind == "shared" else {}
        self.kept, self.nodes = _concept_nodes(store, scores, in_top_of, self.top_k, kind == "shared", cards_of)
        top = self.layers[-1]
        self.head, self.head_edges = _head(
            self.per_class, self.kept[top], top, scores[top], self.names, self.edges_per_node, kind == "global"
        )
        for node in self.head:
            node["level"] = len(self.layers)
        self._add_node_intervals()

    def _add_node_intervals(self) -> None:
        """Every concept node's ``se`` and ``ci`` and its ``selection_frequency`` (the share of
        bootstrap resamples of the graph's images that keep it in its layer's top-k); in the
        global graph, the top concepts' edges into the logit get the intervals of their importance."""
        intervals = {layer: self.group.intervals(layer) for layer in self.layers}
        frequency = {layer: self.group.selection_frequency(layer, self.top_k) for layer in self.layers}
        for node in self.nodes:
            layer, q = node["layer"], node["concept"]
            node.update(interval_fields(intervals[layer], q), selection_frequency=float(frequency[layer][q]))
        if self.kind == "global":
            top = self.layers[-1]
            tests = self.group.class_edge_tests()
            for edge, q in zip(self.head_edges, self.kept[top]):
                edge.update(interval_fields(intervals[top], q), **test_fields(tests, q))

    def selection(self) -> tuple:
        """The rows of this graph's images (see :func:`accumulate`)."""
        if self.kind == "global":
            return ("all", None)
        if self.kind == "image":
            return ("image", self.image_id)
        return ("classes", set(self.per_class))

    def edge_sums(self) -> EdgeSums:
        """Empty sums over the kept nodes' edges (every rule, for the rule agreement)."""
        pairs = list(zip(self.layers[:-1], self.layers[1:]))
        return EdgeSums(
            self.layers,
            EDGE_RULES,
            upper_ids={lo: self.kept[up] for lo, up in pairs},
            lower_ids={lo: self.kept[lo] for lo, _ in pairs},
        )

    def finish(self, edges: EdgeSums) -> dict:
        layers = self.layers
        intervals = {lower: edges.intervals(lower) for lower in layers[:-1]}
        tests = {lower: edges.tests(lower) for lower in layers[:-1]}
        out_edges = self.head_edges + [
            {
                "source": f"{lower}:{q}",
                "target": f"{upper}:{t}",
                "weight": w,
                **interval_fields(intervals[lower], where),
                **test_fields(tests[lower], where),
            }
            for lower, q, t, w in _shown_edges(self.kept, edges.edges(), layers, self.edges_per_node)
            for upper in [layers[layers.index(lower) + 1]]
            for where in [(self.kept[upper].index(t), self.kept[lower].index(q))]
        ]
        adjust_p_values(out_edges)
        tested = any("p_value" in e for e in out_edges)
        return with_positions(
            {
                "schema": SCHEMA,
                "kind": self.kind,
                "model": self.store.config.model,
                "layers": layers,
                "classes": [{"index": c, "name": class_name(self.names, c)} for c in self.per_class],
                "image_ids": self.group.image_ids,
                "n_images": self.group.n,
                "top_k": self.top_k,
                "edges_per_node": self.edges_per_node,
                "edge_rule": "flow",
                "edge_rule_agreement": rule_agreement(edges, layers, self.kept, self.edges_per_node),
                "intervals": INTERVALS,
                "significance": significance(self.store.config.null_directions) if tested else None,
                "nodes": self.nodes + self.head,
                "edges": out_edges,
            }
        )


def build_graph(
    store: RunStore,
    kind: str = "class",
    classes: list[int] | None = None,
    image_id: int | None = None,
    top_k: int | None = None,
    edges_per_node: int | None = None,
    class_names: list[str] | None = None,
    data: dict[str, torch.Tensor] | None = None,
    targets: dict[int, int] | None = None,
) -> dict:
    """Build one graph as a JSON-able dict (see the module docstring for the schema).

    ``data``: attributions if already loaded (:func:`load_attributions`), or the walk of images
    that are not the run's (:func:`gig.explain.explain`), whose target classes ``targets``
    (``{image id: class}``) then gives; by default the targets are the run's (collect stage) and
    the attributions are read shard by shard in two passes (importances, then the kept nodes'
    edges), only the graph's images and never the maps."""
    spec = (kind, image_id if kind == "image" else classes)
    return build_graph_set(
        store, {"graph": spec}, class_names, top_k=top_k, edges_per_node=edges_per_node, data=data, targets=targets
    )["graph"]


def _barycentre_rows(graph: dict) -> dict[int, list[dict]]:
    """Nodes per level, the top row (classifier) in the JSON's order, every row below ordered by
    the weighted mean slot of the upper nodes it feeds (edge weight as weight), so strong paths
    run straight down; nodes with no edge up go last, by importance."""
    rows: dict[int, list[dict]] = {}
    for node in graph["nodes"]:
        rows.setdefault(int(node["level"]), []).append(node)
    ups: dict[str, list[tuple[str, float]]] = {}
    for edge in graph["edges"]:
        ups.setdefault(edge["source"], []).append((edge["target"], abs(float(edge["weight"] or 0.0))))
    x: dict[str, float] = {}

    def key(node: dict) -> tuple:
        links = [(x[t], w) for t, w in ups.get(node["id"], []) if t in x]
        if not links:
            return (1, -float(node.get("importance") or 0.0))
        total = sum(w for _, w in links)
        centre = sum(px * w for px, w in links) / total if total > 0 else sum(px for px, _ in links) / len(links)
        return (0, centre, -float(node.get("importance") or 0.0))

    for level in sorted(rows, reverse=True):
        if level != max(rows):
            rows[level] = sorted(rows[level], key=key)
        for i, node in enumerate(rows[level]):
            x[node["id"]] = i - (len(rows[level]) - 1) / 2
    return rows


def node_rows(graph: dict) -> dict[int, list[dict]]:
    """``{level: [node, ...]}`` in row order: by the nodes' ``position`` when the graph has them
    (every graph built since gig 0.2), else by the barycentre rule that sets them. The one node
    order of gig: the static figure (:func:`gig.visual.draw_graph`) and the report's viewer
    (``report.js``, which reads ``position``) both follow it."""
    if graph["nodes"] and all("position" in n for n in graph["nodes"]):
        rows: dict[int, list[dict]] = {}
        for node in sorted(graph["nodes"], key=lambda n: n["position"]):
            rows.setdefault(int(node["level"]), []).append(node)
        return rows
    return _barycentre_rows(graph)


def with_positions(graph: dict) -> dict:
    """``graph`` with every node's slot in its row (``position``, 0 = leftmost) set by :func:`node_rows`."""
    slot = {n["id"]: i for nodes in node_rows(graph).values() for i, n in enumerate(nodes)}
    return {**graph, "nodes": [{**n, "position": slot[n["id"]]} for n in graph["nodes"]]}


def default_classes(store: RunStore, n: int = 3) -> list[int]:
    """The configured graph classes, else the ``n`` most frequent target classes of the run."""
    if store.config.graph_classes:
        return list(store.config.graph_classes)
    counts = Counter(i["target"] for i in load_images(store)["images"])
    return [c for c, _ in counts.most_common(n)]


class ImageRows:
    """Fields of a few images collected from the shards while another pass reads them
    (:func:`build_graph_set`'s ``rows_of``): after the pass, :attr:`data` holds ``image_id`` and
    every ``LAYER/FIELD`` of ``fields`` for ``image_ids`` (first axis: those images, in shard order)."""

    def __init__(self, fields: tuple[str, ...], image_ids: list[int]):
        self.fields, self.image_ids = fields, list(image_ids)
        self._parts: list[dict[str, torch.Tensor]] = []

    def keep(self, part: dict) -> dict:
        """``part`` without its ``extra`` rows, which are kept here."""
        if "extra" in part:
            self._parts.append(part.pop("extra"))
        return part

    @property
    def data(self) -> dict[str, torch.Tensor]:
        if not self._parts:
            return {"image_id": torch.zeros(0, dtype=torch.long)}
        return {k: torch.cat([p[k] for p in self._parts]) for k in self._parts[0]}


def build_graph_set(
    store: RunStore,
    specs: dict,
    class_names: list[str] | None = None,
    progress: bool = False,
    top_k: int | None = None,
    edges_per_node: int | None = None,
    data: dict[str, torch.Tensor] | None = None,
    targets: dict[int, int] | None = None,
    rows_of: "ImageRows | None" = None,
) -> dict:
    """Many graphs in the same two passes over the attributions (importances, then the kept
    nodes' edges): ``specs`` is ``{key: (kind, classes)}``, or ``("image", image id)``; the result
    ``{key: graph}``. The attributions are the run's shards, read one at a time and only the
    images the graphs use (no global graph: only their classes' images), or ``data`` with its
    ``targets`` (see :func:`build_graph`). Memory holds one shard and, per class named, the
    ``(K,)`` importance sums and its graph's kept edges. ``rows_of``: other fields of a few
    images read in the edge pass's opening of each shard (:class:`ImageRows`, e.g. the report's
    localisation maps), so that no third pass is needed."""
    layers = list(store.config.layers)
    targets = run_targets(store) if targets is None else targets
    groups: dict = {}
    for kind, value in specs.values():
        groups.update(_groups(kind, value))
    wanted = None  # the images the graphs use (all of them for a global graph)
    if "all" not in groups:
        classes = {key for key in groups if not isinstance(key, tuple)}
        wanted = [i for i, t in targets.items() if t in classes] + [key[1] for key in groups if isinstance(key, tuple)]

    def parts(fields: tuple[str, ...], desc: str, extra: "ImageRows | None" = None) -> Iterable[dict]:
        if data is not None:
            return [data]
        ask = None if extra is None else (extra.fields, extra.image_ids)
        shards = tqdm(iter_attributions(store, fields, wanted, ask), desc=desc, unit="shard", disable=not progress)
        return shards if extra is None else (extra.keep(part) for part in shards)

    sums = accumulate(parts(SCORE_FIELDS, "graph: nodes"), {key: ScoreSums(layers) for key in groups}, groups, targets)
    plans, cards_of = {}, {}
    for key, (kind, value) in specs.items():
        if kind == "image":  # headed by the image's own target class
            if sums[("image", value)].n == 0:
                raise ConfigError(f"image id {value} is not in this run's attributions")
            own = {targets[int(value)]: sums[("image", value)]}
        else:
            own = {"all": sums["all"]} if kind == "global" else {c: sums[c] for c in value}
        plans[key] = GraphPlan(
            store, kind, own, top_k, edges_per_node, class_names, value if kind == "image" else None, cards_of
        )
    edges = accumulate(
        parts(EDGE_FIELDS, "graph: edges", rows_of),
        {key: p.edge_sums() for key, p in plans.items()},
        {key: p.selection() for key, p in plans.items()},
        targets,
    )
    return {key: plan.finish(edges[key]) for key, plan in plans.items()}


def build_graphs(
    store: RunStore, class_names: list[str], progress: bool = True, figure: bool = True, figure_fn=None
) -> None:
    """Stage 6 into ``store/graph``: class graphs, the shared graph, the global graph, an index."""
    store.require("attribute")
    with store.stage("graph") as summary:
        store.stage_dir("graph")
        classes = default_classes(store)
        files = {"class": {}, "shared": None, "global": None}
        specs = {f"class_{c}": ("class", [c]) for c in classes}
        if len(classes) > 1:
            specs["shared"] = ("shared", classes)
        specs["global"] = ("global", None)
        graphs = build_graph_set(store, specs, class_names, progress)
        for c in tqdm(classes, desc="graph: figures", unit="class", disable=not progress):
            graph = graphs[f"class_{c}"]
            path = class_graph_path(store, c)
            save_json(path, graph)
            files["class"][str(c)] = path.name
            if figure and figure_fn is not None:
                figure_fn(store, graph, class_figure_stem(store, c))
        if len(classes) > 1:
            save_json(graph_path(store, SHARED_GRAPH), graphs["shared"])
            files["shared"] = SHARED_GRAPH
        save_json(graph_path(store, GLOBAL_GRAPH), graphs["global"])
        files["global"] = GLOBAL_GRAPH
        save_json(graph_index_path(store), {"classes": classes, "files": files})
        save_run_sums(store, progress)
        summary.update({"classes": classes, "files": files})


# ------------------------------------------------------------------------------ run-wide sums
# The file (:data:`gig.artefacts.RUN_SUMS`), :class:`~gig.artefacts.RunSums` and
# :func:`~gig.artefacts.load_run_sums` live in gig.artefacts (re-exported here).

#: Strongest parents, children and classes kept per concept in :data:`RUN_SUMS` (the cards show 5).
NEIGHBOURS = 5

#: The attribution fields of the run sums' one pass: importances, class shares and edges at once.
RUN_SUM_FIELDS = ("score", "gig", "delta", "importance", "targets")


def _strongest(values: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``values (R, C)``, the ``m`` largest entries: ``(index, weight)`` each ``(R, min(m, C))``."""
    top = values.contiguous().topk(min(m, values.shape[1]), dim=1)
    return top.indices, top.values


#: Most bytes of one transition's edge sums held at once by :func:`run_sums`; a larger
#: ``K_upper × K_lower`` (ResNet-50 at K = 8C: 537 MB) is summed in blocks of upper concepts, one
#: more pass over the shards' edge fields per block.
RUN_SUM_BUDGET = 2**27


def run_sums(
    parts,
    layers: list[str],
    targets: dict[int, int],
    neighbours: int = NEIGHBOURS,
    budget: int = RUN_SUM_BUDGET,
) -> RunSums:
    """:class:`RunSums` from the attribution ``parts`` (the run's shards, fields
    :data:`RUN_SUM_FIELDS`), with the same arithmetic as :class:`ScoreSums` and :class:`EdgeSums`
    over all images. ``parts``: an iterable (one pass), or a function returning a new iterator
    (passes as needed). Memory: one shard, and per transition at most ``budget`` bytes of edge
    sums: a transition whose ``(K_upper, K_lower)`` sums do not fit is summed in blocks of upper
    concepts, one pass each (``parts`` must then be a function), the strongest children of each
    lower concept merged across blocks."""
    passes = parts if callable(parts) else None
    n, score_sums, edge_totals, big, ids = 0, {}, {}, {}, []
    n_classes = max(targets.values(), default=-1) + 1
    class_sums, class_counts = torch.zeros(n_classes, 0), torch.zeros(n_classes)
    for part in passes() if passes else parts:
        rows = torch.arange(int(part["image_id"].numel()))
        if rows.numel() == 0:
            continue
        n += int(rows.numel())
        ids.append(part["image_id"])
        for layer in layers:
            _add_into(score_sums, layer, part[f"{layer}/score"][rows].float().sum(0))
        target_vec = torch.tensor([targets[int(i)] for i in part["image_id"].tolist()], dtype=torch.long)
        top = part[f"{layers[-1]}/score"]  # (images, K_top)
        class_sums = torch.zeros(n_classes, top.shape[1]) if class_sums.shape[1] == 0 else class_sums
        class_sums.index_add_(0, target_vec, top)
        class_counts += torch.bincount(target_vec, minlength=n_classes)
        for position, lower in enumerate(layers[:-1]):
            shape = (part[f"{layers[position + 1]}/score"].shape[1], part[f"{lower}/gig"].shape[2])
            if shape[0] * shape[1] * 4 > budget:
                big[lower] = shape
                continue
            total = _transition_sums(part, rows, layers, position, None)
            if lower in edge_totals:
                edge_totals[lower] += total  # in place: one (K_upper, K_lower) copy held
            else:
                edge_totals[lower] = total
    class_ids = class_counts.nonzero().flatten()
    class_matrix = class_sums[class_ids] / class_counts[class_ids, None]  # (classes, K_top), as RunNeighbours
    index, weight = _strongest(class_matrix.T, neighbours)
    parents, children = {}, {}
    for lower, total in edge_totals.items():
        mean = total / max(n, 1)
        parents[lower] = _strongest(mean, neighbours)
        children[lower] = _strongest(mean.T, neighbours)
    for lower, shape in big.items():
        if passes is None:
            raise ValueError(f"the edge sums out of {lower} {shape} exceed the budget: pass a function for more passes")
        parents[lower], children[lower] = _blocked_neighbours(passes, layers, lower, shape, n, neighbours, budget)
    image_ids = torch.cat(ids).sort().values if ids else torch.zeros(0, dtype=torch.long)
    return RunSums(layers, n, score_sums, class_counts, (class_ids[index], weight), parents, children, image_ids)


def _transition_sums(part, rows, layers, position, upper_ids) -> torch.Tensor:
    """One transition's summed ``flow`` edge weights over ``rows``, ``(upper kept, K_lower)``."""
    transition = _Transition(part, rows, layers, position, upper_ids, None, with_l1=False)
    return transition.sums(transition.weights("flow"))


def _blocked_neighbours(passes, layers, lower, shape, n, neighbours, budget):
    """Strongest parents and children of the transition out of ``lower`` from blocks of upper
    concepts, each block's ``(block, K_lower)`` sums from one pass (see :func:`run_sums`)."""
    n_upper, n_lower = shape
    block = max(1, budget // (4 * n_lower))
    parent_index, parent_weight = [], []
    child_index = torch.zeros(n_lower, 0, dtype=torch.long)
    child_weight = torch.zeros(n_lower, 0)
    for start in range(0, n_upper, block):
        ids = list(range(start, min(start + block, n_upper)))
        total = torch.zeros(len(ids), n_lower)
        for part in passes():
            rows = torch.arange(int(part["image_id"].numel()))
            if rows.numel():
                total += _transition_sums(part, rows, layers, layers.index(lower), {lower: ids})
        mean = total / max(n, 1)
        index, weight = _strongest(mean, neighbours)
        parent_index.append(index)
        parent_weight.append(weight)
        # the children so far and this block's, merged: each lower concept's strongest overall
        index, weight = _strongest(mean.T, neighbours)
        merged_weight = torch.cat([child_weight, weight], 1)
        merged_index = torch.cat([child_index, index + start], 1)
        keep = _strongest(merged_weight, neighbours)[0]
        child_index, child_weight = merged_index.gather(1, keep), merged_weight.gather(1, keep)
    return (torch.cat(parent_index), torch.cat(parent_weight)), (child_index, child_weight)


def save_run_sums(store: RunStore, progress: bool = False) -> RunSums:
    """The graph stage's :class:`RunSums` of every attributed image, in one pass over the
    attribute shards, saved to ``RUN/graph/run_sums.safetensors`` (checksummed, with the
    attribute stage's run they come from)."""
    layers = list(store.config.layers)

    def shards():
        return tqdm(
            iter_attributions(store, RUN_SUM_FIELDS), desc="graph: run sums", unit="shard", disable=not progress
        )

    sums = run_sums(shards, layers, run_targets(store))
    key = torch.frombuffer(bytearray(attribute_key(store).encode()), dtype=torch.uint8)
    save_tensors(run_sums_path(store), {**sums.tensors(), "attribute": key})
    return sums
