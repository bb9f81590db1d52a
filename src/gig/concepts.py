"""Stage 3 — concept vectors per layer by bisecting k-means over the sampled PFVs.

``K = min(concepts_per_channel · C, N // min_cluster)`` (the paper's ``8C``, capped so that
clusters keep a few members on small data). A concept vector is a cluster centroid; it is shown
by the sampled PFVs most cosine-similar to it (top-1 and top-10).

A user can hand in their own dictionary for a layer instead (``Dictionary.from_file`` or the
channel basis, ``Dictionary.channels``); members and exemplars are then assigned by cosine.
A layer can also have another basis with its own encoder (``bases``, :mod:`gig.basis`): a sparse
autoencoder or an NMF (non-negative layers) trained here on the same sampled PFVs (``K`` latents
as above), or a user basis file.
Its decoder rows are the layer's concepts (members and exemplars by cosine, as for a user
dictionary) and its encoder is saved beside them (``LAYER.basis.safetensors``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import BisectingKMeans
from tqdm.auto import tqdm

from .artefacts import (  # noqa: F401  (re-exported: moved to gig.artefacts)
    basis_path,
    concept_cards_path,
    dictionary_path,
    load_concept_cards,
    load_dictionary,
    load_samples,
)
from .basis import BasisEncoder, read_basis_file, require_non_negative
from .errors import InputError
from .store import RunStore, load_tensors, save_json, save_tensors


def n_concepts_for(
    n_samples: int, channels: int, per_channel: int = 8, min_cluster: int = 5, max_concepts: int | None = None
) -> int:
    """``K = min(per_channel · C, N // min_cluster)``, at least 2, at most ``max_concepts``."""
    k = min(per_channel * channels, n_samples // max(min_cluster, 1))
    if max_concepts:
        k = min(k, max_concepts)
    return max(2, min(k, n_samples))


def nearest_by_cosine(
    vectors: torch.Tensor, samples: torch.Tensor, k: int = 10, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``vectors (K, C)``, the ``k`` most cosine-similar ``samples (N, C)``.

    Returns ``(indices (K, k), similarities (K, k))``; chunked over K to bound memory.
    """
    k = min(k, samples.shape[0])
    s = torch.nn.functional.normalize(samples.float(), dim=1)
    idx, sim = [], []
    for start in range(0, vectors.shape[0], chunk):
        v = torch.nn.functional.normalize(vectors[start : start + chunk].float(), dim=1)
        top = (v @ s.T).topk(k, dim=1)
        idx.append(top.indices)
        sim.append(top.values)
    return torch.cat(idx), torch.cat(sim)


class ConceptExtractor:
    """Bisecting k-means concept extraction (scikit-learn style).

    Parameters mirror the config; after :meth:`fit`:

    * ``concepts_`` ``(K, C)`` concept vectors (centroids),
    * ``labels_`` ``(N,)`` cluster of each sample, ``counts_`` ``(K,)`` members per concept,
    * ``exemplars_`` ``(K, n_exemplars)`` indices of the most cosine-similar samples
      (``exemplars_[:, 0]`` is the top-1 PFV), ``exemplar_similarity_`` their cosines.
    """

    def __init__(
        self,
        n_concepts: int | None = None,
        concepts_per_channel: int = 8,
        min_cluster: int = 5,
        max_concepts: int | None = None,
        n_exemplars: int = 10,
        random_state: int = 0,
    ):
        self.n_concepts = n_concepts
        self.concepts_per_channel = concepts_per_channel
        self.min_cluster = min_cluster
        self.max_concepts = max_concepts
        self.n_exemplars = n_exemplars
        self.random_state = random_state

    def fit(self, X: np.ndarray | torch.Tensor) -> "ConceptExtractor":
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[0] < 2:
            raise InputError(f"need a (N >= 2, C) matrix of PFVs, got shape {X.shape}")
        k = self.n_concepts or n_concepts_for(
            X.shape[0], X.shape[1], self.concepts_per_channel, self.min_cluster, self.max_concepts
        )
        km = BisectingKMeans(n_clusters=k, bisecting_strategy="biggest_inertia", random_state=self.random_state)
        km.fit(X)
        self.concepts_ = km.cluster_centers_.astype(np.float32)
        self.labels_ = km.labels_.astype(np.int64)
        self._finish(X)
        return self

    def fit_dictionary(self, X: np.ndarray | torch.Tensor, dictionary: np.ndarray) -> "ConceptExtractor":
        """Use a given dictionary ``(K, C)``; members are assigned by highest cosine."""
        X = np.asarray(X, dtype=np.float32)
        V = np.asarray(dictionary, dtype=np.float32)
        if V.ndim != 2 or V.shape[1] != X.shape[1]:
            raise InputError(f"dictionary shape {V.shape} does not fit PFVs with {X.shape[1]} channels")
        self.concepts_ = V
        sim = (
            torch.nn.functional.normalize(torch.from_numpy(X), dim=1)
            @ torch.nn.functional.normalize(torch.from_numpy(V), dim=1).T
        )
        self.labels_ = sim.argmax(dim=1).numpy().astype(np.int64)
        self._finish(X)
        return self

    def _finish(self, X: np.ndarray) -> None:
        k = self.concepts_.shape[0]
        self.counts_ = np.bincount(self.labels_, minlength=k)
        idx, sim = nearest_by_cosine(torch.from_numpy(self.concepts_), torch.from_numpy(X), self.n_exemplars)
        self.exemplars_ = idx.numpy()
        self.exemplar_similarity_ = sim.numpy()

    def predict(self, X: np.ndarray | torch.Tensor) -> np.ndarray:
        """Nearest concept (Euclidean) of each row of ``X (N, C)``."""
        X = torch.as_tensor(np.asarray(X, dtype=np.float32))
        return torch.cdist(X, torch.from_numpy(self.concepts_)).argmin(dim=1).numpy()


def read_dictionary(spec: str, channels: int) -> tuple[np.ndarray, str]:
    """A user dictionary: ``"channels"`` (identity, ``C×C``) or a safetensors file with key ``V``."""
    if spec == "channels":
        return np.eye(channels, dtype=np.float32), "channels"
    path = Path(spec)
    tensors = load_tensors(path)
    if "V" not in tensors:
        raise InputError(f"dictionary file {path} has no tensor named 'V' (shape K×C)")
    return tensors["V"].float().numpy(), f"file:{path}"


def extract_concepts(store: RunStore, progress: bool = True) -> None:
    """Stage 3 into ``store/concepts``: ``LAYER.safetensors`` (V, labels, exemplars) + ``LAYER.json``."""
    store.require("collect")
    config = store.config
    with store.stage("concepts") as summary:
        for layer in tqdm(config.layers, desc="concepts", disable=not progress):
            samples = load_samples(store, layer)
            X = samples["pfv"].numpy()
            extractor, kind, basis_info = _fit_layer(store, layer, X)
            cards = _concept_cards(extractor, samples["target"].numpy())
            _save_concepts(store, layer, kind, extractor, X, cards)
            summary[layer] = {"K": int(extractor.concepts_.shape[0]), "C": int(X.shape[1]), "source": kind}
            if basis_info is not None:
                summary[layer]["basis"] = basis_info


def _fit_layer(store: RunStore, layer: str, X: np.ndarray) -> tuple[ConceptExtractor, str, dict | None]:
    """The concepts of ``layer`` from its sampled PFVs ``X (N, C)``: ``(extractor, source, basis
    info)``, from the user's dictionary, a basis with its own encoder (saved beside them; its info,
    else None) or bisecting k-means."""
    config = store.config
    extractor = ConceptExtractor(
        concepts_per_channel=config.concepts_per_channel,
        min_cluster=config.min_cluster,
        max_concepts=config.max_concepts,
        random_state=config.seed,
    )
    basis_info = None
    if layer in config.dictionaries:
        V, kind = read_dictionary(config.dictionaries[layer], X.shape[1])
        extractor.fit_dictionary(X, V)
    elif config.bases.get(layer, "kmeans") != "kmeans":
        encoder, kind, basis_info = _fit_basis(config, layer, X)
        save_basis(store, layer, encoder)
        extractor.fit_dictionary(X, encoder.V.numpy())
    else:
        extractor.fit(X)
        kind = "bisecting-kmeans"
    if basis_info is None:
        basis_path(store, layer).unlink(missing_ok=True)  # a k-means layer has no encoder of its own
    return extractor, kind, basis_info


def _concept_cards(extractor: ConceptExtractor, targets: np.ndarray) -> list[dict]:
    """Per concept: its member count, the five classes most of its members (``targets (N,)``: each
    sample's class) come from, and its exemplars with their cosines."""
    cards = []
    for q in range(extractor.concepts_.shape[0]):
        members = targets[extractor.labels_ == q]
        cards.append(
            {
                "id": q,
                "count": int(extractor.counts_[q]),
                "top_classes": [[int(c), int(n)] for c, n in Counter(members.tolist()).most_common(5)],
                "exemplars": extractor.exemplars_[q].tolist(),
                "exemplar_similarity": [round(float(s), 4) for s in extractor.exemplar_similarity_[q]],
            }
        )
    return cards


def _save_concepts(
    store: RunStore, layer: str, kind: str, extractor: ConceptExtractor, X: np.ndarray, cards: list[dict]
) -> None:
    """``LAYER.safetensors`` (``V (K, C)``, ``labels (N,)``, ``exemplars (K, n)``) and ``LAYER.json``
    (source, sizes and the concepts' ``cards``) in the run's concepts folder
    (:func:`gig.artefacts.dictionary_path`, :func:`gig.artefacts.concept_cards_path`)."""
    save_tensors(
        dictionary_path(store, layer),
        {
            "V": torch.from_numpy(extractor.concepts_),
            "labels": torch.from_numpy(extractor.labels_),
            "exemplars": torch.from_numpy(extractor.exemplars_.astype(np.int64)),
        },
    )
    save_json(
        concept_cards_path(store, layer),
        {
            "layer": layer,
            "source": kind,
            "K": int(extractor.concepts_.shape[0]),
            "C": int(X.shape[1]),
            "n_samples": int(X.shape[0]),
            "concepts": cards,
        },
    )


def _fit_basis(config, layer: str, X: np.ndarray):
    """The layer's basis with its own encoder (:mod:`gig.basis`): ``(encoder, source, info)``."""
    spec = config.bases[layer]
    if spec in ("sae", "sae-overcomplete", "sae-batchtopk", "nmf"):
        K = n_concepts_for(X.shape[0], X.shape[1], config.concepts_per_channel, config.min_cluster, config.max_concepts)
        if spec == "nmf":  # refused with the layer named where X has a negative value
            # at most C concepts: beyond, NNLS codes are neither unique nor sparse (any x in the
            # cone is matched exactly by many codes) and cost K² per position to compute
            encoder, info = fit_nmf(torch.from_numpy(X), min(K, X.shape[1]), config.seed, layer)
            return encoder, spec, info
        X = torch.from_numpy(X)
        if spec == "sae":
            encoder, info = fit_sae(X, K, config.sae_k, config.seed, config.sae_steps)
        else:
            encoder, info = fit_overcomplete_sae(X, K, config.sae_k, config.seed, config.sae_steps, kind=spec)
        return encoder, spec, info
    encoder = read_basis_file(spec, X.shape[1])
    return encoder, f"file:{spec}", {"kind": "user basis", "file": spec, "k": encoder.k}


# ------------------------------------------------------------------ bases fitted here (gig.basis)
def fit_sae(X: torch.Tensor, K: int, k: int, seed: int, steps: int) -> tuple[BasisEncoder, dict]:
    """gig's TopK SAE (:func:`gig.sae.train_sae`) on the rows of ``X (N, C)`` as a basis, with its
    training figures."""
    from .sae import train_sae

    sae, info = train_sae(X.float(), K, k, seed=seed, steps=steps)
    info = {"kind": "TopK SAE (gig.sae)", **info}
    b_pre = sae.b_pre.detach().clone()
    return (
        BasisEncoder(
            "sae",
            sae.W_dec.detach().clone(),
            sae.W_enc.detach().clone(),
            sae.b_enc.detach().clone(),
            b_pre,
            None,
            sae.k,
            sae.scale,
        ),
        info,
    )


def fit_nmf(X: torch.Tensor, K: int, seed: int, layer: str) -> tuple[BasisEncoder, dict]:
    """scikit-learn NMF of the non-negative rows of ``X (N, C)`` with ``K`` concepts, as the
    evaluation's ``nmf`` fits it (:class:`gig.evaluation.methods.nmf.NMFBasis`, seeded), as an
    ``nnls`` basis: its concepts ``H (K, C) ≥ 0`` the decoder, its codes NMF's transform.
    InputError naming ``layer`` where ``X`` has a negative value."""
    from .evaluation.methods.nmf import NMFBasis

    require_non_negative(X, f"bases: {layer}: nmf")
    nmf = NMFBasis(n_components=K, seed=seed).fit(X.float())
    basis = BasisEncoder("nmf", nmf.components_.float(), None, None, None, None, None, 1.0, nnls=True)
    return basis, {**nmf.info_, "K": K}


def overcomplete_problem() -> str | None:
    """Why Overcomplete's SAEs cannot be a basis here (the optional package is missing), or None."""
    from .evaluation.methods.overcomplete_sae import OvercompleteTopKSAE

    return OvercompleteTopKSAE.problem()


def fit_overcomplete_sae(
    X: torch.Tensor, K: int, k: int, seed: int, steps: int, kind: str = "sae-overcomplete"
) -> tuple[BasisEncoder, dict]:
    """Overcomplete's TopK SAE (``kind`` ``sae-overcomplete``) or BatchTopK SAE (``sae-batchtopk``)
    (``pip install 'gig[overcomplete]'``), trained by its own loop as the evaluation's ``sae`` and
    ``sae-batchtopk`` baselines are (:mod:`gig.evaluation.methods.overcomplete_sae`), as a basis:
    its default encoder is one ``Linear`` (with bias) then ReLU and TopK (BatchTopK in use: every
    code below its learned threshold set to 0), on inputs scaled by ``1/s``; its decoder the
    unit-norm dictionary without bias, so it is exactly a :class:`BasisEncoder` (``W_enc =
    Linearᵀ``, ``b_enc`` its bias, ``scale = s``, ``k`` or ``threshold``)."""
    from torch import nn

    from .evaluation.methods.overcomplete_sae import OvercompleteBatchTopKSAE, OvercompleteTopKSAE

    batchtopk = kind == "sae-batchtopk"
    trainer = OvercompleteBatchTopKSAE if batchtopk else OvercompleteTopKSAE
    sae = trainer(n_components=K, k=k, seed=seed, steps=steps).fit(X.float())
    encoder = sae.model_.encoder
    linear, norm = encoder.final_block[0], encoder.final_block[1]
    if (
        len(encoder.mlp_blocks)
        or not isinstance(norm, nn.Identity)
        or not isinstance(encoder.final_activation, nn.ReLU)
    ):
        raise InputError("Overcomplete's SAE has an encoder other than Linear + ReLU: it cannot be read as a basis")
    basis = BasisEncoder(
        kind,
        sae.components_.float(),
        linear.weight.detach().T.contiguous(),
        linear.bias.detach().clone(),
        torch.zeros(X.shape[1]),
        None,
        None if batchtopk else int(sae.model_.top_k),
        sae.scale_,
        threshold=torch.full((K,), sae.threshold_) if batchtopk else None,
    )
    return basis, sae.info_


def save_basis(store: RunStore, layer: str, encoder: BasisEncoder) -> None:
    """Write ``layer``'s basis (:func:`gig.artefacts.basis_path`), read by :func:`gig.artefacts.load_basis`."""
    save_tensors(basis_path(store, layer), encoder.tensors(), metadata=encoder.metadata())
