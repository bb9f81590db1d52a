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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import BisectingKMeans
from tqdm.auto import tqdm

from .collect import load_samples
from .concepts import load_dictionary
from .errors import ConfigError
from .store import RunStore, load_json, save_json

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


def layer_stability(
    store: RunStore, layer: str, seeds: int, fraction: float, threshold: float = THRESHOLD, base_seed: int = 1
) -> dict:
    """The stability figures of one layer (see the module docstring)."""
    samples = load_samples(store, layer)
    V = load_dictionary(store, layer)
    pfv, image_ids = samples["pfv"].numpy(), samples["image_id"].numpy()
    per_refit = []
    for r in range(seeds):
        # Seeds apart from the run's: the run's seed plus a large odd offset per refit.
        seed = (store.config.seed + 7919 * (base_seed + r)) % 2**32
        _, similarity = match_concepts(V, torch.from_numpy(refit_concepts(pfv, image_ids, V.shape[0], fraction, seed)))
        per_refit.append(similarity)
    sims = np.stack(per_refit)  # (seeds, K)
    mean = sims.mean(0)
    # A reference without cluster structure: the run's concepts matched to K sampled PFVs drawn at
    # random (what a "refit" that only picked data points would give).
    rng = np.random.default_rng(store.config.seed + 7919 * base_seed)
    drawn = pfv[rng.choice(len(pfv), size=min(V.shape[0], len(pfv)), replace=False)]
    _, baseline = match_concepts(V, torch.from_numpy(drawn.astype(np.float32)))
    return {
        "K": int(V.shape[0]),
        "share_matched": float((mean >= threshold).mean()),
        "median_similarity": float(np.median(mean)),
        "baseline_median_similarity": float(np.median(baseline)),
        "baseline_share_matched": float((baseline >= threshold).mean()),
        "share_matched_per_refit": [float((s >= threshold).mean()) for s in sims],
        "similarity": [round(float(s), 4) for s in mean],
        "similarity_per_refit": [[round(float(v), 4) for v in s] for s in sims],
    }


def concept_stability(
    run: str | Path | RunStore,
    seeds: int = 3,
    fraction: float = 0.8,
    threshold: float = THRESHOLD,
    layers: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Refit every (or each named) layer's concepts ``seeds`` times on a ``fraction`` of the
    images and match them to the run's; written to ``RUN/stability/stability.json`` and returned."""
    store = run if isinstance(run, RunStore) else RunStore.open(run)
    store.require("concepts")
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds must be an integer of at least 1, not {seeds!r}")
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must lie in (0, 1], not {fraction!r}")
    if not 0 < threshold <= 1:
        raise ConfigError(f"threshold must lie in (0, 1], not {threshold!r}")
    layers = layers or list(store.config.layers)
    unknown = [layer for layer in layers if layer not in store.config.layers]
    if unknown:
        raise ConfigError(f"layer(s) {', '.join(unknown)} not analysed in this run; its layers: {store.config.layers}")
    result = {
        "seeds": seeds,
        "fraction": fraction,
        "threshold": threshold,
        "matching": "Hungarian assignment on cosine similarity, one to one",
        "layers": {
            layer: layer_stability(store, layer, seeds, fraction, threshold)
            for layer in tqdm(layers, desc="stability", unit="layer", disable=not progress)
        },
    }
    out = store.root / "stability"
    out.mkdir(exist_ok=True)
    save_json(out / "stability.json", result)
    return result


def load_stability(store: RunStore) -> dict | None:
    """``RUN/stability/stability.json`` (:func:`concept_stability`), or None where not measured."""
    path = store.root / "stability" / "stability.json"
    return load_json(path) if path.is_file() else None
