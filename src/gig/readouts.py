"""The scalar targets that GIG attributes and the evaluation measures, each formula written once.

A readout turns what the network produces after a replaced layer into one scalar per item and
target index:

* :class:`ClassLogit` — ``z_c``, read from the logits;
* :class:`ClassProbability` — ``softmax(z)_c``, read from the logits;
* :class:`ConceptReadout` — ``max_p ⟨x_p, v_r⟩ / ‖v_r‖``, the projection of a later layer's
  positions ``x_p`` on concept ``r`` of that layer's dictionary, maximised over positions
  (the paper's concept → concept target; :doc:`method` step 5).

``readout.layer`` names where it reads: ``None`` for the logits, or the later layer whose grid
``(M, C_b, H_b, W_b)`` :meth:`gig.hooks.ModelHandle.run_from` returns with ``read=layer``.
"""

from __future__ import annotations

import torch


class Readout:
    """Base class: ``values(out (M, ...), index (M, T) long) → (M, T)``."""

    #: where the readout reads: ``None`` = logits, else a layer name
    layer: str | None = None

    def values(self, out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def all(self, out: torch.Tensor) -> torch.Tensor:
        """Every target index at once: ``(M, n_targets)``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r})"


class ClassLogit(Readout):
    """The logit of a class: ``out`` are logits ``(M, classes)``."""

    def values(self, out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return out.gather(1, index)

    def all(self, out: torch.Tensor) -> torch.Tensor:
        return out


class ClassProbability(Readout):
    """The softmax probability of a class: ``out`` are logits ``(M, classes)``."""

    def values(self, out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return out.float().softmax(1).gather(1, index)

    def all(self, out: torch.Tensor) -> torch.Tensor:
        return out.float().softmax(1)


class ConceptReadout(Readout):
    """``max_p ⟨x_p, v_r⟩ / ‖v_r‖`` of concept ``r`` of ``vectors (K_b, C_b)`` at ``layer``."""

    def __init__(self, layer: str | None, vectors: torch.Tensor):
        self.layer = layer
        vectors = vectors.float()
        self.unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (K_b, C_b)

    def values(self, out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        unit = self.unit.to(out.device)[index]  # (M, T, C_b)
        return torch.einsum("mchw,mtc->mthw", out, unit.to(out.dtype)).flatten(2).max(2).values

    def all(self, out: torch.Tensor) -> torch.Tensor:
        unit = self.unit.to(device=out.device, dtype=out.dtype)
        return torch.einsum("mchw,kc->mkhw", out, unit).flatten(2).max(2).values


def concept_readout(grid: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``max_p ⟨x_p, v⟩ / ‖v‖`` for ``grid (M, C, H, W)`` and one vector per item ``(M, C)`` → ``(M,)``."""
    index = torch.arange(grid.shape[0], device=grid.device)[:, None]
    return ConceptReadout(None, vectors).values(grid, index)[:, 0]
