"""Run configuration: one dataclass, saved as YAML in every run directory.

Every stage declares which fields it depends on (``STAGE_FIELDS``); the run store hashes those
fields together with the hashes of the upstream stages, so a changed setting recomputes only the
stages that depend on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ConfigError

DEFAULT_MODEL = "efficientnet-lite0"


def _int(low: int | None = None, optional: bool = False, high: int | None = None):
    def ok(value) -> bool:
        if value is None:
            return optional
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and (low is None or value >= low)
            and (high is None or value <= high)
        )

    return ok


#: Largest GIG grid: 16 384 steps is 16× the accuracy benchmark's 1 024-step reference; a larger
#: grid (1e7 was accepted) makes the attribute stage run for days without progress.
MAX_GIG_STEPS = 16384
#: The λ rule's default bound on the mean KL divergence (nats) of the model's output from the one
#: with a layer replaced by its reconstruction.
MAX_KL = 0.02


def _real(low: float, high: float):
    """A number strictly between ``low`` and ``high``."""

    def ok(value) -> bool:
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and low < value < high
        )

    return ok


def _text(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _one_of(*choices: str):
    return lambda value: value in choices


def _names(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(_text(v) for v in value) and len(set(value)) == len(value)


def _device(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"cpu|cuda(:\d+)?", value) is not None


def _class_ids(value) -> bool:
    return isinstance(value, list) and all(_int(0)(v) for v in value)


def _dictionaries(value) -> bool:
    return isinstance(value, dict) and all(_text(k) and _text(v) for k, v in value.items())


#: Basis kinds by name (:mod:`gig.basis`); any other ``bases`` spec is a safetensors file of a user basis.
BASIS_KINDS = ("kmeans", "sae", "sae-overcomplete", "sae-batchtopk", "nmf")


def is_basis_file(spec: str) -> bool:
    """Whether a ``bases`` spec names a user basis file (not a kind of :data:`BASIS_KINDS`)."""
    return spec not in BASIS_KINDS


def _bases(value) -> bool:
    return isinstance(value, dict) and all(
        _text(k) and _text(v) and (not is_basis_file(v) or v.endswith(".safetensors")) for k, v in value.items()
    )


def field_problems(settings: Any, rules: dict[str, tuple[Callable[[Any], bool], str]]) -> list[str]:
    """``"name=value: allowed"`` for each field of the dataclass ``settings`` its rule refuses."""
    return [
        f"{name}={getattr(settings, name)!r}: {allowed}"
        for name, (ok, allowed) in rules.items()
        if not ok(getattr(settings, name))
    ]


def check_fields(settings: Any, rules: dict[str, tuple[Callable[[Any], bool], str]], what: str) -> None:
    """Raise one :class:`ConfigError` naming every field of ``settings`` that breaks its rule
    (``what``: how the message names the settings, e.g. ``"report option"``)."""
    problems = field_problems(settings, rules)
    if problems:
        raise ConfigError(f"{what} " + "; ".join(problems))


def fields_from_dict(cls: type, data: dict[str, Any], what: str):
    """``cls(**data)`` for a settings dataclass, refusing unknown keys with one error that lists
    them and the valid ones (``what``: how the message names the settings)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what}(s): {', '.join(unknown)}; valid options: {', '.join(sorted(known))}")
    return cls(**data)


def stable_hash(data: Any) -> str:
    """A stable 16-hex-digit fingerprint of JSON-like ``data`` (keys sorted)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings_hash(settings: Any) -> str:
    """The fingerprint of a settings dataclass (:func:`stable_hash` of its fields)."""
    return stable_hash(dataclasses.asdict(settings))


@dataclass
class Config:
    """Everything a run needs. Field names match the YAML keys and the CLI options."""

    # model
    model: str = DEFAULT_MODEL
    weights: str = "default"  # "default" | "none" | path to a state dict (.pt/.pth/.safetensors)
    #: a linear probe as the model's output (``.safetensors``: weight (outputs, features), bias,
    #: names in its metadata): the graphs' top nodes are its outputs (:func:`gig.models.with_head`)
    head: str | None = None
    #: the module the probe replaces; None: the last ``nn.Linear`` that fits, else after the output
    head_at: str | None = None
    #: None: the model's default layers (lite0: _blocks.4/8/11/15; others: the last block of each
    #: of the last four stages), resolved and saved when the run is made (``gig layers MODEL``)
    layers: list[str] | None = None
    device: str = "cpu"
    batch_size: int = 16
    #: DataLoader processes that decode and preprocess images ahead of the compute (0: in line)
    loader_workers: int = 0

    # images
    images: str = "embedded"  # "embedded" | folder | CSV file
    max_images: int | None = None
    target: str = "predicted"  # "predicted" | "label"

    # 1. collect
    #: None (auto, per layer): enough PFVs for K = concepts_per_channel · C concepts of
    #: min_cluster members (and calibration_size), at most every position of the layer
    samples_per_image: int | None = None
    seed: int = 0

    # 3. concepts
    concepts_per_channel: int = 8  # K = min(8 C, N // min_cluster)
    min_cluster: int = 5
    max_concepts: int | None = None
    #: layer -> safetensors file holding a user dictionary under key "V" (K, C), or "channels"
    dictionaries: dict[str, str] = field(default_factory=dict)
    #: layer -> its concept basis: "kmeans" (the default), "sae" (a TopK sparse autoencoder trained
    #: here), "sae-overcomplete" / "sae-batchtopk" (Overcomplete's TopK / BatchTopK SAE), "nmf"
    #: (scikit-learn NMF fitted here, codes by non-negative least squares; non-negative layers
    #: only) or a safetensors file of a user basis with its own encoder (relu, topk, threshold or
    #: nnls; :mod:`gig.basis`)
    bases: dict[str, str] = field(default_factory=dict)
    sae_k: int = 32  # active latents of a "sae" basis
    sae_steps: int = 2000  # Adam steps that train a "sae" basis

    # 4. decompose
    #: λ rule, default: the sparsest codes with R² ≥ min_r2 and mean KL divergence of the model's
    #: output from the one with the layer replaced ≤ max_kl (nats), on the sparsity–fidelity front;
    #: a number in target_rel_error instead picks the largest λ whose relative reconstruction error
    #: meets it (the earlier rule)
    target_rel_error: float | None = None
    min_r2: float = 0.9
    max_kl: float | None = MAX_KL
    #: top-1 agreement the coded run is checked against over all its images (and, with max_kl:
    #: null, the rule of runs made before 0.4: agreement ≥ this on the front images)
    min_top1_agreement: float = 0.95
    front_images: int = 32  # images whose every position measures the front at each λ
    #: "omp" (orthogonal matching pursuit: atoms added greedily until no atom correlates with the
    #: residual by more than λ, least-squares coefficients; the default since 0.4: half the active
    #: concepts of Lasso at equal fidelity, 2-3x faster, no GPL solver; see docs/guide.md) |
    #: "lasso" (the paper: ℓ1-penalised codes, solved exactly, refitted on their support)
    coder: str = "omp"
    debias: bool = True  # least-squares refit on the support Lasso selected (relaxed Lasso)
    #: Lasso on unit-norm atoms (the penalty weighs every concept alike); the stored codes are
    #: still those of the concept vectors themselves
    unit_atoms: bool = False
    nonnegative: bool = False
    lasso_solver: str = "auto"  # "lars" (exact; CPU, needs spams-bin) | "fista" (any device) | "auto"
    lasso_max_iter: int = 1000  # FISTA only: iteration cap
    lasso_tol: float = 1e-3  # duality gap / objective at which FISTA stops (and LARS rows are polished)
    calibration_size: int = 2000  # gig evaluate: PFVs on which baselines' λ is calibrated

    # 5. attribute
    #: relative error tolerance of every GIG attribution (error-controlled steps, the default)
    gig_tol: float = 0.01
    gig_max_steps: int = 512  # cap on the trapezoid intervals of one attribution
    #: a fixed number of steps for every attribution instead of error control (None: error control)
    n_steps: int | None = None
    quadrature: str = "riemann-midpoint"  # fixed grid only: or "gauss-legendre", "trapezoid"
    internal_batch_size: int = 64
    top_k: int = 5
    #: random directions attributed along every path, per image, for the graphs' significance test
    #: of each edge against edges to random directions (0: no test)
    null_directions: int = 16

    # 6. graph
    graph_classes: list[int] = field(default_factory=list)  # empty: the most frequent classes
    edges_per_node: int = 3

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field's type and range; raise one :class:`ConfigError` naming each bad
        field, its value and what is allowed. Runs when the config is made (YAML, CLI or Python),
        so a bad setting fails before any model or image is loaded, not after hours of stages."""
        problems = field_problems(self, _RULES)
        if not problems and self.dictionaries and self.layers is not None:
            stray = sorted(set(self.dictionaries) - set(self.layers))
            if stray:
                problems.append(
                    f"dictionaries={self.dictionaries!r}: keys must be analysed layers; "
                    f"{', '.join(stray)} not in layers {self.layers}"
                )
        if not problems and self.bases and self.layers is not None:
            stray = sorted(set(self.bases) - set(self.layers))
            if stray:
                problems.append(
                    f"bases={self.bases!r}: keys must be analysed layers; {', '.join(stray)} not in layers {self.layers}"
                )
        both = sorted(set(self.bases) & set(self.dictionaries))
        if not problems and both:
            problems.append(
                f"bases and dictionaries both name {', '.join(both)}: a layer has one basis (a user dictionary "
                "coded by the run's coder, or a basis with its own encoder)"
            )
        if not problems and self.coder == "omp" and self.nonnegative:
            problems.append(
                "coder='omp' with nonnegative=true: OMP codes are signed; use coder: lasso for non-negative codes"
            )
        if problems:
            raise ConfigError("config option " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return fields_from_dict(cls, data, "config option")

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:  # one line: where and what, not the parser's multi-line report
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(
                f"config {path} is not valid YAML{where} ({problem}): correct it, or restore it from a copy"
            ) from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping of option: value")
        if isinstance(data.get("head"), str) and data["head"].strip() and not Path(data["head"]).is_absolute():
            # a head file is read beside the config that names it, from whatever directory
            data["head"] = str((path.resolve().parent / data["head"]).resolve())
        if isinstance(data.get("bases"), dict):  # basis files likewise
            data["bases"] = {
                layer: str((path.resolve().parent / spec).resolve())
                if isinstance(spec, str) and is_basis_file(spec) and not Path(spec).is_absolute()
                else spec
                for layer, spec in data["bases"].items()
            }
        return cls.from_dict(data)

    @classmethod
    def load_saved(cls, path: str | Path) -> "Config":
        """A run's own ``config.yaml``: as :meth:`load`, with fields the run predates set to what
        it was made with (``SAVED_BEFORE``) instead of today's defaults."""
        config = cls.load(path)
        data = yaml.safe_load(Path(path).read_text()) or {}
        missing = {k: v for k, v in SAVED_BEFORE.items() if k not in data}
        return cls.from_dict({**config.to_dict(), **missing}) if missing else config

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


#: Every field: (check, what is allowed). Read by :meth:`Config.validate`.
_RULES: dict[str, tuple[Any, str]] = {
    "model": (_text, "a model name: efficientnet-lite0/1/2, torchvision:NAME or timm:NAME"),
    "weights": (_text, "default, none, or the path of a state dict"),
    "head": (lambda v: v is None or _text(v), "null or the path of a .safetensors linear head (weight, bias)"),
    "head_at": (lambda v: v is None or _text(v), "null (automatic) or the name of the module the head replaces"),
    "layers": (
        lambda v: v is None or _names(v),
        "null (the model's defaults) or a non-empty list of distinct layer names (YAML: one per line with '- ')",
    ),
    "device": (_device, "cpu, cuda or cuda:N"),
    "batch_size": (_int(1), "an integer of at least 1"),
    "loader_workers": (_int(0), "an integer of at least 0"),
    "images": (_text, "embedded, an image folder or a CSV file"),
    "max_images": (_int(1, optional=True), "an integer of at least 1, or null for all images"),
    "target": (_one_of("predicted", "label"), "predicted or label"),
    "samples_per_image": (_int(1, optional=True), "an integer of at least 1, or null (automatic)"),
    "seed": (_int(0, high=2**32 - 1), "an integer from 0 to 2**32 - 1 (what NumPy and scikit-learn take)"),
    "concepts_per_channel": (_int(1), "an integer of at least 1"),
    "min_cluster": (_int(1), "an integer of at least 1"),
    "max_concepts": (_int(2, optional=True), "an integer of at least 2, or null"),
    "dictionaries": (_dictionaries, "a mapping layer: safetensors file or 'channels'"),
    "bases": (
        _bases,
        "a mapping layer: kmeans, sae, sae-overcomplete, sae-batchtopk, nmf or a .safetensors file of a basis",
    ),
    "sae_k": (_int(1, high=4096), "an integer from 1 to 4096"),
    "sae_steps": (_int(1, high=1_000_000), "an integer from 1 to 1 000 000"),
    "target_rel_error": (
        lambda v: v is None or _real(0, 1)(v),
        "null (the R²/agreement rule) or a relative reconstruction error between 0 and 1 (exclusive), e.g. 0.1",
    ),
    "min_r2": (_real(0, 1), "an R² between 0 and 1 (exclusive), e.g. 0.9"),
    "max_kl": (
        lambda v: v is None or _real(0, math.inf)(v),
        "a KL divergence in nats above 0, e.g. 0.1, or null (the agreement rule of runs made before 0.4)",
    ),
    "min_top1_agreement": (lambda v: _real(0, 1)(v) or v == 1, "a share of images in (0, 1], e.g. 0.95"),
    "front_images": (_int(1), "an integer of at least 1"),
    "coder": (_one_of("lasso", "omp"), "lasso or omp"),
    "debias": (lambda v: isinstance(v, bool), "true or false"),
    "unit_atoms": (lambda v: isinstance(v, bool), "true or false"),
    "lasso_solver": (_one_of("auto", "lars", "fista"), "auto, lars or fista"),
    "lasso_tol": (_real(0, 1), "a relative duality gap between 0 and 1 (exclusive), e.g. 1e-3"),
    "nonnegative": (lambda v: isinstance(v, bool), "true or false"),
    "lasso_max_iter": (_int(1), "an integer of at least 1"),
    "calibration_size": (_int(10), "an integer of at least 10"),
    "gig_tol": (_real(0, 1), "a relative tolerance between 0 and 1 (exclusive), e.g. 0.01"),
    "gig_max_steps": (_int(16, high=MAX_GIG_STEPS), f"an integer from 16 to {MAX_GIG_STEPS}"),
    "null_directions": (_int(0, high=256), "an integer from 0 (no significance test) to 256"),
    "n_steps": (
        _int(1, optional=True, high=MAX_GIG_STEPS),
        f"an integer from 1 to {MAX_GIG_STEPS}, or null for error control",
    ),
    "quadrature": (
        _one_of("riemann-midpoint", "gauss-legendre", "trapezoid"),
        "riemann-midpoint, gauss-legendre or trapezoid",
    ),
    "internal_batch_size": (_int(1), "an integer of at least 1"),
    "top_k": (_int(1), "an integer of at least 1"),
    "graph_classes": (_class_ids, "a list of class indices (integers of at least 0)"),
    "edges_per_node": (_int(1), "an integer of at least 1"),
}


#: Fields each stage reads; used for the stage hashes. ``device`` and batch sizes are left out on
#: purpose: they change speed, not results.
def resolve_samples_per_image(config: Config, n_images: int, channels: int, positions: int) -> int:
    """PFVs drawn per image at a layer of ``channels`` C and ``positions`` H·W: the configured
    number, or (auto) enough for the paper's ``K = concepts_per_channel · C`` concepts of
    ``min_cluster`` members each and for ``calibration_size`` PFVs, at most every position."""
    if config.samples_per_image:
        return min(int(config.samples_per_image), positions)
    wanted = max(config.concepts_per_channel * channels * config.min_cluster, config.calibration_size)
    return max(1, min(positions, -(-wanted // max(n_images, 1))))


STAGE_FIELDS: dict[str, list[str]] = {
    "collect": [
        "model",
        "weights",
        "head",
        "head_at",
        "layers",
        "images",
        "max_images",
        "target",
        "samples_per_image",
        "seed",
    ],
    "concepts": [
        "concepts_per_channel",
        "min_cluster",
        "max_concepts",
        "dictionaries",
        "seed",
        "bases",
        "sae_k",
        "sae_steps",
    ],
    "decompose": [
        "target_rel_error",
        "min_r2",
        "max_kl",
        "min_top1_agreement",
        "front_images",
        "debias",
        "unit_atoms",
        "nonnegative",
        "lasso_solver",
        "lasso_max_iter",
        "lasso_tol",
        "seed",
        "coder",
    ],
    "attribute": ["gig_tol", "gig_max_steps", "n_steps", "quadrature", "top_k", "null_directions"],
    "graph": ["graph_classes", "edges_per_node", "top_k"],
}
STAGE_ORDER = ["collect", "concepts", "decompose", "attribute", "graph"]


#: Fields added after runs were made, hashed only when they differ from this value (their
#: value before they existed), so that those runs' stages stay valid.
HASHED_WHEN_SET: dict[str, Any] = {
    "coder": "lasso",
    "max_kl": None,
    "head": None,
    "head_at": None,
    "null_directions": 0,
    "bases": {},
    "sae_k": 32,
    "sae_steps": 2000,
}

#: Values that a run's saved ``config.yaml`` without the field was made with (the field did not
#: exist yet): :meth:`Config.load_saved` fills them in, so such a run reads and resumes as made.
#: They are the values that are not hashed (a run made before a field existed used its old value).
SAVED_BEFORE: dict[str, Any] = HASHED_WHEN_SET

#: Fields the automatic ``samples_per_image`` reads (:func:`resolve_samples_per_image`).
AUTO_SAMPLE_FIELDS = ["concepts_per_channel", "min_cluster", "calibration_size"]


def stage_hash(config: Config, stage: str, upstream: str = "") -> str:
    """Hash of the settings ``stage`` depends on, chained with the upstream stage's hash."""
    fields = STAGE_FIELDS[stage]
    if stage == "collect" and config.samples_per_image is None:
        fields = fields + AUTO_SAMPLE_FIELDS  # the automatic sample count depends on them
    data = {
        name: getattr(config, name)
        for name in fields
        if not (name in HASHED_WHEN_SET and getattr(config, name) == HASHED_WHEN_SET[name])
    }
    blob = json.dumps(data, sort_keys=True, default=str) + upstream
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
