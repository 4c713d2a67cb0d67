"""Task Arithmetic (Ilharco et al., 2023): θ = θ0 + λ Σt τt, for one parameter."""

from __future__ import annotations

import numpy as np
import torch


def task_vector_sum(task_vectors: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Σt τt from task vectors stacked as [T, *shape] (into ``out`` if given), added task
    by task in the order the rule is written (``torch.sum`` over dim 0 may regroup the
    additions for some widths, so its last bits could differ between the methods that
    share this sum). In numpy, which starts no threads of its own, so that
    :class:`~mergelab.engine.workspace.BlockWorkers` threads can sum blocks side by side."""
    taus = task_vectors.numpy()
    total = np.empty(taus.shape[1:], taus.dtype) if out is None else out.numpy()
    np.copyto(total, taus[0])
    with np.errstate(over="ignore", invalid="ignore"):  # the callers refuse a sum not finite
        for tau in taus[1:]:
            np.add(total, tau, out=total)
    return torch.from_numpy(total) if out is None else out


def ordered_sum(task_vectors: torch.Tensor) -> torch.Tensor:
    """Σt τt of τ stacked as [T, *shape] on any device (a new tensor), added task by task
    as :func:`task_vector_sum` adds them, so both give the same bits."""
    total = task_vectors[0].clone()
    for tau in task_vectors[1:]:
        total += tau
    return total


def apply_task_vector(
    pretrained: torch.Tensor,
    task_vector: torch.Tensor,
    scaling_factor: float,
    out: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """θ0 + λ·τ in θ0's dtype, or in ``dtype`` (computed in float32 or wider, rounded once).

    ``out`` may be ``task_vector`` or ``pretrained`` itself, to compute in its storage
    (overwriting it) when its dtype allows; otherwise the result is a new tensor. Either
    way it is one multiply, then one add, each rounding once, so results agree to the bit
    (torch.add(alpha=) may fuse them differently in vectorised and scalar loops).
    """
    compute = torch.promote_types(pretrained.dtype, torch.float32)
    dtype = pretrained.dtype if dtype is None else dtype
    scaled = task_vector if scaling_factor == 1 else None  # x·1 is x: skip the pass
    if dtype != pretrained.dtype:
        out = None
    if out is task_vector and task_vector.dtype == pretrained.dtype == compute:
        merged = task_vector if scaled is not None else task_vector.mul_(scaling_factor)
        return merged.add_(pretrained)
    if scaled is None:
        scaled = task_vector.to(compute) * scaling_factor
    if out is pretrained and pretrained.dtype == compute:
        return pretrained.add_(scaled)
    return (scaled.to(compute) + pretrained.to(compute)).to(dtype)
