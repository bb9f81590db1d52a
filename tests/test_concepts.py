"""Concept extraction: K rule, bisecting k-means state, exemplars, user dictionaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gig.concepts import ConceptExtractor, n_concepts_for, nearest_by_cosine


def test_k_rule():
    assert n_concepts_for(50000, 256) == 2048  # the paper's 8C when data is plentiful
    assert n_concepts_for(300, 256, min_cluster=5) == 60  # capped by N // min_cluster
    assert n_concepts_for(300, 256, max_concepts=10) == 10


def test_bisecting_kmeans_finds_planted_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 10
    X = np.concatenate([c + rng.normal(scale=0.1, size=(30, 6)) for c in centres])
    ext = ConceptExtractor(n_concepts=4).fit(X)
    assert ext.concepts_.shape == (4, 6) and ext.counts_.tolist() == [30] * 4
    # Each found centroid is one planted centre.
    d = np.linalg.norm(ext.concepts_[:, None] - centres[None], axis=2)
    assert np.all(d.min(1) < 0.2)
    # Top-1 exemplar has the highest cosine similarity to its concept among all samples.
    cos = (ext.concepts_ / np.linalg.norm(ext.concepts_, axis=1, keepdims=True)) @ (
        X / np.linalg.norm(X, axis=1, keepdims=True)
    ).T
    np.testing.assert_array_equal(ext.exemplars_[:, 0], cos.argmax(1))
    assert ext.exemplars_.shape == (4, 10)


def test_user_dictionary_channels():
    X = np.abs(np.random.default_rng(1).normal(size=(20, 5)))
    ext = ConceptExtractor().fit_dictionary(X, np.eye(5))
    np.testing.assert_array_equal(ext.labels_, X.argmax(1))
    with pytest.raises(ValueError, match="does not fit"):
        ConceptExtractor().fit_dictionary(X, np.eye(4))


def test_nearest_by_cosine_chunks_agree():
    v, s = torch.randn(9, 4), torch.randn(30, 4)
    a = nearest_by_cosine(v, s, 5, chunk=2)[0]
    b = nearest_by_cosine(v, s, 5, chunk=100)[0]
    assert torch.equal(a, b)
