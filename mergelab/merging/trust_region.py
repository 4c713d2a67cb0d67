"""Trust-region merging (TATR, openreview q3ztjJRQuJ), the per-parameter tensor math.

Ω = Σi Σj≠i ḡi ⊙ |τj| measures how much task j's update moves a coordinate that task i's
loss is sensitive to. Per element it equals (Σi ḡi)(Σj |τj|) − Σi ḡi |τi|, one pass over
the tasks instead of T² products; with ḡi = |τi| (zero-shot) it is (Σ|τ|)² − Σ τ².
Coordinates with Ω at or above the threshold (a quantile over the whole model) are
dropped from every task vector before summing.

Inputs are stacked over tasks, [T, *shape], on the CPU. ``scratch``, a tensor of the
same shape, is used for the intermediate |τ| instead of allocating one. The arithmetic
runs in numpy, which starts no threads of its own, so that
:class:`~mergelab.engine.workspace.BlockWorkers` threads can compute blocks side by side.
"""

from __future__ import annotations

import numpy as np
import torch


def _magnitude(task_vectors: torch.Tensor, scratch: torch.Tensor | None) -> np.ndarray:
    return np.abs(task_vectors.numpy(), out=None if scratch is None else scratch.numpy())


def conflict(
    gradients: torch.Tensor, task_vectors: torch.Tensor, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """Ω of one parameter from ḡ and τ, both [T, *shape] (a new tensor).

    Clamped at 0: Ω is a sum of non-negative products, and the subtraction can only
    undershoot by rounding.
    """
    magnitude = _magnitude(task_vectors, scratch)
    grads = gradients.numpy()
    with np.errstate(invalid="ignore", over="ignore"):  # callers check Ω is finite
        total = np.asarray(grads.sum(0))  # an array even where Ω is a single value
        total *= magnitude.sum(0)
        total -= np.multiply(magnitude, grads, out=magnitude).sum(0)
    return torch.from_numpy(np.maximum(total, 0, out=total))


def zero_shot_conflict(
    task_vectors: torch.Tensor, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """Ω of one parameter with ḡi = |τi|: (Σ|τ|)² − Σ τ², from τ [T, *shape] (a new tensor)."""
    magnitude = _magnitude(task_vectors, scratch)
    with np.errstate(invalid="ignore", over="ignore"):  # callers check Ω is finite
        total = np.asarray(magnitude.sum(0))  # an array even where Ω is a single value
        total *= total
        total -= np.multiply(magnitude, magnitude, out=magnitude).sum(0)
    return torch.from_numpy(np.maximum(total, 0, out=total))


def trust_region_mask(omega: torch.Tensor, threshold: float) -> torch.Tensor:
    """Coordinates kept: Ω strictly below the threshold (ties at the threshold are dropped)."""
    return omega < threshold
