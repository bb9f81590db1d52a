"""Graph weights (gig.graph) on synthetic walks: edge weights against a loop over images for
every rule, the flow identity (edges into a node add up to its importance when attributions are
complete), pruning to the strongest edges, and the agreement of rules."""

from __future__ import annotations

import pytest
import torch

from gig.errors import ConfigError
from gig.graph import EDGE_RULES, EdgeSums, ScoreSums, _shown_edges, accumulate, edge_sums, edge_weights, rule_agreement

LAYERS = ["low", "high"]
N, k, K_LO, K_UP = 5, 2, 6, 4


def _walk(complete: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """One image walk per row: ``k`` distinct upper targets, their importances, and GIG of the
    lower concepts for each target (summing to Δg when ``complete``)."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.stack([torch.randperm(K_UP, generator=g)[:k] for _ in range(N)])
    gig = torch.randn(N, k, K_LO, generator=g)
    delta = gig.sum(-1) if complete else gig.sum(-1) + 0.3 * torch.randn(N, k, generator=g)
    return {
        "low/gig": gig,
        "low/delta": delta,
        "low/targets": targets,
        "high/importance": torch.rand(N, k, generator=g),
        "high/score": torch.rand(N, K_UP, generator=g),
        "low/score": torch.rand(N, K_LO, generator=g),
    }


def _by_loop(data, rows, rule):
    total = torch.zeros(K_UP, K_LO)
    for i in rows.tolist():
        for j in range(k):
            t = int(data["low/targets"][i, j])
            gig = data["low/gig"][i, j]
            if rule == "flow-l1":
                share = gig / gig.abs().sum()
            else:
                share = gig / data["low/delta"][i, j]
            if rule != "share":
                share = share * data["high/importance"][i, j]
            total[t] += share
    return total / len(rows)


@pytest.mark.parametrize("rule", EDGE_RULES)
def test_edge_weights_match_a_loop_over_images(rule):
    data = _walk(complete=False)
    rows = torch.tensor([0, 2, 3, 4])
    got = edge_weights(data, rows, LAYERS, rule)["low"]
    torch.testing.assert_close(got, _by_loop(data, rows, rule))


def test_flow_edges_into_a_node_add_up_to_its_importance():
    data = _walk(complete=True)
    rows = torch.arange(N)
    edges = edge_weights(data, rows, LAYERS)["low"]
    importance = torch.zeros(K_UP)
    importance.index_add_(0, data["low/targets"].flatten(), data["high/importance"].flatten())
    torch.testing.assert_close(edges.sum(1), importance / N)


def test_unknown_rule_is_refused():
    with pytest.raises(ConfigError, match="unknown edge rule"):
        edge_weights(_walk(), torch.arange(N), LAYERS, "mean")


def test_shown_edges_are_the_strongest_into_each_kept_node():
    data = _walk()
    edges = edge_weights(data, torch.arange(N), LAYERS)
    kept = {"low": [4, 0, 1, 2, 3], "high": [2, 0]}
    restricted = {"low": edges["low"][kept["high"]][:, kept["low"]]}
    shown = _shown_edges(kept, restricted, LAYERS, edges_per_node=2)
    for t in kept["high"]:
        into = [(q, w) for _, q, tt, w in shown if tt == t]
        assert len(into) <= 2 and all(q in kept["low"] for q, _ in into)
        best = sorted(kept["low"], key=lambda q: -float(edges["low"][t, q]))[:2]
        assert [q for q, _ in into] == [q for q in best if float(edges["low"][t, q]) != 0.0]
        assert all(w == pytest.approx(float(edges["low"][t, q])) for q, w in into)


@pytest.mark.parametrize("rule", EDGE_RULES)
def test_restricted_edge_sums_are_the_dense_sums_rows_and_columns(rule):
    data = _walk(complete=False)
    rows = torch.tensor([0, 1, 3])
    dense = edge_sums(data, rows, LAYERS, rule)["low"]
    up, lo = [3, 0], [5, 1, 2]
    torch.testing.assert_close(edge_sums(data, rows, LAYERS, rule, {"low": up}, {"low": lo})["low"], dense[up][:, lo])
    torch.testing.assert_close(edge_sums(data, rows, LAYERS, rule, {"low": up})["low"], dense[up])
    torch.testing.assert_close(edge_sums(data, rows, LAYERS, rule, None, {"low": lo})["low"], dense[:, lo])


def test_rule_agreement_is_one_when_the_rules_coincide():
    # Every Δg = 1 and every importance = 1, with non-negative attributions summing to 1: the
    # three rules give the same weights, so they show the same edges.
    data = _walk()
    gig = data["low/gig"].abs()
    data["low/gig"] = gig / gig.sum(-1, keepdim=True)
    data["low/delta"] = torch.ones(N, k)
    data["high/importance"] = torch.ones(N, k)
    kept = {"low": list(range(K_LO)), "high": list(range(K_UP))}
    edges = EdgeSums(LAYERS, upper_ids={"low": kept["high"]}, lower_ids={"low": kept["low"]})
    edges.add(data, torch.arange(N))
    assert rule_agreement(edges, LAYERS, kept, 2) == {rule: 1.0 for rule in EDGE_RULES[1:]}


@pytest.mark.parametrize("rule", EDGE_RULES)
def test_sums_over_shards_equal_the_mean_over_all_images(rule):
    """The graph stage adds shard by shard; per selection of images, the sums over any split of
    the images give the loop's mean over the selected images."""
    data = {**_walk(complete=False), "image_id": torch.arange(10, 10 + N)}
    targets = {10: 7, 11: 3, 12: 7, 13: 7, 14: 3}
    shards = [{key: v[rows] for key, v in data.items()} for rows in (torch.tensor([0, 1]), torch.tensor([2, 3, 4]))]
    selections = {7: ("classes", {7}), "all": ("all", None), "one": ("image", 13), "both": ("classes", {3, 7})}
    scores = accumulate(iter(shards), {key: ScoreSums(LAYERS) for key in selections}, selections, targets)
    edges = accumulate(iter(shards), {key: EdgeSums(LAYERS) for key in selections}, selections, targets)
    for key, rows in (
        (7, torch.tensor([0, 2, 3])),
        ("all", torch.arange(N)),
        ("one", torch.tensor([3])),
        ("both", torch.arange(N)),
    ):
        assert scores[key].n == edges[key].n == len(rows)
        assert sorted(scores[key].image_ids) == [10 + int(r) for r in rows]
        torch.testing.assert_close(edges[key].edges(rule)["low"], _by_loop(data, rows, rule))
        torch.testing.assert_close(scores[key].scores()["high"], data["high/score"][rows].mean(0))
    merged = ScoreSums.merged([scores[7], scores["one"]])
    assert merged.n == 4 and merged.image_ids == [10, 12, 13, 13]


def test_edge_and_node_intervals_match_a_direct_computation_over_the_images():
    """EdgeSums' and ScoreSums' standard errors and 95 % intervals, accumulated over two parts,
    against each image's own weights (one-image edge weights) and scipy's t distribution."""
    import numpy as np
    from scipy import stats

    data = _walk(complete=False, seed=3)
    data["image_id"] = torch.arange(N) + 100
    parts = [{key: v[:2] for key, v in data.items()}, {key: v[2:] for key, v in data.items()}]
    sums = accumulate(
        parts,
        {"e": EdgeSums(LAYERS), "s": ScoreSums(LAYERS)},
        {"e": ("all", None), "s": ("all", None)},
        {100 + i: 0 for i in range(N)},
    )
    per_image = np.stack([edge_weights(data, torch.tensor([i]), LAYERS)["low"].numpy() for i in range(N)])
    mean, se = per_image.mean(0), per_image.std(0, ddof=1) / np.sqrt(N)
    half = stats.t.ppf(0.975, N - 1) * se
    got = sums["e"].intervals("low")
    np.testing.assert_allclose(got["mean"].numpy(), mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["se"].numpy(), se, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["lo"].numpy(), mean - half, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["hi"].numpy(), mean + half, rtol=1e-4, atol=1e-6)
    scores = data["high/score"].numpy()
    node = sums["s"].intervals("high")
    np.testing.assert_allclose(node["se"].numpy(), scores.std(0, ddof=1) / np.sqrt(N), rtol=1e-4)


def test_selection_frequency_matches_an_explicit_bootstrap_loop():
    """The share of resamples keeping a concept in the top-k, against a loop that forms every
    resample's weighted mean importances one at a time from the same per-image Poisson draws."""
    from gig.graph import BOOTSTRAP, poisson_weights

    data = _walk(seed=4)
    data["image_id"] = torch.arange(N) * 7
    group = ScoreSums(LAYERS)
    group.add(data, torch.arange(N))
    weights = poisson_weights(data["image_id"])  # (N, B)
    counts = torch.zeros(K_UP)
    for b in range(BOOTSTRAP):
        w = weights[:, b]
        means = (w[:, None] * data["high/score"]).sum(0) / w.sum()
        for q in means.topk(2).indices.tolist():
            counts[q] += 1
    torch.testing.assert_close(group.selection_frequency("high", 2), counts / BOOTSTRAP)
    # Each image's draws are its own: the same image drawn in another part gives the same weights.
    torch.testing.assert_close(poisson_weights(data["image_id"][3:4]), weights[3:4])


def test_intervals_cover_a_planted_mean_95_percent_of_the_time():
    """Coverage on a planted population: 2 000 edges, each with a known mean, 200 images drawn
    from a zero-inflated exponential (edges are 0 on images that do not reach them); the 95 %
    intervals must cover the truth on 93-97 % of the edges."""
    from gig.graph import mean_interval

    g = torch.Generator().manual_seed(0)
    edges, n = 2000, 200
    scale = torch.rand(edges, generator=g) * 0.1
    reach = 0.2 + 0.6 * torch.rand(edges, generator=g)
    draws = torch.empty(n, edges).exponential_(1.0, generator=g) * scale
    draws = draws * (torch.rand(n, edges, generator=g) < reach)
    truth = reach * scale
    interval = mean_interval(draws.sum(0), (draws**2).sum(0), n)
    covered = ((interval["lo"] <= truth) & (truth <= interval["hi"])).double().mean()
    assert 0.93 <= float(covered) <= 0.97


def test_edge_tests_against_random_directions_match_scipy_paired_t_tests():
    """Each edge's p-value against random directions, accumulated over two parts, equals scipy's
    paired t-test of the images' own edge weights against the mean weight of the random
    directions' edges into the same target on that image (both 0 where the image did not reach
    it); the class edges likewise; Benjamini-Hochberg against its definition."""
    import numpy as np
    from scipy import stats

    from gig.graph import adjust_p_values

    n = 12
    g = torch.Generator().manual_seed(5)
    targets = torch.stack([torch.randperm(K_UP, generator=g)[:k] for _ in range(n)])
    gig = torch.randn(n, k, K_LO, generator=g) + 0.5
    data = {
        "image_id": torch.arange(n) + 40,
        "low/gig": gig,
        "low/delta": gig.sum(-1) + 0.2,
        "low/null": 0.3 * torch.randn(n, k, generator=g),
        "low/targets": targets,
        "high/importance": torch.rand(n, k, generator=g),
        "high/score": torch.rand(n, K_UP, generator=g),
        "high/class_null": 0.1 * torch.randn(n, generator=g),
        "high/class_delta": 1 + torch.rand(n, generator=g),
        "low/score": torch.rand(n, K_LO, generator=g),
    }
    parts = [{key: v[:5] for key, v in data.items()}, {key: v[5:] for key, v in data.items()}]
    sums = accumulate(
        parts,
        {"e": EdgeSums(LAYERS), "s": ScoreSums(LAYERS)},
        {"e": ("all", None), "s": ("all", None)},
        {40 + i: 0 for i in range(n)},
    )
    w = np.zeros((n, K_UP, K_LO))
    zeta = np.zeros((n, K_UP))
    for i in range(n):
        for j in range(k):
            t = int(targets[i, j])
            scale = float(data["high/importance"][i, j] / data["low/delta"][i, j])
            w[i, t] = gig[i, j].numpy() * scale
            zeta[i, t] = float(data["low/null"][i, j]) * scale
    want = stats.ttest_rel(w, np.broadcast_to(zeta[..., None], w.shape), axis=0).pvalue
    got = sums["e"].tests("low")
    np.testing.assert_allclose(got["p"].numpy(), want, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(got["null"].numpy(), np.broadcast_to(zeta.mean(0)[:, None], (K_UP, K_LO)), rtol=1e-5)
    z_class = (data["high/class_null"] / data["high/class_delta"]).numpy()
    want_class = stats.ttest_rel(data["high/score"].numpy(), np.broadcast_to(z_class[:, None], (n, K_UP)), axis=0)
    np.testing.assert_allclose(sums["s"].class_edge_tests()["p"].numpy(), want_class.pvalue, rtol=1e-4, atol=1e-9)
    # Benjamini-Hochberg: q_(i) = min over j >= i of p_(j) · m / j, on the sorted p-values
    p = np.array([0.001, 0.04, 0.03, 0.2, 0.0125, 0.9])
    edges = [{"p_value": float(v)} for v in p] + [{"weight": 1.0}]  # an untested edge stays untouched
    adjust_p_values(edges)
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    q = np.empty_like(p)
    q[order] = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1)
    np.testing.assert_allclose([e["p_adjusted"] for e in edges[:-1]], q)
    assert [e["significant"] for e in edges[:-1]] == list(q <= 0.05) and "p_adjusted" not in edges[-1]
    # stronger than random only where significant and larger in size than the random directions' edge
    strong = {"p_value": 0.0, "weight": -0.2, "null_weight": 0.1}
    weaker = {"p_value": 0.0, "weight": 0.01, "null_weight": 0.1}
    unsure = {"p_value": 0.9, "weight": 0.5, "null_weight": 0.1}
    adjust_p_values([strong, weaker, unsure])
    assert (strong["beats_random"], weaker["beats_random"], unsure["beats_random"]) == (True, False, False)
    assert weaker["significant"] and not unsure["significant"]


def test_bh_and_t_interval_equal_scipy_stats():
    """The graph's own Benjamini-Hochberg and t quantile (scipy.special, so that building a graph
    does not import scipy.stats) give scipy.stats' numbers: ties, one p-value, many; the 95 %
    t-interval of a mean as ``scipy.stats.t.interval``."""
    import numpy as np
    from scipy import stats

    from gig.graph import bh_adjusted, mean_interval

    rng = np.random.default_rng(3)
    for p in ([0.2], [0.5, 0.5, 0.01, 0.01, 0.9], list(rng.uniform(size=400) ** 4)):
        np.testing.assert_array_equal(bh_adjusted(p), stats.false_discovery_control(p, method="bh"))
    x = rng.normal(size=9)
    got = mean_interval(torch.tensor([x.sum()]), torch.tensor([(x**2).sum()]), len(x))
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    np.testing.assert_allclose([float(got["lo"][0]), float(got["hi"][0])], [lo, hi], rtol=1e-5)


def test_edge_tests_hold_their_false_discovery_rate_on_a_planted_population():
    """1 000 edges over 60 images, 800 of them drawn around the random directions' own weight
    (true nulls) and 200 above it: after Benjamini-Hochberg at 5 %, the share of true nulls among
    the edges called significant stays near or below 5 % and most true edges are found."""
    from gig.graph import adjust_p_values, paired_test

    g = torch.Generator().manual_seed(1)
    n, edges, real = 60, 1000, 200
    zeta = 0.01 + 0.01 * torch.rand(n, 1, generator=g)  # the random directions' mean weight per image
    shift = torch.zeros(edges)
    shift[:real] = 0.004 + 0.004 * torch.rand(real, generator=g)
    w = zeta + shift + 0.01 * torch.randn(n, edges, generator=g)
    d = w - zeta
    p = paired_test(d.sum(0), (d**2).sum(0), n)
    found = [{"p_value": float(v)} for v in p]
    adjust_p_values(found)
    called = torch.tensor([e["significant"] for e in found])
    false = float(called[real:].sum()) / max(int(called.sum()), 1)
    assert false <= 0.08, false
    assert float(called[:real].double().mean()) >= 0.5


def test_run_sums_over_shards_match_a_loop_over_images():
    """The graph stage's run sums (what the concept cards read instead of the shards): over any
    split of the images, each concept's mean importance, its strongest parents and children by
    the loop's mean flow weight over all images, and its strongest classes by mean share."""
    from gig.graph import RunSums, run_sums

    data = {**_walk(complete=False), "image_id": torch.arange(10, 10 + N)}
    targets = {10: 7, 11: 3, 12: 7, 13: 7, 14: 3, 15: 9}  # image 15 has no attribution
    shards = [{key: v[rows] for key, v in data.items()} for rows in (torch.tensor([0, 1]), torch.tensor([2, 3, 4]))]
    sums = run_sums(iter(shards), LAYERS, targets, neighbours=3)
    assert sums.n == N and sums.class_ids() == [3, 7]
    for layer in LAYERS:
        torch.testing.assert_close(sums.importance()[layer], data[f"{layer}/score"].mean(0))
    edges = _by_loop(data, torch.arange(N), "flow")  # (K_UP, K_LO)
    for t in range(K_UP):
        index, weight = sums.parents["low"][0][t], sums.parents["low"][1][t]
        assert index.tolist() == sorted(range(K_LO), key=lambda q: -float(edges[t, q]))[:3]
        torch.testing.assert_close(weight, edges[t, index])
    for q in range(K_LO):
        index, weight = sums.children["low"][0][q], sums.children["low"][1][q]
        assert index.tolist() == sorted(range(K_UP), key=lambda t: -float(edges[t, q]))[:3]
        torch.testing.assert_close(weight, edges[index, q])
    share = {c: data["high/score"][[i for i in range(N) if targets[10 + i] == c]].mean(0) for c in (3, 7)}
    for q in range(K_UP):
        best = sorted((3, 7), key=lambda c: -float(share[c][q]))
        assert sums.classes[0][q].tolist() == best
        torch.testing.assert_close(sums.classes[1][q], torch.stack([share[c][q] for c in best]))
    again = RunSums.from_tensors(LAYERS, sums.tensors())  # the file's round trip
    assert again.n == sums.n and torch.equal(again.parents["low"][0], sums.parents["low"][0])


def test_run_sums_in_blocks_of_upper_concepts_equal_the_whole_sums():
    """A transition whose sums exceed the budget is summed in blocks of upper concepts, one pass
    each: the strongest parents and children are those of the whole sums."""
    from gig.graph import run_sums

    data = {**_walk(complete=False, seed=7), "image_id": torch.arange(10, 10 + N)}
    targets = {10 + i: i % 2 for i in range(N)}
    shards = [{key: v[rows] for key, v in data.items()} for rows in (torch.tensor([0, 1]), torch.tensor([2, 3, 4]))]
    whole = run_sums(iter(shards), LAYERS, targets, neighbours=3)
    passes = []
    blocked = run_sums(lambda: passes.append(1) or iter(shards), LAYERS, targets, neighbours=3, budget=4 * K_LO)
    assert len(passes) == 1 + K_UP  # the first pass, then one per block of one upper concept
    for name in ("parents", "children"):
        for got, want in zip(getattr(blocked, name)["low"], getattr(whole, name)["low"]):
            torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="exceed the budget"):
        run_sums(iter(shards), LAYERS, targets, budget=4)
