"""Task Arithmetic (Ilharco et al., 2023): θ = θ0 + λ Σt τt, for one parameter."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def task_vector_sum(task_vectors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σt τt, accumulated one task at a time so only one τ is alive besides the sum."""
    total = None
    for tau in task_vectors:
        total = tau.clone() if total is None else total.add_(tau)
    if total is None:
        raise ValueError("no task vectors to sum")
    return total


def apply_task_vector(
    pretrained: torch.Tensor, task_vector: torch.Tensor, scaling_factor: float
) -> torch.Tensor:
    """θ0 + λ·τ in a new tensor of θ0's dtype; θ0 itself is never modified."""
    compute = torch.promote_types(pretrained.dtype, torch.float32)
    merged = pretrained.to(compute) + scaling_factor * task_vector.to(compute)
    return merged.to(pretrained.dtype)
