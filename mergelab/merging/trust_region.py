"""Trust-region merging (TATR, openreview q3ztjJRQuJ), the per-parameter tensor math.

Ω = Σi Σj≠i ḡi ⊙ |τj| measures how much task j's update moves a coordinate that task i's
loss is sensitive to. Per element it equals (Σi ḡi)(Σj |τj|) − Σi ḡi |τi|, one pass over
the tasks instead of T² products. Coordinates with Ω at or above the threshold (a
quantile over the whole model) are dropped from every task vector before summing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def conflict(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Ω from (ḡi, τi) pairs of one parameter, streamed task by task.

    In zero-shot mode pass ḡi = |τi|. The result is clamped at 0: Ω is a sum of
    non-negative products, and the subtraction can only undershoot by rounding.
    """
    grad_sum = abs_tau_sum = diagonal = None
    for grad, tau in pairs:
        abs_tau = tau.abs()
        if grad_sum is None:
            grad_sum, abs_tau_sum, diagonal = grad.clone(), abs_tau, grad * abs_tau
        else:
            grad_sum.add_(grad)
            abs_tau_sum.add_(abs_tau)
            diagonal.addcmul_(grad, abs_tau)
    if grad_sum is None:
        raise ValueError("no tasks given")
    return grad_sum.mul_(abs_tau_sum).sub_(diagonal).clamp_(min=0)


def trust_region_mask(omega: torch.Tensor, threshold: float) -> torch.Tensor:
    """Coordinates kept: Ω strictly below the threshold (ties at the threshold are dropped)."""
    return omega < threshold
