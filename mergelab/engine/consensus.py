"""Consensus merging without validation data: every task's TALL mask at one λ."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mergelab.engine.pool import CheckpointSource
from mergelab.engine.tall_masks import TallMasks
from mergelab.errors import BadValue


def consensus_merge(
    pretrained: CheckpointSource,
    finetuned: Mapping[str, CheckpointSource],
    k: int = 2,
    scaling_factor: float | Sequence[float] = 0.3,
    tall_lambda: float = 0.6,
    output=None,
    overwrite: bool = False,
):
    """Consensus merging with every task's mask at one λ, without validation data.

    The default λ = 0.6 is FusionBench's default ``tall_mask_lambda``; choose per-task λ
    on validation with :meth:`TallMasks.choose_lambdas` and :meth:`TallMasks.consensus`
    where data is available.
    """
    if k < 0:
        raise BadValue(f"consensus k must be ≥ 0, got {k}")
    masks = TallMasks.build(pretrained, finetuned, lambdas=[tall_lambda])
    fixed = dict.fromkeys(masks.tasks, tall_lambda)
    return masks.consensus(pretrained, k, scaling_factor, fixed, output, overwrite)
