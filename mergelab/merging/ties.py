"""TIES merging (Yadav et al., NeurIPS 2023), per parameter: the method of its own and TALL's
TIES-merged τMTL.

Trim: each τt keeps the entries whose magnitude is at least its own threshold (the
value that leaves the top share of the whole model, found by the caller with
:class:`~mergelab.merging.quantile.MagnitudeSelect`). Elect: the sign of the sum of the
trimmed vectors; where that sum is exactly 0, the "majority" sign: the sign of the sum of
the elected signs over the whole model (:attr:`TiesPart.votes`, summed by the caller over
every parameter), as the TIES reference code's ``resolve_zero_signs`` (github
prateeky2806/ties-merging, via nik-dim/tall_masks src/utils/ties_utils.py). Disjoint sum:
add the trimmed entries that agree with the elected sign (positive entries where it is
+, negative ones elsewhere, as the reference code's ``disjoint_merge``). The TALL code
and FusionBench sum them ("dis-sum", with λ ≈ 0.3 as Task Arithmetic); the TIES paper's
default divides by how many agree ("dis-mean", with λ ≈ 1): ``disjoint_mean``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from mergelab.errors import BadValue
from mergelab.merging.quantile import quantile_rank

# the most task vectors TIES merges: the entries it sets aside name their task in 16 bits,
# and its kernels count a coordinate's positive and negative entries in 16 bits each
MOST_TASKS = (1 << 15) - 1


def check_task_count(tasks: int) -> None:
    if tasks > MOST_TASKS:
        raise BadValue(f"TIES merges at most {MOST_TASKS} task vectors, got {tasks}")


def check_keep_fraction(keep_fraction: float) -> None:
    if not 0 < keep_fraction <= 1:
        raise BadValue(
            f"TIES keep (share of each task vector kept) must be in (0, 1], got {keep_fraction}"
        )


def ties_rank(keep_fraction: float, n: int) -> int:
    """0-based rank of the smallest magnitude kept when keeping the top share of n values.

    As the TIES reference code: k = ⌊share·n⌋ largest kept, entries ≥ the (n−k)-th
    smallest. −1 when everything is kept.
    """
    return n - quantile_rank(keep_fraction, n) - 1


# a ``majority`` not known yet: coordinates whose trimmed sum is exactly 0 (with entries
# not all 0) are left undecided, to be merged once the votes of every coordinate are in
PENDING = 2


class TiesPart(NamedTuple):
    """One parameter's share of a TIES merge (or of a batch of its coordinates)."""

    merged: torch.Tensor  # the merged task vector; NaN where a coordinate is undecided
    votes: int  # Σ over the decided coordinates of sign(Σt trimmed τt)
    sign_ties: int  # decided coordinates whose trimmed sum is exactly 0 with entries not all 0


def _limits(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    limits = torch.tensor(values, dtype=torch.float32, device=like.device)
    return limits.reshape(-1, *([1] * (like.dim() - 1)))


def trim(task_vectors: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """τ stacked as [T, *shape] with each task's entries whose float32 magnitude is below
    its threshold set to 0 (the thresholds are float32 magnitudes, as found by
    :class:`~mergelab.merging.quantile.MagnitudeSelect`)."""
    kept = task_vectors.abs().to(torch.float32) >= _limits(thresholds, task_vectors)
    return torch.where(kept, task_vectors, 0)


def ties_vector(
    task_vectors: torch.Tensor,
    thresholds: Sequence[float],
    majority: int = 1,
    disjoint_mean: bool = False,
    undecided_from: Sequence[float] | None = None,
) -> TiesPart:
    """The TIES-merged task vector of τ stacked as [T, *shape]; ``majority`` is the sign
    (+1, −1 or 0) elected where the trimmed sum is exactly 0. ``disjoint_mean``: the
    agreeing entries' mean (0 where none agree) instead of their sum.

    ``undecided_from``: while a task's threshold is known only to lie in
    [undecided_from, threshold), its entries in that range may or may not be kept: a
    coordinate with such an entry is undecided, NaN in ``merged`` and left out of the
    counts (the caller merges it again once the thresholds are exact). The compiled CPU
    kernel :func:`mergelab.merging.ties_kernels.ties_merge` computes the same."""
    magnitudes = task_vectors.abs().to(torch.float32)
    kept = magnitudes >= _limits(thresholds, task_vectors)
    trimmed = torch.where(kept, task_vectors, 0)
    total = trimmed.sum(0)
    positive = (total > 0) | ((total == 0) & (majority > 0))
    agree = torch.where(positive, trimmed > 0, trimmed < 0)
    merged = torch.where(agree, trimmed, 0).sum(0)
    if disjoint_mean:
        merged /= agree.sum(0).clamp(min=1)
    tied = (total == 0) & (trimmed != 0).any(0)
    decided = ~tied if majority == PENDING else torch.ones_like(tied)
    if undecided_from is not None:
        maybe = (magnitudes >= _limits(undecided_from, task_vectors)) & ~kept
        decided &= ~maybe.any(0)
    merged = torch.where(decided, merged, torch.nan)
    votes = int(torch.sign(total)[decided].sum())
    return TiesPart(merged, votes, int((tied & decided).sum()))
