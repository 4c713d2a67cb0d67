"""TIES over a whole model pool: each task's trimming threshold, the majority sign and the
merged task vector (the per-parameter rule is in :mod:`mergelab.merging.ties`).

The thresholds are each task's own top share over the whole model, found exactly by a
two-pass radix select; the majority sign takes one more pass; the merge one more. Every
pass walks the task vectors whole parameter by parameter (:class:`TaskVectors`), through
its transforms (DARE's drop, the trust region's mask), on its device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import torch

from mergelab.engine.parameterwise import TaskVectors, merged_vector
from mergelab.engine.pool import CheckpointSource, ModelPool
from mergelab.engine.streaming import StateDict, scaled_models
from mergelab.merging.quantile import RadixSelect
from mergelab.merging.ties import check_keep_fraction, sign_votes, ties_rank, ties_vector


def ties_thresholds(task_vectors: TaskVectors, keep_fraction: float) -> list[float]:
    """Each task's smallest kept magnitude when it keeps its top share over the whole model."""
    pool = task_vectors.pool
    total = pool.num_merged_params
    rank = ties_rank(keep_fraction, total)
    if rank < 0:
        return [-math.inf] * len(pool.tasks)
    selects = [RadixSelect(rank, total) for _ in pool.tasks]
    for desc in ("TIES: magnitudes", "TIES: thresholds"):
        for _, taus in task_vectors.walk(desc):
            for select, tau in zip(selects, taus, strict=True):
                select.observe(tau.abs())
        if selects[0].bucket is None:
            for select in selects:
                select.next_pass()
    return [select.value for select in selects]


def ties_majority(task_vectors: TaskVectors, thresholds: list[float]) -> int:
    """The sign of Σ over every merged coordinate of sign(Σt trimmed τt): the sign elected
    where a coordinate's trimmed sum is exactly 0 (one more pass over the models)."""
    votes = 0
    for _, taus in task_vectors.walk("TIES: majority sign"):
        votes += sign_votes(taus, thresholds)
    return (votes > 0) - (votes < 0)


def ties_merged_vector(
    task_vectors: TaskVectors, keep_fraction: float = 0.2, disjoint_mean: bool = False
) -> StateDict:
    """The TIES-merged task vector of every parameter (θ = θ0 + λ·δ)."""
    check_keep_fraction(keep_fraction)
    thresholds = ties_thresholds(task_vectors, keep_fraction)
    majority = ties_majority(task_vectors, thresholds)
    rule = functools.partial(
        _ties_parameter, thresholds=thresholds, majority=majority, disjoint_mean=disjoint_mean
    )
    return merged_vector(task_vectors, rule, desc="TIES: merge")


def _ties_parameter(
    key: str,
    task_vectors: torch.Tensor,
    thresholds: list[float],
    majority: int,
    disjoint_mean: bool,
) -> torch.Tensor:
    return ties_vector(task_vectors, thresholds, majority, disjoint_mean)


def ties(
    pretrained: CheckpointSource,
    finetuned: Mapping[str, CheckpointSource],
    scaling_factor: float | Sequence[float] = 0.3,
    keep: float = 0.2,
    disjoint_mean: bool = False,
    device: str | torch.device | None = None,
    output=None,
    overwrite: bool = False,
):
    """TIES: θ = θ0 + λ·δ, δ the disjoint sum (or mean) of the trimmed task vectors that
    agree with the elected sign. A list of λ gives a list of independent models;
    ``output`` as in task_arithmetic; ``device``: where the rule runs (default: CUDA
    when present)."""
    check_keep_fraction(keep)
    pool = ModelPool(pretrained, finetuned)
    pool.require_tasks(2, "TIES")
    return scaled_models(
        pool,
        lambda: ties_merged_vector(TaskVectors(pool, device), keep, disjoint_mean),
        scaling_factor,
        output,
        overwrite,
        desc="TIES: models",
    )
