"""Faithfulness evaluation (method step 7): concept extraction (C-Deletion / C-Insertion) against
other concept bases, and inter-layer insertion / deletion against other concept orderings.

>>> from gig.evaluation import EvaluationSettings, evaluate_run
>>> evaluate_run("runs/demo", EvaluationSettings(extraction_images=100, interlayer_images=20))  # doctest: +SKIP

Concept bases share one contract (:class:`ConceptBasis`: ``fit``, ``transform``,
``components_``, an optional decoder bias ``bias_``, ``save``/``load``) and are taken from a registry by name
(:func:`registered`, :func:`register_basis`; ``user:PATH`` for a basis of one's own). See
``docs/evaluation.md`` for the protocols and the choices made where the paper is silent.
"""

from .bases import ConceptBasis, LayerContext, basis_class, reconstruction_figures, register_basis, registered
from .curves import auc, spread, step_counts, step_fractions
from .extraction import class_probability, deletion_insertion, rank_by_gig, step_outputs
from .interlayer import ORDERINGS, concept_value_readout, grad_x_coef
from .runner import evaluate_run
from .settings import METHODS, EvaluationPlan, EvaluationSettings

__all__ = [
    "METHODS",
    "ORDERINGS",
    "ConceptBasis",
    "EvaluationPlan",
    "EvaluationSettings",
    "LayerContext",
    "auc",
    "basis_class",
    "class_probability",
    "concept_value_readout",
    "deletion_insertion",
    "evaluate_run",
    "grad_x_coef",
    "rank_by_gig",
    "reconstruction_figures",
    "register_basis",
    "registered",
    "spread",
    "step_counts",
    "step_fractions",
    "step_outputs",
]
