"""gig — dataset-wide mechanistic interpretability of image models with Generalized Integrated
Gradients (Kim et al., "Decompose the model", arXiv 2409.01610).

Stages (one module each): :mod:`gig.collect` (PFVs), :mod:`gig.erf` (effective receptive
fields), :mod:`gig.concepts` (bisecting k-means), :mod:`gig.decompose` (Lasso),
:mod:`gig.attribution` (GIG), :mod:`gig.graph` (causal concept graphs), orchestrated by
:mod:`gig.pipeline` over a :mod:`gig.store` run directory.
"""

__version__ = "0.1.0"
