"""TIES merging (Yadav et al., NeurIPS 2023) as the option for TALL's τMTL, per parameter.

Trim: each τt keeps the entries whose magnitude is at least its own threshold (the
value that leaves the top share of the whole model, found by the caller with
:class:`~mergelab.merging.quantile.RadixSelect`). Elect: the sign of the sum of the
trimmed vectors, + where that sum is exactly 0. Disjoint sum: add the trimmed entries
that agree with the elected sign.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.merging.quantile import quantile_rank


def ties_rank(keep_fraction: float, n: int) -> int:
    """0-based rank of the smallest magnitude kept when keeping the top share of n values.

    As the TIES reference code: k = ⌊share·n⌋ largest kept, entries ≥ the (n−k)-th
    smallest. −1 when everything is kept.
    """
    return n - quantile_rank(keep_fraction, n) - 1


def ties_vector(task_vectors: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """The TIES-merged task vector of one parameter from τ stacked as [T, *shape]."""
    limits = torch.tensor(thresholds, dtype=task_vectors.dtype)
    limits = limits.reshape(-1, *([1] * (task_vectors.dim() - 1)))
    trimmed = torch.where(task_vectors.abs() >= limits, task_vectors, 0)
    elected = torch.where(trimmed.sum(0) >= 0, 1, -1).to(trimmed.dtype)
    agree = torch.sign(trimmed) == elected
    return torch.where(agree, trimmed, 0).sum(0)
