"""TIES on the CPU in one pass from the models' rows (:func:`banded_ties_vector`), the
blocks of a parameter on BlockWorkers threads, δ of the whole model in memory.

One pass: a sample, 1/16 of every parameter in pieces spread over it (less in a model
past 134 M values: :func:`~mergelab.engine.pool.sample_every`), places each
task's threshold in a narrow band [low, high) of magnitudes (:func:`sampled_bands`: its
sample rank, :data:`BAND_ERRORS` standard errors either side; the sample is counted
per bucket straight from the models' rows, and per piece in coarse buckets for its
standard error, so no copy of it is kept). One pass then forms τ
from the models' rows and merges every coordinate whose entries all lie outside their
task's band (:func:`~mergelab.merging.ties_kernels.ties_merge_models`), counts exactly
each task's entries at or above its band's top and strictly above it, and holds the
other coordinates' entries while they are in the cache
(:mod:`mergelab.engine.ties_undecided`). When the counts place a task's threshold
inside its band, the held entries pin it, and the held coordinates are settled; where
they place it among the entries equal to the band's top, it is that top (a band that
stops below a magnitude many entries share: bf16 task vectors); should a threshold lie
elsewhere (the sample misled)
or the held entries exceed their budget, None: the caller takes the counting passes
over whole parameters, having lost one pass.

ViT-B/32 (scripts/bench_merge.py, 2026-12-06, evening): 8 tasks, 0.98 s against 2.64 s
for the counting passes (2 % of the coordinates held); 20 tasks, 2.04 s against 5.55 s
(4 % held, 0.24 of a model's elements in entries). The miniature benchmark's task vectors,
alike within each piece, give bands too wide to try at keep shares 0.2 and 0.1 (the
counting passes run at once); at 0.05 its bands hold, and the one pass gives the
counting passes' bits. A bf16 Llama-shaped model of 1.5 G parameters and 8 fine-tunes
(scripts/bench_model_merge.py): each threshold lies on a magnitude, 2⁻¹¹, that 8 % of
the entries share; the band stops below it, and ``mergelab merge``'s TIES took 62.8 s
against 94 s when the counting passes ran, and 45 s once it wrote the model in this
pass (:class:`~mergelab.engine.ties_streamed.StreamedTies`).
"""

from __future__ import annotations

import functools
import itertools
import math
import threading

import numpy as np
import torch

from mergelab.engine import ties_undecided
from mergelab.engine.model_writing import bfloat16_bits, widened_theta0
from mergelab.engine.parameterwise import check_merged_finite
from mergelab.engine.pool import ModelPool, sample_every
from mergelab.engine.streaming import StateDict, progress
from mergelab.engine.ties_undecided import Held, in_ranges, settle
from mergelab.engine.workspace import BlockWorkers, ThreadTotals, empty, sparse_zeros
from mergelab.merging.compiled import kernels
from mergelab.merging.quantile import (
    COARSE_BUCKETS,
    COARSE_SHIFT,
    MAGNITUDE_BUCKETS,
    bucket_floor,
    count_below,
    rank_bucket,
)
from mergelab.merging.ties import PENDING, check_keep_fraction, ties_rank

# the share of every parameter whose magnitudes place the thresholds' bands, in pieces:
# one per SAMPLE_SPAN elements (of SAMPLE_SPAN / SAMPLE_EVERY each), at least MIN_PIECES
# of at least MIN_PIECE elements where the parameter has room (ViT-B/32: 302 pieces); a
# larger model's sample takes fewer pieces of the same length (:func:`sample_every`)
SAMPLE_EVERY = 16
SAMPLE_SPAN = 1 << 19
MIN_PIECES = 8
MIN_PIECE = 1024
# a band's half-width, in standard errors of the sample's share below it
BAND_ERRORS = 6.0
# a band wider than this share of the magnitudes either side (a sample too small or too
# uneven to narrow it): no pass is tried, the counting passes run at once
WIDEST_BAND = 0.05


def _sample(pool: ModelPool, key: str, every: int) -> list[slice]:
    """1/every of a merged parameter (rounded up), as pieces evenly spread over it: one
    per SAMPLE_SPAN · every / SAMPLE_EVERY elements, and at least MIN_PIECES where each
    can hold MIN_PIECE. Neighbouring coordinates are alike (a row, a neuron), so a
    parameter's share is cut into many pieces; each long enough that reading it is not
    mostly the calls' cost."""
    numel = pool.specs[key].numel
    spread = min(MIN_PIECES, numel // (every * MIN_PIECE))
    pieces = max(1, round(numel * SAMPLE_EVERY / (SAMPLE_SPAN * every)), spread)
    length = -(-numel // (every * pieces))
    starts = (piece * numel // pieces for piece in range(pieces))
    return [slice(start, min(start + length, numel)) for start in starts]


def _sample_counts(
    pool: ModelPool, pieces: list[tuple[str, slice]], workers: BlockWorkers
) -> tuple[list[np.ndarray], np.ndarray]:
    """The sample's float32 |τ| counted from the models' rows on the block threads: per
    task and bucket [T, 2^20], one array per thread, and per task, coarse bucket and
    piece [T, 2^10, pieces]; both :func:`sparse_zeros`: only the pages the magnitudes
    fall in are mapped."""
    tasks = len(pool.tasks)
    totals = ThreadTotals(sparse_zeros((tasks, MAGNITUDE_BUCKETS), np.int32))  # a sample < 2^31
    piece_counts = sparse_zeros((tasks, COARSE_BUCKETS, len(pieces)), np.int32)
    kernel = kernels("magnitude_kernels").add_piece_magnitude_counts

    def count(item: tuple[int, tuple[str, slice]]) -> None:
        number, (key, part) = item
        models = pool.read_models(key, part, workers.workspace())
        kernel(models.numpy(), totals.mine(), piece_counts, number)

    with pool.reading_ahead(pieces):
        workers.run(count, list(enumerate(pieces)))
    return totals.parts(), piece_counts


def _stratified_error(below: np.ndarray, lengths: np.ndarray, strata: list[str]) -> np.ndarray:
    """Per column, the standard error of the sample's count below a value, its pieces
    drawn parameter by parameter (strata): from each piece's departure from its
    parameter's own share, as a parameter's share of the sample is fixed."""
    squares = np.zeros(below.shape[1])
    start = 0
    for _, stratum in itertools.groupby(strata):
        stop = start + len(list(stratum))
        if stop - start > 1:
            counts, sizes = below[start:stop], lengths[start:stop]
            residuals = counts - np.outer(sizes, counts.sum(0) / sizes.sum())
            squares += (residuals**2).sum(0) * (stop - start) / (stop - start - 1)
        start = stop
    return np.sqrt(squares)


def sampled_bands(
    pool: ModelPool, rank: int, workers: BlockWorkers, budget: float
) -> tuple[list[float], list[float]] | None:
    """Each task's band [low, high) that its threshold, the magnitude of 0-based ``rank``,
    all but certainly lies in, from the sample; None where the sample cannot narrow it.

    The band is BAND_ERRORS standard errors of the sample's share either side of the
    sample's quantile: the larger of a binomial share's and the one the pieces' own shares
    give (pieces, not values, are the sample's units where values within a piece are
    alike; in the miniature benchmark's task vectors they are: its binomial bands
    missed 4 of 8 thresholds). The pieces' shares are taken below the edges of the
    coarse bucket (a quarter octave) holding the quantile, the larger error of the two.
    Where the band's top bucket holds more of the sample than the band is wide, the band
    stops at that bucket's floor, which may be the threshold itself (the pass checks).
    None too where the entries the pass would hold, predicted from the sample, exceed
    ``budget`` (a share of one model's elements)."""
    every = sample_every(pool.num_merged_params, SAMPLE_EVERY)
    pieces = [(key, part) for key in pool.merged_keys for part in _sample(pool, key, every)]
    lengths = np.array([part.stop - part.start for _, part in pieces], dtype=np.int64)
    size = int(lengths.sum())
    if not size:
        return None
    share = rank / pool.num_merged_params
    binomial = math.sqrt(share * (1 - share) / size)
    if BAND_ERRORS * binomial > WIDEST_BAND:
        return None
    counts, piece_counts = _sample_counts(pool, pieces, workers)
    coarse_counts = piece_counts.sum(2, dtype=np.int64)

    def bucket(task: int, rank: int) -> int:
        rank = min(size - 1, max(0, rank))
        return rank_bucket(coarse_counts[task], [part[task] for part in counts], rank)

    def counted_below(task: int, bucket: int) -> int:
        return count_below(coarse_counts[task], [part[task] for part in counts], bucket)

    strata = [key for key, _ in pieces]
    margins = []
    for task in range(len(pool.tasks)):
        coarse = bucket(task, math.floor(share * size)) >> COARSE_SHIFT
        # each piece's count below the coarse bucket's edges
        under = piece_counts[task, :coarse].sum(0, dtype=np.int64)
        below = np.stack([under, under + piece_counts[task, coarse]], axis=1)
        error = _stratified_error(below, lengths, strata).max() / size
        margins.append(BAND_ERRORS * max(error, binomial) + 1 / size)
    if max(margins) > WIDEST_BAND:
        return None
    lows = [bucket(task, math.floor((share - m) * size)) for task, m in enumerate(margins)]
    highs = [bucket(task, math.ceil((share + m) * size)) for task, m in enumerate(margins)]
    bands, inside = ([], []), []
    for task, (margin, low, high) in enumerate(zip(margins, lows, highs, strict=True)):
        # a top bucket holding more of the sample than the band is wide is a magnitude
        # many entries share (bf16 task vectors sit on a few values): the band stops
        # below it, and the pass counts the entries at and above it, which place a
        # threshold equal to it without holding them
        shared = counted_below(task, high + 1) - counted_below(task, high)
        top = high if shared > 2 * margin * size else high + 1
        in_band = (counted_below(task, top) - counted_below(task, low)) / size
        # the entries the pass would hold: a coordinate is undecided where any of its T
        # entries lies in its band (the sample's own share there where it is the
        # larger: many equal magnitudes), and keeps about the kept share of the others
        inside.append(in_band if top == high else max(2 * margin, in_band))
        bands[0].append(bucket_floor(low))
        bands[1].append(bucket_floor(top))
    if sum(inside) * (1 + (1 - share) * (len(margins) - 1)) > budget:
        return None
    return bands


class BandedPass:
    """The one pass, parameter by parameter (:meth:`merge`): each coordinate with no entry
    inside its task's band merged, the others set aside (:attr:`held`, the entries at or
    above their band's low, and with ``keep_theta0`` θ0 there in :attr:`theta0`, for a
    model written before they are settled; None once they exceed
    ``budget`` entries, when no more are kept), their δ 0 until settled; the decided
    coordinates' votes and sign ties (a sum of exactly 0, decided by ``majority``:
    PENDING sets them aside too), and each task's count of entries at and strictly above
    its band's top (:attr:`kept`)."""

    def __init__(
        self, pool, lows, highs, disjoint_mean, workers, budget, majority, keep_theta0=False
    ):
        self.pool, self._workers, self._budget = pool, workers, budget
        self._keep_theta0 = keep_theta0
        self._limits = [np.asarray(values, dtype=np.float32) for values in (highs, lows)]
        self._rule = majority, disjoint_mean
        self._kept = ThreadTotals(np.zeros((2, len(pool.tasks)), np.int64))
        self.votes = self.ties = self._entries = 0
        self.held: list[Held] | None = []
        self.theta0: list[torch.Tensor] = []
        self._buffers: dict[tuple[int, np.dtype], list[np.ndarray]] = {}  # by thread

    def merge(self, key: str, out: torch.Tensor | None = None) -> None:
        """One parameter's blocks on the workers' threads, δ into ``out`` (flat, in the
        compute dtype) or a scratch block."""
        merge_block = functools.partial(self._merge_block, key, out)
        for votes, ties, held, theta0 in self._workers.run(merge_block, self.pool.blocks(key)):
            self.votes, self.ties = self.votes + votes, self.ties + ties
            if held is not None and self.held is not None:
                self.held.append(held)
                if theta0 is not None:
                    self.theta0.append(theta0)
                self._entries += held.values.numel()
        if self._entries > self._budget:
            self.held, self.theta0 = None, []

    @property
    def kept(self) -> np.ndarray:
        """[2, T]: each task's entries at and strictly above its band's top, so far."""
        return self._kept.total()

    def _merge_block(self, key: str, out: torch.Tensor | None, part: slice):
        pool, tasks, workspace = self.pool, len(self.pool.tasks), self._workers.workspace()
        dtype = pool.compute_dtype(key)
        if pool.specs[key].dtype == torch.bfloat16:  # widened by the kernel as it reads
            rows = bfloat16_bits(pool.read_stored_models(key, part, workspace))
        else:
            rows = pool.read_models(key, part, workspace).numpy()
        block = workspace.get("merged", (rows.shape[1],), dtype) if out is None else out[part]
        merged = block.numpy()
        thread = threading.get_ident(), merged.dtype
        if thread not in self._buffers:
            self._buffers[thread] = _held_buffers(pool.chunk, tasks, merged.dtype)
        buffers = self._buffers[thread]
        votes, ties, columns, entries, in_band, finite = kernels("ties_kernels").ties_merge_models(
            rows, *self._limits, *self._rule, merged, self._kept.mine(), *buffers
        )
        if not finite:
            pool.refuse_block(key, part, workspace)
        if not columns:
            return votes, ties, None, None
        merged[buffers[0][:columns]] = 0  # NaN where undecided: finite until settled
        if self.held is None:
            return votes, ties, None, None
        lengths = (columns, columns, entries, entries, in_band, in_band)
        held = [
            torch.from_numpy(array[:n].copy()) for array, n in zip(buffers, lengths, strict=True)
        ]
        theta0 = None
        if self._keep_theta0:  # bfloat16 rows are bits: widened for the patch
            theta0 = torch.from_numpy(widened_theta0(rows[0, buffers[0][:columns]]))
        return votes, ties, Held(key, held[0] + part.start, *held[1:]), theta0


def _held_buffers(columns: int, tasks: int, dtype: np.dtype) -> list[np.ndarray]:
    """A thread's arrays for what the merge kernel holds of a block of up to ``columns``:
    their columns, their counts, and room for every entry (tasks, values, band tasks,
    band magnitudes), reused block after block."""
    capacity = columns * tasks + 1
    return [
        np.empty(length, kind)
        for length, kind in (
            (columns, np.int64),
            (columns, np.int32),
            (capacity, np.int16),
            (capacity, dtype),
            (capacity, np.int16),
            (capacity, np.float32),
        )
    ]


def exact_thresholds(
    merged: BandedPass, highs: list[float], rank: int, total: int
) -> list[float] | None:
    """Each task's threshold, the magnitude of 0-based ``rank``, from the pass's counts at
    and above the top of its band and the held magnitudes inside it: a held one, or the
    band's top where the rank falls among the entries equal to it; None where it lies
    elsewhere."""
    thresholds = []
    for task, inside in enumerate(in_ranges(merged.held, len(highs))):
        at_or_above, above = merged.kept[:, task].tolist()
        below = total - at_or_above - inside.numel()
        if below <= rank < below + inside.numel():
            thresholds.append(float(np.partition(inside.numpy(), rank - below)[rank - below]))
        elif total - at_or_above <= rank < total - above:
            thresholds.append(highs[task])
        else:
            return None  # the threshold lies outside the band
    return thresholds


def banded_ties_vector(
    pool: ModelPool, keep_fraction: float, disjoint_mean: bool, workers: BlockWorkers
) -> StateDict | None:
    """δ of TIES over the pool's plain task vectors in one pass (see the module's
    docstring), or None where its bands do not settle the thresholds."""
    check_keep_fraction(keep_fraction)
    tasks, total = len(pool.tasks), pool.num_merged_params
    rank = ties_rank(keep_fraction, total)
    if rank < 0:  # everything kept
        lows = highs = [-math.inf] * tasks
    else:
        bands = sampled_bands(pool, rank, workers, ties_undecided.UNDECIDED_BUDGET)
        if bands is None:
            return None
        lows, highs = bands
    budget = ties_undecided.UNDECIDED_BUDGET * total
    merged = BandedPass(pool, lows, highs, disjoint_mean, workers, budget, PENDING)
    delta: StateDict = {}
    for key in progress(pool.merged_keys, "TIES: merge"):
        delta[key] = empty(pool.specs[key].shape, pool.compute_dtype(key))
        merged.merge(key, delta[key].view(-1))
        if merged.held is None:
            return None
    thresholds = highs if rank < 0 else exact_thresholds(merged, highs, rank, total)
    if thresholds is None:
        return None
    settle(delta, merged.held, tasks, thresholds, merged.votes, disjoint_mean)
    for key, values in delta.items():
        check_merged_finite(key, values)
    return delta
