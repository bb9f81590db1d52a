"""The evaluation's settings: one validated dataclass, saved in ``settings.json`` and hashed.

:class:`EvaluationSettings` is what a user chooses (validated when it is made, with errors naming
the field); :class:`EvaluationPlan` is those settings resolved against one run (its layers, GIG
settings and the images drawn), and its :meth:`~EvaluationPlan.key` decides whether saved
partial results may be reused on resume, like the stage hashes of :class:`gig.config.Config`.

>>> EvaluationSettings(extraction_images=50, methods=["ours", "sae"])        # doctest: +SKIP
>>> EvaluationSettings(n_points=1)
Traceback (most recent call last):
gig.errors.ConfigError: evaluation setting n_points=1: an integer of at least 2
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import _int, _real, field_problems, fields_from_dict, stable_hash
from ..errors import ConfigError, RunMismatchError
from .bases import basis_class, method_label, method_problem

#: The inter-layer protocol's concept orderings (:mod:`.interlayer`): GIG, random, gradient ×
#: coefficient, coefficient magnitude.
ORDERINGS = ("gig", "random", "grad_x_coef", "magnitude")
#: The default methods (``nmf``, ``sae-torch`` and ``user:PATH`` are chosen by name).
METHODS = ("ours", "dictionary", "sae", "kmeans")
#: 3: error-controlled GIG (gig_tol) for the rankings
SETTINGS_VERSION = 3
#: Settings that change speed or presentation only: left out of the resume key.
NOT_IN_KEY = ("batch_rows", "n_boot", "plots", "resume")


def default_methods() -> list[str]:
    """:data:`METHODS`, with the hand-written ``sae-torch`` standing in for Overcomplete's ``sae``
    where the optional package is not installed (the results name the one that ran)."""
    if basis_class("sae").problem() is None:
        return list(METHODS)
    return ["sae-torch" if m == "sae" else m for m in METHODS]


@dataclass
class EvaluationSettings:
    """Everything ``gig evaluate`` lets a user choose; field names match the CLI options."""

    extraction_images: int = 100  # images for concept extraction (C-Deletion / C-Insertion); 0 skips it
    interlayer_images: int = 20  # images for inter-layer insertion / deletion; 0 skips it
    #: registered method names (gig.evaluation.bases.registered) or user:PATH
    methods: list[str] = field(default_factory=default_methods)
    orderings: list[str] = field(default_factory=lambda: list(ORDERINGS))
    layers: list[str] | None = None  # None: every layer of the run
    seed: int = 0  # image choice, baselines and random orders
    n_points: int = 21  # points per deletion / insertion curve
    n_steps: int | None = None  # a fixed number of GIG steps for the rankings (None: the run's setting)
    gig_tol: float | None = None  # GIG tolerance for the rankings (None: the run's)
    n_targets: int = 5  # inter-layer: target concepts of the upper layer per image
    n_random: int = 5  # inter-layer: random orders per image (averaged)
    batch_rows: int = 126  # replacement rows per forward pass (speed only)
    chunk_images: int = 10  # images per saved part (what an interruption can lose)
    sae_k: int | None = None  # active latents of the SAEs (None: the run's mean active concepts per PFV)
    sae_steps: int = 1500  # training steps of the SAEs
    dictionary_iter: int = 5  # passes of dictionary learning
    n_boot: int = 2000  # bootstrap resamples of the intervals
    plots: bool = True  # write the PNG plots
    resume: bool = True  # reuse saved parts and fitted bases (False: start afresh)

    def __post_init__(self) -> None:
        # Lists given as tuples (or with repeats) are normalised first, so that equal settings hash alike.
        for name in ("methods", "orderings", "layers"):
            value = getattr(self, name)
            if isinstance(value, (tuple, list)):
                setattr(self, name, list(dict.fromkeys(value)))
        self.validate()

    def validate(self) -> None:
        """One :class:`ConfigError` naming every field that breaks its rule, its value and the rule."""
        problems = field_problems(self, _RULES)
        if not problems:
            problems += [f"methods={self.methods!r}: {p}" for p in map(method_problem, self.methods) if p]
            labels = [method_label(m) for m in self.methods]
            if len(set(labels)) < len(labels):
                problems.append(
                    f"methods={self.methods!r}: two methods would share the name in the results "
                    f"({', '.join(labels)}); rename one user file"
                )
            if self.batch_rows < 2 * self.n_points:
                problems.append(f"batch_rows={self.batch_rows!r}: at least 2·n_points = {2 * self.n_points}")
        if problems:
            raise ConfigError("evaluation setting " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvaluationSettings":
        return fields_from_dict(cls, data, "evaluation setting")

    def hash(self) -> str:
        """Fingerprint of every field."""
        return stable_hash(self.to_dict())


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)


def _bool(value: Any) -> bool:
    return isinstance(value, bool)


#: Every field: (check, what is allowed). Methods are checked against the registry afterwards.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "extraction_images": (_int(0), "an integer of at least 0"),
    "interlayer_images": (_int(0), "an integer of at least 0"),
    "methods": (_names, "a list of method names"),
    "orderings": (lambda v: _names(v) and set(v) <= set(ORDERINGS), f"a list of orderings from {', '.join(ORDERINGS)}"),
    "layers": (lambda v: v is None or (_names(v) and len(v) > 0), "null (the run's layers) or a list of layer names"),
    "seed": (_int(0), "an integer of at least 0"),
    "n_points": (_int(2), "an integer of at least 2"),
    "n_steps": (_int(1, optional=True), "a positive integer, or null for the run's setting"),
    "gig_tol": (lambda v: v is None or _real(0, 1)(v), "a relative tolerance in (0, 1), or null for the run's"),
    "n_targets": (_int(1), "an integer of at least 1"),
    "n_random": (_int(1), "an integer of at least 1"),
    "batch_rows": (_int(2), "an integer of at least 2"),
    "chunk_images": (_int(1), "an integer of at least 1"),
    "sae_k": (_int(1, optional=True), "a positive integer, or null for the run's sparsity"),
    "sae_steps": (_int(1), "an integer of at least 1"),
    "dictionary_iter": (_int(1), "an integer of at least 1"),
    "n_boot": (_int(1), "an integer of at least 1"),
    "plots": (_bool, "true or false"),
    "resume": (_bool, "true or false"),
}


@dataclass
class EvaluationPlan:
    """:class:`EvaluationSettings` resolved against one run: what the evaluation computes."""

    settings: EvaluationSettings
    run_hash: str  # the decompose stage's hash: codes and dictionaries the results rest on
    layers: list[str]  # evaluated layers, in the run's (forward) order
    n_steps: int | None  # GIG of the rankings: fixed steps (None: error control at gig_tol)
    quadrature: str
    gig_tol: float
    gig_max_steps: int
    internal_batch_size: int
    extraction_images: list[dict] = field(default_factory=list)  # the run's image records (id, target, pred)
    interlayer_images: list[dict] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        return self.settings.methods

    @property
    def orderings(self) -> list[str]:
        return self.settings.orderings

    def resolved(self) -> dict[str, Any]:
        """The run-dependent values, as ``settings.json`` records them."""
        return {
            "version": SETTINGS_VERSION,
            "run_hash": self.run_hash,
            "layers": self.layers,
            "n_steps": self.n_steps,
            "quadrature": self.quadrature,
            "gig_tol": self.gig_tol,
            "gig_max_steps": self.gig_max_steps,
            "internal_batch_size": self.internal_batch_size,
            "extraction_images": [i["image_id"] for i in self.extraction_images],
            "interlayer_images": [i["image_id"] for i in self.interlayer_images],
        }

    def key(self) -> str:
        """Fingerprint of everything the results depend on: saved parts are reused only while it
        is unchanged (batch sizes, bootstrap and output options do not count)."""
        chosen = {k: v for k, v in self.settings.to_dict().items() if k not in NOT_IN_KEY}
        files = {m: f for m in self.methods if (f := basis_class(m).fingerprint(m))}  # user files' hashes
        # the class behind each name too: a name that changes its method must not reuse parts
        classes = {m: basis_class(m).identity() for m in self.methods}
        return stable_hash(
            {"settings": chosen, "resolved": self.resolved(), "classes": classes, **({"files": files} if files else {})}
        )

    def record(self) -> dict[str, Any]:
        """What ``settings.json`` holds (with the timings added by the runner)."""
        return {
            "settings": self.settings.to_dict(),
            "settings_hash": self.settings.hash(),
            "resolved": self.resolved(),
            "key": self.key(),
        }


def resolve_layers(wanted: list[str] | None, run_layers: list[str]) -> list[str]:
    """The evaluated layers in the run's order; ConfigError for a layer the run does not have."""
    if not wanted:
        return list(run_layers)
    bad = [l for l in wanted if l not in run_layers]
    if bad:
        raise ConfigError(
            f"evaluation setting layers={wanted!r}: {bad} are not layers of the run ({', '.join(run_layers)})"
        )
    return [l for l in run_layers if l in wanted]


def pick_images(used: list[dict], n: int, seed: int, salt: int) -> list[dict]:
    """``n`` of the run's images, drawn at random (seeded), kept in run order."""
    if n <= 0:
        return []
    rng = np.random.default_rng([seed, salt])
    idx = np.sort(rng.choice(len(used), size=min(n, len(used)), replace=False))
    return [used[i] for i in idx]


def make_plan(settings: EvaluationSettings, store, config, used: list[dict]) -> EvaluationPlan:
    """Resolve ``settings`` against the run in ``store`` (its ``config`` and its images ``used``)."""
    s = settings
    layers = resolve_layers(s.layers, list(store.config.layers))
    if s.interlayer_images > 0 and len(layers) < 2 and s.orderings:
        raise ConfigError("the inter-layer protocol needs at least two layers (interlayer_images=0 skips it)")
    return EvaluationPlan(
        s,
        store.expected_hash("decompose"),
        layers,
        s.n_steps or config.n_steps,
        config.quadrature,
        float(s.gig_tol or config.gig_tol),
        config.gig_max_steps,
        config.internal_batch_size,
        pick_images(used, s.extraction_images, s.seed, 1) if s.methods else [],
        pick_images(used, s.interlayer_images, s.seed, 2) if s.orderings and len(layers) > 1 else [],
    )


def save_settings(path: Path, settings: EvaluationSettings) -> None:
    """Write ``settings`` as JSON (readable by :func:`load_settings`)."""
    Path(path).write_text(json.dumps(settings.to_dict(), indent=1))


def load_settings(path: Path) -> EvaluationSettings:
    """Settings from a JSON file of fields, or from an evaluation's ``settings.json``."""
    from ..store import load_json

    try:
        data = load_json(Path(path))
    except (OSError, ValueError, RunMismatchError) as exc:
        raise ConfigError(f"cannot read evaluation settings {path}: {exc}") from exc
    return EvaluationSettings.from_dict(data.get("settings", data) if isinstance(data, dict) else data)
