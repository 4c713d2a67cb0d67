"""TIES merging (Yadav et al., NeurIPS 2023), per parameter: the method of its own and TALL's
TIES-merged τMTL.

Trim: each τt keeps the entries whose magnitude is at least its own threshold (the
value that leaves the top share of the whole model, found by the caller with
:class:`~mergelab.merging.quantile.RadixSelect`). Elect: the sign of the sum of the
trimmed vectors; where that sum is exactly 0, the "majority" sign: the sign of the sum of
the elected signs over the whole model (:func:`sign_votes`, summed by the caller over
every parameter), as the TIES reference code's ``resolve_zero_signs`` (github
prateeky2806/ties-merging, via nik-dim/tall_masks src/utils/ties_utils.py). Disjoint sum:
add the trimmed entries that agree with the elected sign (positive entries where it is
+, negative ones elsewhere, as the reference code's ``disjoint_merge``). The TALL code
and FusionBench sum them ("dis-sum", with λ ≈ 0.3 as Task Arithmetic); the TIES paper's
default divides by how many agree ("dis-mean", with λ ≈ 1): ``disjoint_mean``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.merging.quantile import quantile_rank


def check_keep_fraction(keep_fraction: float) -> None:
    if not 0 < keep_fraction <= 1:
        raise ValueError(
            f"TIES keep (share of each task vector kept) must be in (0, 1], got {keep_fraction}"
        )


def ties_rank(keep_fraction: float, n: int) -> int:
    """0-based rank of the smallest magnitude kept when keeping the top share of n values.

    As the TIES reference code: k = ⌊share·n⌋ largest kept, entries ≥ the (n−k)-th
    smallest. −1 when everything is kept.
    """
    return n - quantile_rank(keep_fraction, n) - 1


def trim(task_vectors: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """τ stacked as [T, *shape] with each task's entries below its threshold set to 0."""
    limits = torch.tensor(thresholds, dtype=task_vectors.dtype, device=task_vectors.device)
    limits = limits.reshape(-1, *([1] * (task_vectors.dim() - 1)))
    return torch.where(task_vectors.abs() >= limits, task_vectors, 0)


def sign_votes(task_vectors: torch.Tensor, thresholds: Sequence[float]) -> int:
    """Σ over the coordinates of one parameter of sign(Σt trimmed τt): the sign of its
    sum over all parameters is the majority sign."""
    return int(torch.sign(trim(task_vectors, thresholds).sum(0)).sum())


def ties_vector(
    task_vectors: torch.Tensor,
    thresholds: Sequence[float],
    majority: int = 1,
    disjoint_mean: bool = False,
) -> torch.Tensor:
    """The TIES-merged task vector of one parameter from τ stacked as [T, *shape];
    ``majority`` is the sign (+1, −1 or 0) elected where the trimmed sum is exactly 0.
    ``disjoint_mean``: the agreeing entries' mean (0 where none agree) instead of their sum."""
    trimmed = trim(task_vectors, thresholds)
    total = trimmed.sum(0)
    positive = (total > 0) | ((total == 0) & (majority > 0))
    agree = torch.where(positive, trimmed > 0, trimmed < 0)
    merged = torch.where(agree, trimmed, 0).sum(0)
    if disjoint_mean:
        merged /= agree.sum(0).clamp(min=1)
    return merged
