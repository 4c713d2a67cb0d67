"""TIES for a model written parameter by parameter (:class:`StreamedTies`, for
``mergelab merge``): every pass on the CPU, block by block, the blocks of a parameter on
BlockWorkers threads, and no δ of the whole model in memory.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

from mergelab.engine import ties_undecided
from mergelab.engine.model_writing import Patch, ProvisionalDeltas
from mergelab.engine.parameterwise import check_merged_finite
from mergelab.engine.pool import ModelPool
from mergelab.engine.streaming import progress
from mergelab.engine.ties_blocks import BandedPass, exact_thresholds, sampled_bands
from mergelab.engine.ties_undecided import Held, held_votes, hold, merge_part, settled
from mergelab.engine.workspace import BlockWorkers, ThreadTotals, empty
from mergelab.merging.compiled import kernels
from mergelab.merging.finite import rows_finite
from mergelab.merging.quantile import MagnitudeSelect
from mergelab.merging.ties import check_keep_fraction, check_task_count, ties_rank

# the undecided values StreamedTies sets aside, at most this many elements: its memory
# must stay flat in the model's size (256 MB of float32)
STREAMED_UNDECIDED_LIMIT = 1 << 26


def _add_magnitude_counts(pool: ModelPool, workers: BlockWorkers, out: np.ndarray) -> None:
    """Adds to ``out`` [T, buckets] each task's float32 |τ| counted per bucket over every
    merged parameter, block by block, a count array per thread; each block checked
    finite, naming the task (the first pass: a NaN would otherwise be trimmed away
    without a word)."""
    kernel = kernels("magnitude_kernels").add_model_magnitude_counts
    totals = ThreadTotals(out)

    def count(key: str, part: slice) -> None:
        models = pool.read_models(key, part, workers.workspace())
        pool.check_finite_from_models(key, models, None, rows_finite(models.numpy()))
        kernel(models.numpy(), totals.mine())

    for key in progress(pool.merged_keys, "TIES: magnitudes"):
        workers.run(functools.partial(count, key), pool.blocks(key))
    totals.total()


def _shared_floors(select: MagnitudeSelect, budget: float) -> tuple[list[float], list[float]]:
    """Each task's bucket [low, high) holding its threshold, whose entries the votes pass
    holds; where they would exceed ``budget`` (T entries a coordinate, at most), the
    fullest buckets are taken for one magnitude their entries share (bf16 task vectors
    sit on a few values): [low, low), an entry at or above the floor kept, none held.
    The pass's low counts then confirm the threshold is that floor, or a third pass
    votes at the exact thresholds."""
    lows, highs = select.bounds()
    counts = select.in_bucket()
    tasks, held = len(counts), sum(counts)
    for task in sorted(range(tasks), key=counts.__getitem__, reverse=True):
        if held * tasks <= budget:
            break
        highs[task] = lows[task]
        held -= counts[task]
    return lows, highs


class StreamedTies(ProvisionalDeltas):
    """TIES for a model written parameter by parameter: ``self(key)`` is one parameter's δ,
    as :func:`ties_merged_vector` computes it, without δ of the whole model in memory.

    Where a sample places each task's threshold in a band
    (:func:`~mergelab.engine.ties_blocks.sampled_bands`), the first write is the one
    pass (:class:`~mergelab.engine.ties_blocks.BandedPass`): each parameter's δ is
    provisional, its coordinates with an entry inside a band set aside (0 until
    settled) and its sums of exactly 0 decided by a majority sign of +1. :meth:`settle`
    then pins the exact thresholds and the majority sign and gives the set-aside
    coordinates' δ; should the sign be −1 where a sum of 0 was decided, or the bands
    miss, the model is written again at exact thresholds.

    Otherwise, or where the bands miss, passes over the task vectors block by block
    (the blocks of a parameter shared out among BlockWorkers threads) find what every
    coordinate's merge depends on: each task's bucket (counting), then, in one more pass,
    the votes of the decided coordinates, the undecided coordinates' values (up to a
    budget) and the low bits of each task's magnitudes inside its bucket, which pin the
    exact thresholds whatever the budget (where a task's bucket alone would exceed it,
    its entries are taken for one shared magnitude and decided at the bucket's floor, as
    :func:`_shared_floors` says); beyond it, or where the low bits put a threshold above
    such a floor, a third pass counts the votes at the exact thresholds. The majority
    sign follows from the votes; δ of a parameter is then computed block by block when
    asked for. Memory: a block of every model per thread and the values set aside,
    whatever the model's size; reads: a sample (1/16, at most about 2^23 values) and one
    pass, or two passes, or three or four.
    """

    def __init__(self, pool: ModelPool, keep_fraction: float = 0.2, disjoint_mean: bool = False):
        check_keep_fraction(keep_fraction)
        check_task_count(len(pool.tasks))
        self.pool, self.disjoint_mean = pool, disjoint_mean
        self._workers = BlockWorkers()
        tasks, total = len(pool.tasks), pool.num_merged_params
        self._rank = rank = ties_rank(keep_fraction, total)
        self._budget = min(ties_undecided.UNDECIDED_BUDGET * total, STREAMED_UNDECIDED_LIMIT)
        self._pass: BandedPass | None = None
        try:
            if rank < 0:  # everything kept
                self.thresholds = [-math.inf] * tasks
                votes, _ = self._votes(self.thresholds, self.thresholds, 0, check=True)
                self.majority = (votes > 0) - (votes < 0)
                return
            bands = sampled_bands(pool, rank, self._workers, self._budget / total)
            if bands is None:
                self._count_and_vote()
            else:
                self._highs = bands[1]
                self._pass = BandedPass(
                    pool,
                    *bands,
                    disjoint_mean,
                    self._workers,
                    self._budget,
                    majority=1,
                    keep_theta0=True,
                )
        except BaseException:
            self.close()
            raise

    def _count_and_vote(self) -> None:
        """The thresholds and the majority sign from counting and voting passes."""
        tasks, total = len(self.pool.tasks), self.pool.num_merged_params
        select = MagnitudeSelect(self._rank, total, tasks)
        self._count(select)
        lows, highs = _shared_floors(select, self._budget)
        votes, held = self._votes(highs, lows, self._budget, select)
        self.thresholds = exact = select.values()
        shared = zip(lows, highs, exact, strict=True)
        missed = any(low == high != value for low, high, value in shared)
        if held is None or missed:  # the votes at the exact thresholds: a third pass
            votes, _ = self._votes(exact, exact, 0)
        else:
            votes += held_votes(held, tasks, exact)
        self.majority = (votes > 0) - (votes < 0)

    def settle(self) -> dict[str, Patch] | None:
        """After every parameter's δ was asked for once: nothing to correct where it was
        final; where it was the one pass's, the set-aside coordinates' δ, or None where
        the model must be written again (``self`` then gives the final δ)."""
        passed, self._pass = self._pass, None
        if passed is None:
            return {}
        tasks, total = len(self.pool.tasks), self.pool.num_merged_params
        held = passed.held
        thresholds = (
            None if held is None else exact_thresholds(passed, self._highs, self._rank, total)
        )
        if thresholds is None:  # too many set aside, or the bands missed
            self._count_and_vote()
            return None
        self.majority, values = settled(held, tasks, thresholds, passed.votes, self.disjoint_mean)
        self.thresholds = thresholds
        if passed.ties and self.majority != 1:  # sums of 0 decided by the wrong sign
            return None
        patches = {}
        for key, numbers in itertools.groupby(range(len(held)), lambda number: held[number].key):
            numbers = list(numbers)
            delta = torch.cat([values[number] for number in numbers])
            check_merged_finite(key, delta)
            positions = torch.cat([held[number].index for number in numbers]).numpy()
            theta0 = torch.cat([passed.theta0[number] for number in numbers])
            patches[key] = Patch(positions, theta0, delta)
        return patches

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
        """Pass 1: every task's magnitudes counted per bucket."""
        out = select.counts.numpy()
        _add_magnitude_counts(self.pool, self._workers, out)
        select.locate()

    def _votes(
        self,
        thresholds: Sequence[float],
        undecided_from: Sequence[float],
        budget: float,
        select: MagnitudeSelect | None = None,
        check: bool = False,
    ) -> tuple[int, list[Held] | None]:
        """The votes of the decided coordinates and the entries held of the undecided ones
        (None beyond ``budget`` of them); with ``select``, its magnitudes inside each
        task's bucket counted too (its second pass)."""
        lock = threading.Lock()
        undecided = [0]  # entries held so far, all threads

        def vote(key: str, part: slice, taus: torch.Tensor) -> tuple[int, Held | None]:
            if select is not None and taus.dtype == torch.float32:
                counts = select.low_counts(taus)
                with lock:  # its counts are shared
                    select.add_low(counts)
            elif select is not None:
                with lock:
                    select.observe_low(taus)
            merged = merge_part(taus, thresholds, undecided_from)
            index = torch.isnan(merged.merged).nonzero().reshape(-1)
            if not index.numel():
                return merged.votes, None
            columns = index.numpy()
            held = hold(key, taus.numpy(), columns, part.start, undecided_from, thresholds)
            with lock:
                undecided[0] += held.values.numel()
                keep = undecided[0] <= budget
            return merged.votes, held if keep else None

        results = self._each_block("TIES: votes", vote, check)
        held = [part for _, part in results if part is not None]
        return sum(votes for votes, _ in results), held if undecided[0] <= budget else None

    def __call__(self, key: str) -> torch.Tensor:
        spec = self.pool.specs[key]
        delta = empty((spec.numel,), self.pool.compute_dtype(key))
        if self._pass is not None:  # the one pass's δ
            self._pass.merge(key, delta)
            check_merged_finite(key, delta)
            return delta.view(spec.shape)
        exact, majority = self.thresholds, self.majority

        def merge_block(part: slice) -> None:
            taus = self.pool.read_task_vectors(key, part, self._workers.workspace())
            delta[part] = merge_part(taus, exact, exact, majority, self.disjoint_mean).merged

        self._workers.run(merge_block, self.pool.blocks(key))
        check_merged_finite(key, delta)
        return delta.view(spec.shape)
