"""TIES on the CPU in one pass from the models' rows (:func:`banded_ties_vector`), the
blocks of a parameter on BlockWorkers threads, δ of the whole model in memory.

One pass: a sample, 1/16 of every parameter in pieces spread over it, places each
task's threshold in a narrow band [low, high) of magnitudes (:func:`sampled_bands`: its
sample rank, :data:`BAND_ERRORS` standard errors either side). One pass then forms τ
from the models' rows and merges every coordinate whose entries all lie outside their
task's band (:func:`~mergelab.merging.ties_kernels.ties_merge_models`), counts exactly
each task's entries at or above its band, and holds the other coordinates' entries
while they are in the cache (:mod:`mergelab.engine.ties_undecided`). When the counts
place a task's threshold inside its band, the held entries pin it, and the held
coordinates are settled; should a threshold lie outside its band (the sample misled)
or the held entries exceed their budget, None: the caller takes the counting passes
over whole parameters, having lost one pass.

ViT-B/32 (scripts/bench_merge.py, 2026-12-06): 8 tasks, 1.41 s against 2.64 s for the
counting passes (2 % of the coordinates held); 20 tasks, 3.07 s against 5.55 s (4 %
held, 0.24 of a model's elements in entries). The miniature benchmark's task vectors,
alike within each piece, give bands too wide to try: the counting passes run at once.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading

import numpy as np
import torch

from mergelab.engine import ties_undecided
from mergelab.engine.parameterwise import check_merged_finite
from mergelab.engine.pool import ModelPool
from mergelab.engine.streaming import StateDict, progress
from mergelab.engine.ties_undecided import Held, in_ranges, settle
from mergelab.engine.workspace import BlockWorkers, empty
from mergelab.merging.compiled import kernels
from mergelab.merging.finite import rows_finite
from mergelab.merging.quantile import MagnitudeSelect, bucket_ranges
from mergelab.merging.ties import PENDING, check_keep_fraction, ties_rank

# the share of every parameter whose magnitudes place the thresholds' bands, in pieces:
# one per SAMPLE_SPAN elements, at least MIN_PIECES of at least MIN_PIECE elements where
# the parameter has room (ViT-B/32: 302 pieces)
SAMPLE_EVERY = 16
SAMPLE_SPAN = 1 << 19
MIN_PIECES = 8
MIN_PIECE = 1024
# a band's half-width, in standard errors of the sample's share below it
BAND_ERRORS = 6.0
# a band wider than this share of the magnitudes either side (a sample too small or too
# uneven to narrow it): no pass is tried, the counting passes run at once
WIDEST_BAND = 0.05


def _sample(pool: ModelPool, key: str) -> list[slice]:
    """1/SAMPLE_EVERY of a merged parameter (rounded up), as pieces evenly spread over it:
    one per SAMPLE_SPAN elements, and at least MIN_PIECES where each can hold MIN_PIECE.
    Neighbouring coordinates are alike (a row, a neuron), so a parameter's share is cut
    into many pieces; each long enough that reading it is not mostly the calls' cost."""
    numel = pool.specs[key].numel
    spread = min(MIN_PIECES, numel // (SAMPLE_EVERY * MIN_PIECE))
    pieces = max(1, round(numel / SAMPLE_SPAN), spread)
    length = -(-numel // (SAMPLE_EVERY * pieces))
    starts = (piece * numel // pieces for piece in range(pieces))
    return [slice(start, min(start + length, numel)) for start in starts]


def _sample_magnitudes(
    pool: ModelPool, pieces: list[tuple[str, slice]], starts: np.ndarray, workers
) -> np.ndarray:
    """[T, sample size]: the float32 |τ| of every piece, side by side from ``starts``."""
    magnitudes = np.empty((len(pool.tasks), int(starts[-1])), dtype=np.float32)

    def read(item: tuple[int, tuple[str, slice]]) -> None:
        number, (key, part) = item
        taus = pool.read_task_vectors(key, part, workers.workspace()).numpy()
        np.abs(taus, out=magnitudes[:, starts[number] : starts[number + 1]], casting="unsafe")

    workers.run(read, list(enumerate(pieces)))
    return magnitudes


def _stratified_error(below: np.ndarray, lengths: np.ndarray, strata: list[str]) -> np.ndarray:
    """Per task, the standard error of the sample's count below a value, its pieces drawn
    parameter by parameter (strata): from each piece's departure from its parameter's
    own share, as a parameter's share of the sample is fixed."""
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
    pool: ModelPool, rank: int, workers: BlockWorkers
) -> tuple[list[float], list[float]] | None:
    """Each task's band [low, high) that its threshold, the magnitude of 0-based ``rank``,
    all but certainly lies in, from the sample; None where the sample cannot narrow it.

    The band is BAND_ERRORS standard errors of the sample's share either side of the
    sample's quantile: the larger of a binomial share's and the one the pieces' own shares
    give (pieces, not values, are the sample's units where values within a piece are
    alike; in the miniature benchmark's task vectors they are: its binomial bands
    missed 4 of 8 thresholds)."""
    pieces = [(key, part) for key in pool.merged_keys for part in _sample(pool, key)]
    lengths = np.array([part.stop - part.start for _, part in pieces], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    size = int(starts[-1])
    if not size:
        return None
    share = rank / pool.num_merged_params
    binomial = math.sqrt(share * (1 - share) / size)
    if BAND_ERRORS * binomial > WIDEST_BAND:
        return None
    magnitudes = _sample_magnitudes(pool, pieces, starts, workers)
    counts = MagnitudeSelect(0, size, len(pool.tasks)).counts  # int32 below 2^31 values
    kernels("ties_kernels").add_magnitude_counts(magnitudes, counts.numpy())
    strata = [key for key, _ in pieces]
    central = min(size - 1, math.floor(share * size))
    margins = []
    for row, task_magnitudes in zip(counts, magnitudes, strict=True):
        median = bucket_ranges(row[None], [central], [central])[0][0]
        below = np.add.reduceat(task_magnitudes < np.float32(median), starts[:-1])
        error = _stratified_error(below[:, None], lengths, strata)[0] / size
        margins.append(BAND_ERRORS * max(error, binomial) + 1 / size)
    del magnitudes
    # the entries the pass would hold: a coordinate is undecided where any of its T
    # entries lies in its band, and keeps about the kept share of the others
    held = 2 * sum(margins) * (1 + (1 - share) * (len(margins) - 1))
    if max(margins) > WIDEST_BAND or held > ties_undecided.UNDECIDED_BUDGET:
        return None
    low_ranks = [max(0, math.floor((share - margin) * size)) for margin in margins]
    high_ranks = [min(size - 1, math.ceil((share + margin) * size)) for margin in margins]
    return bucket_ranges(counts, low_ranks, high_ranks)


class _BandedPass:
    """The one pass: δ (NaN where a coordinate is undecided), the decided coordinates'
    votes, each task's count of entries at or above its band, and the undecided
    coordinates' values (:attr:`held`: None once they exceed the budget, when the pass
    stops)."""

    def __init__(self, pool, lows, highs, disjoint_mean, workers):
        tasks = len(pool.tasks)
        limits = [np.asarray(values, dtype=np.float32) for values in (highs, lows)]
        kernel = kernels("ties_kernels").ties_merge_models
        budget = ties_undecided.UNDECIDED_BUDGET * pool.num_merged_params
        per_thread: dict[int, np.ndarray] = {}
        self.delta: StateDict = {}
        self.votes = 0
        self.held: list[Held] | None = []
        held_entries = 0

        def merge_block(key: str, part: slice) -> tuple[int, Held | None]:
            workspace = workers.workspace()
            models = pool.read_models(key, part, workspace)
            rows, out = models.numpy(), self.delta[key].view(-1)[part]
            kept = per_thread.setdefault(threading.get_ident(), np.zeros(tasks, np.int64))
            buffers = _held_buffers(workspace, rows.shape[1], tasks, models.dtype)
            votes, _, columns, entries, in_band = kernel(
                rows,
                *limits,
                PENDING,
                disjoint_mean,
                out.numpy(),
                kept,
                *(buffer.numpy() for buffer in buffers),
            )
            pool.check_finite_from_models(key, models, None, rows_finite(rows))
            if not columns:
                return votes, None
            lengths = (columns, columns, entries, entries, in_band, in_band)
            held = [buffer[:n].clone() for buffer, n in zip(buffers, lengths, strict=True)]
            return votes, Held(key, held[0] + part.start, *held[1:])

        for key in progress(pool.merged_keys, "TIES: merge"):
            spec = pool.specs[key]
            self.delta[key] = empty(spec.shape, pool.compute_dtype(key))
            for votes, held in workers.run(functools.partial(merge_block, key), pool.blocks(key)):
                self.votes += votes
                if held is not None:
                    self.held.append(held)
                    held_entries += held.values.numel()
            if held_entries > budget:
                self.held = None
                return
        self.kept = sum(per_thread.values(), np.zeros(tasks, np.int64)).tolist()


def _held_buffers(workspace, columns: int, tasks: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """A thread's buffers for what the merge kernel holds of a block of ``columns``: its
    columns, their counts, and room for every entry (tasks, values, band tasks, band
    magnitudes), reused block after block."""
    capacity = columns * tasks + 1
    return [
        workspace.get(f"held {name}", (length,), kind)
        for name, length, kind in (
            ("columns", columns, torch.int64),
            ("counts", columns, torch.int32),
            ("tasks", capacity, torch.int16),
            ("values", capacity, dtype),
            ("band tasks", capacity, torch.int16),
            ("band magnitudes", capacity, torch.float32),
        )
    ]


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
        bands = sampled_bands(pool, rank, workers)
        if bands is None:
            return None
        lows, highs = bands
    merged = _BandedPass(pool, lows, highs, disjoint_mean, workers)
    if merged.held is None:
        return None
    thresholds = highs
    if rank >= 0:
        thresholds = []
        for task, inside in enumerate(in_ranges(merged.held, tasks)):
            below = total - merged.kept[task] - inside.numel()
            if not below <= rank < below + inside.numel():
                return None  # the threshold lies outside the band
            thresholds.append(torch.kthvalue(inside, rank - below + 1).values.item())
    settle(merged.delta, merged.held, tasks, thresholds, merged.votes, disjoint_mean)
    for key, delta in merged.delta.items():
        check_merged_finite(key, delta)
    return merged.delta
