"""Concept stability (gig.stability): the one-to-one matching against a brute force over every
assignment, a permuted copy matched back exactly, planted clusters found again by every refit,
noise not, and the command on a finished run."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gig.errors import ConfigError
from gig.stability import THRESHOLD, concept_stability, match_concepts, refit_concepts
from gig.store import load_json


def test_matching_is_the_best_one_to_one_assignment_by_brute_force():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(5, 4, generator=g), torch.randn(6, 4, generator=g)
    match, similarity = match_concepts(A, B)
    cosine = torch.nn.functional.normalize(A.double(), dim=1) @ torch.nn.functional.normalize(B.double(), dim=1).T
    best = max(
        itertools.permutations(range(6), 5), key=lambda cols: sum(float(cosine[i, c]) for i, c in enumerate(cols))
    )
    assert match.tolist() == list(best)
    np.testing.assert_allclose(similarity, [float(cosine[i, c]) for i, c in enumerate(best)])
    assert len(set(match.tolist())) == 5  # one to one


def test_a_permuted_scaled_copy_is_matched_back_with_similarity_one():
    V = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    match, similarity = match_concepts(V, 3.0 * V[perm])
    np.testing.assert_array_equal(perm[match].numpy(), np.arange(40))
    np.testing.assert_allclose(similarity, 1.0, atol=1e-12)


def test_planted_clusters_come_back_in_every_refit_and_noise_does_not():
    """Eight well-separated clusters (200 images of 5 points each): every refit on 80 % of the
    images finds their centres again (cosine ≥ 0.99); isotropic noise clustered the same way
    does not (most concepts below the threshold)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16)) * 10
    labels = rng.integers(0, 8, size=1000)
    pfv = centres[labels] + rng.normal(size=(1000, 16)) * 0.3
    ids = np.repeat(np.arange(200), 5)
    run = refit_concepts(pfv, ids, 8, 1.0, seed=0)
    for seed in (1, 2, 3):
        _, similarity = match_concepts(torch.from_numpy(run), torch.from_numpy(refit_concepts(pfv, ids, 8, 0.8, seed)))
        assert similarity.min() >= 0.99
    noise = rng.normal(size=(1000, 16))
    base = refit_concepts(noise, ids, 40, 1.0, seed=0)
    _, similarity = match_concepts(
        torch.from_numpy(base), torch.from_numpy(refit_concepts(noise, ids, 40, 0.8, seed=1))
    )
    assert (similarity >= THRESHOLD).mean() < 0.5


def test_command_writes_the_figures_of_every_layer(tiny_run, tmp_path):
    import shutil

    from gig.cli import app

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    result = CliRunner().invoke(app, ["stability", str(run), "--seeds", "2", "--fraction", "0.75", "--json"])
    assert result.exit_code == 0, result.output
    saved = load_json(run / "stability" / "stability.json")
    assert saved == json.loads(result.stdout)
    for layer, figures in saved["layers"].items():
        assert len(figures["similarity"]) == figures["K"] and len(figures["share_matched_per_refit"]) == 2
        mean = np.mean(figures["similarity_per_refit"], axis=0)
        assert figures["share_matched"] == pytest.approx(float((mean >= saved["threshold"]).mean()), abs=1e-3)
    with pytest.raises(ConfigError, match="fraction"):
        concept_stability(run, fraction=1.5, progress=False)
    bad = CliRunner().invoke(app, ["stability", str(run), "--layer", "nope"])
    assert bad.exit_code == 2 and "not analysed" in bad.output


def test_report_cards_carry_each_concepts_stability(tiny_run, tmp_path):
    """After `gig stability`, the report's concept cards hold each concept's mean matched cosine,
    read from stability.json."""
    import re
    import shutil

    from gig.report import ReportOptions, build_report

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    saved = concept_stability(run, seeds=2, progress=False)
    index = build_report(
        run, tmp_path / "report", ReportOptions(atlas_per_layer=3, n_images=1, max_classes=1), model=tiny_run["bundle"]
    )
    text = index.read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script type="application/json" id="gig-data">(.*?)</script>', text, re.S).group(1))
    cards = data["concepts"]
    assert cards
    for key, card in cards.items():
        layer, q = key.rsplit(":", 1)
        assert card["stability"] == saved["layers"][layer]["similarity"][int(q)]
