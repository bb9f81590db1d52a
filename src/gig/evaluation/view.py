"""The run as the evaluation reads it (:class:`RunView`): one place, below the protocols that
take it (:mod:`.extraction`, :mod:`.interlayer`) and the runner that makes it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..attribution import gig_for
from ..method import GIG
from ..store import RunStore
from .methods.ours import RunDictionary

if TYPE_CHECKING:
    from ..access import RunAccess
    from .settings import EvaluationPlan


class RunView:
    """The run as the evaluation reads it: the run opened read-only (:class:`~gig.access.RunAccess`:
    model, images), the model's gradient copy, the run's dictionary and codes per layer
    (:class:`RunDictionary`); ``out`` is the evaluation folder."""

    def __init__(self, access: RunAccess, plan: EvaluationPlan, out: Path):
        self.access, self.plan, self.out = access, plan, out
        self.store: RunStore = access.store
        self.config = access.store.config
        self.handle = access.handle
        #: batch norms folded, channels-last: for the many gradient evaluations of GIG and the
        #: deletion / insertion passes (the same function, checked; as ``gig ablate`` runs on it)
        self.fast = access.handle.for_gradients(plan.layers)
        self.run_bases = {layer: RunDictionary(str(self.store.root), layer).fit() for layer in plan.layers}

    def pixels(self, infos: list[dict]) -> torch.Tensor:
        """Preprocessed images ``(n, 3, S, S)`` of the run's records ``infos``, in their order."""
        return self.access.run_pixels([i["image_id"] for i in infos])

    def gig(self, layer: str, V: torch.Tensor, bias: torch.Tensor | None = None) -> GIG:
        """GIG from the concepts ``V (K, C)`` of ``layer`` with the plan's step settings; ``bias
        (C,)``: the basis's decoder bias, where its paths start (None: at 0)."""
        return gig_for(self.fast, layer, V, self.plan, bias=bias)
