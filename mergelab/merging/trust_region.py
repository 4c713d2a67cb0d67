"""Trust-region merging (TATR, openreview q3ztjJRQuJ), the per-parameter tensor math.

Ω = Σi Σj≠i ḡi ⊙ |τj| measures how much task j's update moves a coordinate that task i's
loss is sensitive to. Per element it equals (Σi ḡi)(Σj |τj|) − Σi ḡi |τi|, one pass over
the tasks instead of T² products; with ḡi = |τi| (zero-shot) it is (Σ|τ|)² − Σ τ².
Coordinates with Ω at or above the threshold (a quantile over the whole model) are
dropped from every task vector before summing.

Inputs are stacked over tasks, [T, *shape]. ``scratch``, a tensor of the same shape, is
used for the intermediate |τ| instead of allocating one.
"""

from __future__ import annotations

import torch


def _abs(task_vectors: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    return task_vectors.abs() if scratch is None else torch.abs(task_vectors, out=scratch)


def conflict(
    gradients: torch.Tensor, task_vectors: torch.Tensor, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """Ω of one parameter from ḡ and τ, both [T, *shape].

    Clamped at 0: Ω is a sum of non-negative products, and the subtraction can only
    undershoot by rounding.
    """
    magnitude = _abs(task_vectors, scratch)
    total = gradients.sum(0).mul_(magnitude.sum(0))
    return total.sub_(magnitude.mul_(gradients).sum(0)).clamp_(min=0)


def zero_shot_conflict(
    task_vectors: torch.Tensor, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """Ω of one parameter with ḡi = |τi|: (Σ|τ|)² − Σ τ², from τ [T, *shape]."""
    magnitude = _abs(task_vectors, scratch)
    l1 = magnitude.sum(0)
    return l1.mul_(l1).sub_(magnitude.mul_(magnitude).sum(0)).clamp_(min=0)


def trust_region_mask(omega: torch.Tensor, threshold: float) -> torch.Tensor:
    """Coordinates kept: Ω strictly below the threshold (ties at the threshold are dropped)."""
    return omega < threshold
