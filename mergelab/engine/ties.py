"""TIES over a whole model pool: each task's trimming threshold, the majority sign and the
merged task vector (the per-parameter rule is in :mod:`mergelab.merging.ties`).

Each task keeps its own top share over the whole model, so its threshold is known only
after every parameter was seen. Plain task vectors on the CPU are merged in one pass
from the models' rows, their thresholds placed by a sample
(:func:`~mergelab.engine.ties_blocks.banded_ties_vector`); where that does not settle
them, or the task vectors pass through transforms (DARE's drop, the trust region's mask)
or lie on another device, two passes over whole parameters find them and merge:

1. each task's magnitudes are counted per bucket (:class:`MagnitudeSelect`), which
   locates the bucket, 2^-12 of a value wide, that holds its threshold;
2. the merge: an entry above its task's bucket is kept, one below dropped; a coordinate
   with an entry inside its task's bucket is undecided, and its entries are held
   (:mod:`mergelab.engine.ties_undecided`; 0.05 % of the coordinates of bench_merge.py's
   eight ViT-B/32 task vectors). They pin each task's exact threshold; the undecided
   coordinates are then merged with it.

The majority sign (elected where a coordinate's trimmed sum is exactly 0, with entries
not all 0: common, as τ = θt − θ0 takes few distinct values at fine-tuning's scale) is
the sign of every coordinate's vote, known after pass 2; such coordinates are held
back too and merged last. Where the held entries would exceed their budget (many equal
magnitudes, e.g. quantised models), a second counting pass pins the thresholds instead,
the merge pass runs again, and the parameters with coordinates still waiting for the
majority are read once more: memory stays flat, at a pass or two more.

Every pass walks the task vectors whole, parameter by parameter (:class:`TaskVectors`),
through its transforms, on its device; on the CPU the counting and the merge are
compiled kernels (:mod:`mergelab.merging.ties_kernels`), elsewhere the torch rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from mergelab.engine import ties_undecided
from mergelab.engine.parameterwise import TaskVectors, check_merged_finite
from mergelab.engine.pool import CheckpointSource, ModelPool
from mergelab.engine.streaming import StateDict, scaled_models
from mergelab.engine.ties_blocks import banded_ties_vector
from mergelab.engine.ties_undecided import (
    Held,
    hold,
    in_ranges,
    merge_part,
    settle,
)
from mergelab.engine.workspace import BlockWorkers, empty
from mergelab.merging.compiled import kernels
from mergelab.merging.quantile import MagnitudeSelect
from mergelab.merging.ties import check_keep_fraction, check_task_count, ties_rank


def _whole_parameters(task_vectors: TaskVectors, desc: str) -> Iterator[torch.Tensor]:
    """τ of every merged parameter, whole, as [T, n]."""
    tasks = len(task_vectors.pool.tasks)
    return (taus.reshape(tasks, -1) for _, taus in task_vectors.walk(desc))


def _count_magnitudes(select: MagnitudeSelect, parts: Iterable[torch.Tensor]) -> None:
    """Pass 1: every task's magnitudes counted per bucket, over τ in parts [T, n]."""
    counts = select.counts.numpy()
    for flat in parts:
        if flat.device.type == "cpu" and flat.dtype == torch.float32:
            kernels("magnitude_kernels").add_magnitude_counts(flat.contiguous().numpy(), counts)
        else:
            select.observe(flat)
    select.locate()


def ties_thresholds(task_vectors: TaskVectors, keep_fraction: float) -> list[float]:
    """Each task's smallest kept magnitude when it keeps its top share over the whole
    model, by two counting passes."""
    pool = task_vectors.pool
    total = pool.num_merged_params
    rank = ties_rank(keep_fraction, total)
    if rank < 0:
        return [-math.inf] * len(pool.tasks)
    select = MagnitudeSelect(rank, total, len(pool.tasks))
    _count_magnitudes(select, _whole_parameters(task_vectors, "TIES: magnitudes"))
    return _pinned_thresholds(select, _whole_parameters(task_vectors, "TIES: thresholds"))


def _pinned_thresholds(select: MagnitudeSelect, parts: Iterable[torch.Tensor]) -> list[float]:
    """The second counting pass: each task's exact threshold inside its bucket."""
    for flat in parts:
        select.observe_low(flat)
    return select.values()


class _MergePass:
    """One pass of the rule, the majority pending, over every parameter: δ (NaN where a
    coordinate is undecided), the votes of the decided coordinates, the parameters with
    undecided ones and, within ``budget`` elements, their values (:attr:`held`; None
    beyond the budget)."""

    def __init__(self, task_vectors, thresholds, undecided_from, disjoint_mean, budget):
        pool = task_vectors.pool
        tasks = len(pool.tasks)
        self.delta: StateDict = {}
        self.votes = 0
        self.open_keys: list[str] = []
        self.held: list[Held] | None = []
        held_entries = 0
        for key, taus in task_vectors.walk("TIES: merge"):
            flat = taus.reshape(tasks, -1)
            part = merge_part(flat, thresholds, undecided_from, disjoint_mean=disjoint_mean)
            self.votes += part.votes
            spec = pool.specs[key]
            out = empty(spec.shape, pool.compute_dtype(key))
            self.delta[key] = out.copy_(part.merged.reshape(spec.shape))
            index = torch.isnan(part.merged).nonzero().reshape(-1)
            if not index.numel():
                continue
            self.open_keys.append(key)
            if self.held is not None:  # the columns gathered first: τ may be on a GPU
                taus = flat[:, index].cpu().contiguous().numpy()
                part = hold(key, taus, np.arange(index.numel()), 0, undecided_from, thresholds)
                self.held.append(part._replace(index=index.cpu()))
                held_entries += self.held[-1].values.numel()
                if held_entries > budget:
                    self.held = None


def ties_merged_vector(
    task_vectors: TaskVectors, keep_fraction: float = 0.2, disjoint_mean: bool = False
) -> StateDict:
    """The TIES-merged task vector of every parameter (θ = θ0 + λ·δ). Plain task vectors
    on the CPU take the block passes of :func:`~mergelab.engine.ties_blocks.banded_ties_vector`
    where its sampled thresholds hold; otherwise, or when they do not, whole parameters."""
    check_keep_fraction(keep_fraction)
    pool = task_vectors.pool
    check_task_count(len(pool.tasks))
    if not task_vectors.transforms and task_vectors.device.type == "cpu":
        with BlockWorkers() as workers:
            delta = banded_ties_vector(pool, keep_fraction, disjoint_mean, workers)
        if delta is not None:
            return delta
    tasks, total = len(pool.tasks), pool.num_merged_params
    budget = ties_undecided.UNDECIDED_BUDGET * total
    rank = ties_rank(keep_fraction, total)
    if rank < 0:  # everything kept
        thresholds = [-math.inf] * tasks
        merge = _MergePass(task_vectors, thresholds, thresholds, disjoint_mean, budget)
    else:
        select = MagnitudeSelect(rank, total, tasks)
        _count_magnitudes(select, _whole_parameters(task_vectors, "TIES: magnitudes"))
        lows, highs = select.bounds()
        merge = _MergePass(task_vectors, highs, lows, disjoint_mean, budget)
        if merge.held is None:
            merge = None  # its δ goes before the next pass makes another
            parts = _whole_parameters(task_vectors, "TIES: thresholds")
            thresholds = _pinned_thresholds(select, parts)
            merge = _MergePass(task_vectors, thresholds, thresholds, disjoint_mean, budget)
        else:
            inside = in_ranges(merge.held, tasks)
            thresholds = [select.resolve(task, values) for task, values in enumerate(inside)]
    if merge.held is not None:
        settle(merge.delta, merge.held, tasks, thresholds, merge.votes, disjoint_mean)
    else:  # the held values over budget: the parameters waiting for the majority, read again
        majority = (merge.votes > 0) - (merge.votes < 0)
        for key in merge.open_keys:
            flat = task_vectors(key).reshape(tasks, -1)
            merged = merge_part(flat, thresholds, thresholds, majority, disjoint_mean).merged
            merge.delta[key].view(-1).copy_(merged)
    for key, merged in merge.delta.items():
        check_merged_finite(key, merged)
    return merge.delta


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
