"""gig — dataset-wide mechanistic interpretability of image models with Generalized Integrated
Gradients (Kim et al., "Decompose the model", arXiv 2409.01610).

Stages (one module each): :mod:`gig.collect` (PFVs), :mod:`gig.erf` (effective receptive
fields), :mod:`gig.concepts` (bisecting k-means; other bases in :mod:`gig.basis`),
:mod:`gig.decompose` (OMP or Lasso), :mod:`gig.attribution` (the GIG walk; the method itself in
:mod:`gig.method`), :mod:`gig.graph` (causal concept graphs), orchestrated by
:mod:`gig.pipeline` over a :mod:`gig.store` run directory (every artefact's path and reader in
:mod:`gig.artefacts`). A finished run: ``gig.open(RUN)``
(:mod:`gig.session`: concepts, new images explained, graphs, ablations, labels, from a notebook).
"""

__version__ = "0.7.2"

__all__ = [
    "Config",
    "Pipeline",
    "GIG",
    "ModelHandle",
    "load_model",
    "wrap_module",
    "open_source",
    "open",
    "Run",
    "__version__",
]

_EXPORTS = {
    "Config": "gig.config",
    "Pipeline": "gig.pipeline",
    "GIG": "gig.method",
    "ModelHandle": "gig.hooks",
    "load_model": "gig.models",
    "wrap_module": "gig.models",
    "open_source": "gig.images",
    "Run": "gig.session",
}


def open(run_dir, model=None, source=None):  # noqa: A001 - gig.open(RUN), as the notebook API reads
    """Open a finished run: a :class:`gig.session.Run` (concepts, explain, graph, ablate, label)."""
    from .session import open_run

    return open_run(run_dir, model=model, source=source)


def __getattr__(name: str):
    # Lazy, so that `import gig` (and the CLI's --help) does not import torch.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gig' has no attribute {name!r}")
