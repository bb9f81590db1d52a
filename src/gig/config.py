"""Run configuration: one dataclass, saved as YAML in every run directory.

Every stage declares which fields it depends on (``STAGE_FIELDS``); the run store hashes those
fields together with the hashes of the upstream stages, so a changed setting recomputes only the
stages that depend on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_MODEL = "efficientnet-lite0"
#: Early → late blocks of EfficientNet-Lite0 (28², 14², 14², 7² grids).
DEFAULT_LAYERS = ["_blocks.4", "_blocks.8", "_blocks.11", "_blocks.15"]


@dataclass
class Config:
    """Everything a run needs. Field names match the YAML keys and the CLI options."""

    # model
    model: str = DEFAULT_MODEL
    weights: str = "default"  # "default" | "none" | path to a state dict (.pt/.pth/.safetensors)
    layers: list[str] = field(default_factory=lambda: list(DEFAULT_LAYERS))
    device: str = "cpu"
    batch_size: int = 16

    # images
    images: str = "embedded"  # "embedded" | folder | CSV file
    max_images: int | None = None
    target: str = "predicted"  # "predicted" | "label"

    # 1. collect
    #: None (auto): enough for about 2000 PFVs per layer, between 1 and 16 per image
    samples_per_image: int | None = None
    seed: int = 0

    # 3. concepts
    concepts_per_channel: int = 8  # K = min(8 C, N // min_cluster)
    min_cluster: int = 5
    max_concepts: int | None = None
    #: layer -> safetensors file holding a user dictionary under key "V" (K, C), or "channels"
    dictionaries: dict[str, str] = field(default_factory=dict)

    # 4. decompose
    target_rel_error: float = 0.1
    nonnegative: bool = False
    lasso_max_iter: int = 300
    calibration_size: int = 2000

    # 5. attribute
    #: relative error tolerance of every GIG attribution (error-controlled steps, the default)
    gig_tol: float = 0.01
    gig_max_steps: int = 512  # cap on the trapezoid intervals of one attribution
    #: a fixed number of steps for every attribution instead of error control (None: error control)
    n_steps: int | None = None
    quadrature: str = "riemann-midpoint"  # fixed grid only: or "gauss-legendre", "trapezoid"
    internal_batch_size: int = 64
    top_k: int = 5

    # 6. graph
    graph_classes: list[int] = field(default_factory=list)  # empty: the most frequent classes
    edges_per_node: int = 3

    def __post_init__(self) -> None:
        self._check_gig()

    def _check_gig(self) -> None:
        """The GIG settings, checked when the config is made (not when the attribute stage
        starts, after hours of earlier stages)."""
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"config option {name}={getattr(self, name)!r}: {allowed}")

        if isinstance(self.gig_tol, bool) or not isinstance(self.gig_tol, (int, float)) or not 0 < self.gig_tol < 1:
            raise bad("gig_tol", "a relative tolerance between 0 and 1 (exclusive), e.g. 0.01")
        if isinstance(self.gig_max_steps, bool) or not isinstance(self.gig_max_steps, int) or self.gig_max_steps < 16:
            raise bad("gig_max_steps", "an integer of at least 16")
        if self.n_steps is not None and (isinstance(self.n_steps, bool) or not isinstance(self.n_steps, int)
                                         or self.n_steps < 1):
            raise bad("n_steps", "a positive integer, or null for error control")
        if self.quadrature not in ("riemann-midpoint", "gauss-legendre", "trapezoid"):
            raise bad("quadrature", "riemann-midpoint, gauss-legendre or trapezoid")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown config option(s): {', '.join(unknown)}; valid options: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"config {path} must be a mapping of option: value")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


#: Fields each stage reads; used for the stage hashes. ``device`` and batch sizes are left out on
#: purpose: they change speed, not results.
def resolve_samples_per_image(config: Config, n_images: int) -> int:
    """The configured PFV samples per image, or the automatic choice for ``n_images``."""
    if config.samples_per_image:
        return int(config.samples_per_image)
    return max(1, min(16, -(-2000 // max(n_images, 1))))


STAGE_FIELDS: dict[str, list[str]] = {
    "collect": ["model", "weights", "layers", "images", "max_images", "target", "samples_per_image", "seed"],
    "concepts": ["concepts_per_channel", "min_cluster", "max_concepts", "dictionaries", "seed"],
    "decompose": ["target_rel_error", "nonnegative", "lasso_max_iter", "calibration_size", "seed"],
    "attribute": ["gig_tol", "gig_max_steps", "n_steps", "quadrature", "top_k"],
    "graph": ["graph_classes", "edges_per_node", "top_k"],
}
STAGE_ORDER = ["collect", "concepts", "decompose", "attribute", "graph"]


def stage_hash(config: Config, stage: str, upstream: str = "") -> str:
    """Hash of the settings ``stage`` depends on, chained with the upstream stage's hash."""
    data = {name: getattr(config, name) for name in STAGE_FIELDS[stage]}
    blob = json.dumps(data, sort_keys=True, default=str) + upstream
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
