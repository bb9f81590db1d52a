"""Faithfulness evaluation (method step 7): concept extraction (C-Deletion / C-Insertion) against
baselines, and inter-layer insertion / deletion against other concept orderings.

>>> from gig.evaluation import evaluate_run
>>> evaluate_run("runs/demo", n_images_extraction=100, n_images_interlayer=20)  # doctest: +SKIP

See ``docs/evaluation.md`` for the protocols and the choices made where the paper is silent.
"""

from .baselines import METHODS, ConceptBasis, reconstruction_figures
from .curves import auc, spread, step_counts, step_fractions
from .extraction import class_probability, deletion_insertion, rank_by_gig, step_outputs
from .interlayer import ORDERINGS, concept_value_readout, grad_x_coef
from .runner import evaluate_run

__all__ = [
    "METHODS", "ORDERINGS", "ConceptBasis", "auc", "class_probability", "concept_value_readout",
    "deletion_insertion", "evaluate_run", "grad_x_coef", "rank_by_gig", "reconstruction_figures", "spread",
    "step_counts", "step_fractions", "step_outputs",
]
