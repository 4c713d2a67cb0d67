"""TIES over a whole model pool: each task's trimming threshold, the majority sign and the
merged task vector (the per-parameter rule is in :mod:`mergelab.merging.ties`).

Each task keeps its own top share over the whole model, so its threshold is known only
after every parameter was seen. Two passes over the models find it and merge:

1. each task's magnitudes are counted per bucket (:class:`MagnitudeSelect`), which
   locates the bucket, 2^-12 of a value wide, that holds its threshold;
2. the merge: an entry above its task's bucket is kept, one below dropped; a coordinate
   with an entry inside its task's bucket is undecided, and its T values are set aside
   (0.05 % of the coordinates of bench_merge.py's eight ViT-B/32 task vectors). They
   pin each task's exact threshold; the undecided coordinates are then merged with it.

The majority sign (elected where a coordinate's trimmed sum is exactly 0, with entries
not all 0: common, as τ = θt − θ0 takes few distinct values at fine-tuning's scale) is
the sign of every coordinate's vote, known after pass 2; such coordinates are held
back too and merged last. Where the held values would exceed :data:`UNDECIDED_BUDGET`
(many equal magnitudes, e.g. quantised models), a second counting pass pins the
thresholds instead, the merge pass runs again, and the parameters with coordinates
still waiting for the majority are read once more: memory stays flat, at a pass or two
more. (ViT-B/32, eight tasks, scripts/bench_merge.py: 3.7 s against 28 s for four
passes of torch operations.)

Every pass walks the task vectors whole, parameter by parameter (:class:`TaskVectors`),
through its transforms (DARE's drop, the trust region's mask), on its device; on the CPU
the counting and the merge are compiled kernels (:mod:`mergelab.merging.ties_kernels`),
elsewhere the torch rule.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from mergelab.engine.parameterwise import TaskVectors, check_merged_finite
from mergelab.engine.pool import CheckpointSource, ModelPool
from mergelab.engine.streaming import StateDict, progress, scaled_models
from mergelab.engine.workspace import BlockWorkers, empty
from mergelab.merging.compiled import kernels
from mergelab.merging.quantile import MagnitudeSelect
from mergelab.merging.ties import (
    PENDING,
    TiesPart,
    check_keep_fraction,
    ties_rank,
    ties_vector,
)

# the undecided coordinates' values set aside in pass 2, at most this share of the
# elements of one model (beyond it: one more counting pass, then the merge again)
UNDECIDED_BUDGET = 0.25
# ... and at most this many elements when a model is written parameter by parameter
# (StreamedTies), whose memory must stay flat in the model's size: 256 MB of float32
STREAMED_UNDECIDED_LIMIT = 1 << 26


def _whole_parameters(task_vectors: TaskVectors, desc: str) -> Iterator[torch.Tensor]:
    """τ of every merged parameter, whole, as [T, n]."""
    tasks = len(task_vectors.pool.tasks)
    return (taus.reshape(tasks, -1) for _, taus in task_vectors.walk(desc))


def _count_magnitudes(select: MagnitudeSelect, parts: Iterable[torch.Tensor]) -> None:
    """Pass 1: every task's magnitudes counted per bucket, over τ in parts [T, n]."""
    counts = select.counts.numpy()
    for flat in parts:
        if flat.device.type == "cpu" and flat.dtype == torch.float32:
            kernels("ties_kernels").add_magnitude_counts(flat.contiguous().numpy(), counts)
        else:
            select.observe(flat)
    select.locate()


def _merge(
    taus: torch.Tensor,
    thresholds: Sequence[float],
    undecided_from: Sequence[float],
    majority: int = PENDING,
    disjoint_mean: bool = False,
) -> TiesPart:
    """The TIES rule on τ [T, n]: the compiled kernel on the CPU, the torch rule elsewhere."""
    if taus.device.type != "cpu":
        return ties_vector(taus, thresholds, majority, disjoint_mean, undecided_from)
    taus = taus.contiguous()
    merged = torch.empty(taus.shape[1], dtype=taus.dtype)
    limits = (np.asarray(values, dtype=np.float32) for values in (thresholds, undecided_from))
    kernel = kernels("ties_kernels").ties_merge
    votes, ties = kernel(taus.numpy(), *limits, majority, disjoint_mean, merged.numpy())
    return TiesPart(merged, votes, ties)


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


class _Held(NamedTuple):
    """The undecided coordinates of one parameter: flat indices, and τ [T, m] there."""

    key: str
    index: torch.Tensor
    values: torch.Tensor


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
        self.held: list[_Held] | None = []
        held_elements = 0
        for key, taus in task_vectors.walk("TIES: merge"):
            flat = taus.reshape(tasks, -1)
            part = _merge(flat, thresholds, undecided_from, disjoint_mean=disjoint_mean)
            self.votes += part.votes
            spec = pool.specs[key]
            out = empty(spec.shape, pool.compute_dtype(key))
            self.delta[key] = out.copy_(part.merged.reshape(spec.shape))
            index = torch.isnan(part.merged).nonzero().reshape(-1)
            if not index.numel():
                continue
            self.open_keys.append(key)
            held_elements += index.numel() * tasks
            if self.held is not None and held_elements > budget:
                self.held = None
            if self.held is not None:
                self.held.append(_Held(key, index.cpu(), flat[:, index].cpu()))


def _resolved_thresholds(select: MagnitudeSelect, held: list[_Held]) -> list[float]:
    """Each task's exact threshold from its magnitudes inside its bucket, all of them
    among the held values (an entry there leaves its coordinate undecided)."""
    thresholds = []
    for task, (low, high) in enumerate(zip(*select.bounds(), strict=True)):
        values = torch.cat([part.values[task] for part in held] or [torch.empty(0)])
        magnitudes = values.abs().to(torch.float32)
        inside = (magnitudes >= low) & (magnitudes < high)
        thresholds.append(select.resolve(task, values[inside]))
    return thresholds


def ties_merged_vector(
    task_vectors: TaskVectors, keep_fraction: float = 0.2, disjoint_mean: bool = False
) -> StateDict:
    """The TIES-merged task vector of every parameter (θ = θ0 + λ·δ)."""
    check_keep_fraction(keep_fraction)
    pool = task_vectors.pool
    tasks, total = len(pool.tasks), pool.num_merged_params
    budget = UNDECIDED_BUDGET * total
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
            thresholds = _resolved_thresholds(select, merge.held)
            for part in merge.held:
                merge.votes += _merge(part.values, thresholds, thresholds).votes

    majority = (merge.votes > 0) - (merge.votes < 0)
    if merge.held is not None:
        for part in merge.held:
            merged = _merge(part.values, thresholds, thresholds, majority, disjoint_mean).merged
            merge.delta[part.key].view(-1)[part.index] = merged
    else:
        for key in merge.open_keys:
            flat = task_vectors(key).reshape(tasks, -1)
            merged = _merge(flat, thresholds, thresholds, majority, disjoint_mean).merged
            merge.delta[key].view(-1).copy_(merged)
    for key, merged in merge.delta.items():
        check_merged_finite(key, merged)
    return merge.delta


class StreamedTies:
    """TIES for a model written parameter by parameter: ``self(key)`` is one parameter's δ,
    as :func:`ties_merged_vector` computes it, without δ of the whole model in memory.

    On construction, passes over the task vectors block by block (the blocks of a
    parameter shared out among BlockWorkers threads) find what every coordinate's merge
    depends on: each task's bucket (counting), then, in one more pass, the votes of the
    decided coordinates, the undecided coordinates' values (up to a budget) and the low
    bits of each task's magnitudes inside its bucket, which pin the exact thresholds
    whatever the budget; beyond it, a third pass counts the votes at the exact
    thresholds. The majority sign follows from the votes; δ of a parameter is then
    computed block by block when asked for. Memory: a block of every model per thread
    and the values set aside, whatever the model's size; reads: three or four passes.
    """

    def __init__(self, pool: ModelPool, keep_fraction: float = 0.2, disjoint_mean: bool = False):
        check_keep_fraction(keep_fraction)
        self.pool, self.disjoint_mean = pool, disjoint_mean
        self._workers = BlockWorkers()
        tasks, total = len(pool.tasks), pool.num_merged_params
        rank = ties_rank(keep_fraction, total)
        try:
            if rank < 0:  # everything kept
                self.thresholds = [-math.inf] * tasks
                votes, _ = self._votes(self.thresholds, self.thresholds, 0, check=True)
            else:
                select = MagnitudeSelect(rank, total, tasks)
                self._count(select)
                lows, highs = select.bounds()
                budget = min(UNDECIDED_BUDGET * total, STREAMED_UNDECIDED_LIMIT)
                votes, held = self._votes(highs, lows, budget, select)
                self.thresholds = exact = select.values()
                if held is None:
                    votes, _ = self._votes(exact, exact, 0)
                else:
                    votes += sum(_merge(part.values, exact, exact).votes for part in held)
        except BaseException:
            self.close()
            raise
        self.majority = (votes > 0) - (votes < 0)

    def close(self) -> None:
        self._workers.close()

    def _each_block(self, desc: str, work: Callable, check: bool = False) -> list:
        """``work(key, part, τ block)`` for every block of every merged parameter, the
        blocks of a parameter on the workers' threads; the results in order. ``check``:
        each block checked finite first, naming the task (the first pass: a NaN would
        otherwise be trimmed away without a word)."""
        pool, workers, results = self.pool, self._workers, []
        for key in progress(pool.merged_keys, desc):

            def one(part: slice, key: str = key):
                taus = pool.read_task_vectors(key, part, workers.workspace())
                if check:
                    pool.check_finite(key, taus, taus)
                return work(key, part, taus)

            results += workers.run(one, pool.blocks(key))
        return results

    def _count(self, select: MagnitudeSelect) -> None:
        """Pass 1: every task's magnitudes counted per bucket, a count array per thread."""
        per_thread: dict[int, np.ndarray] = {}
        lock = threading.Lock()

        def count(key: str, part: slice, taus: torch.Tensor) -> None:
            if taus.dtype != torch.float32:
                with lock:
                    select.observe(taus)
                return
            counts = per_thread.get(threading.get_ident())
            if counts is None:
                counts = per_thread[threading.get_ident()] = np.zeros_like(select.counts.numpy())
            kernels("ties_kernels").add_magnitude_counts(taus.numpy(), counts)

        self._each_block("TIES: magnitudes", count, check=True)
        for counts in per_thread.values():
            select.counts.numpy()[...] += counts
        select.locate()

    def _votes(
        self,
        thresholds: Sequence[float],
        undecided_from: Sequence[float],
        budget: float,
        select: MagnitudeSelect | None = None,
        check: bool = False,
    ) -> tuple[int, list[_Held] | None]:
        """The votes of the decided coordinates and the values of the undecided ones
        (None beyond ``budget`` elements); with ``select``, its magnitudes inside each
        task's bucket counted too (its second pass)."""
        lock = threading.Lock()
        undecided = [0]  # values of the undecided coordinates so far, all threads

        def vote(key: str, part: slice, taus: torch.Tensor) -> tuple[int, _Held | None]:
            if select is not None and taus.dtype == torch.float32:
                counts = select.low_counts(taus)
                with lock:  # its counts are shared
                    select.add_low(counts)
            elif select is not None:
                with lock:
                    select.observe_low(taus)
            merged = _merge(taus, thresholds, undecided_from)
            index = torch.isnan(merged.merged).nonzero().reshape(-1)
            with lock:
                undecided[0] += index.numel() * len(taus)
                keep = index.numel() and undecided[0] <= budget
            return merged.votes, _Held(
                key, index + part.start, taus[:, index].clone()
            ) if keep else None

        results = self._each_block("TIES: votes", vote, check)
        held = [part for _, part in results if part is not None]
        return sum(votes for votes, _ in results), held if undecided[0] <= budget else None

    def __call__(self, key: str) -> torch.Tensor:
        spec = self.pool.specs[key]
        delta = empty((spec.numel,), self.pool.compute_dtype(key))
        exact, majority = self.thresholds, self.majority

        def merge_block(part: slice) -> None:
            taus = self.pool.read_task_vectors(key, part, self._workers.workspace())
            delta[part] = _merge(taus, exact, exact, majority, self.disjoint_mean).merged

        self._workers.run(merge_block, self.pool.blocks(key))
        check_merged_finite(key, delta)
        return delta.view(spec.shape)


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
