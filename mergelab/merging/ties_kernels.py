"""numba kernels for TIES on the CPU: each is one pass over a parameter's T task vectors,
where the torch rule (:func:`mergelab.merging.ties.ties_vector`) takes about ten, each
allocating a [T, *shape] temporary (ViT-B/32, eight tasks: 9 s for the torch rule's
passes, 0.75 s for the kernels; see scripts/bench_merge.py).

``ties_merge`` runs its outer loop over threads (``parallel=True``; numba's own thread
pool, ``NUMBA_NUM_THREADS``) and takes C-contiguous [T, n] task vectors;
``ties_merge_models`` runs on its caller's thread
(the engine's block threads), from the models' rows. The magnitudes are counted by
:mod:`mergelab.merging.magnitude_kernels`. All compile once per given signature
(``cache=True``: the machine code is kept on disk). The arithmetic is IEEE in the order
of the torch rule, in the task vectors' dtype: no fastmath.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import overload

from mergelab.merging.task_arithmetic_kernels import widened
from mergelab.merging.ties import PENDING

_BLOCK = 1024  # coordinates per parallel block: its running sums stay in the L1 cache


@numba.njit(inline="always")
def _merge_columns(rows, start, width, limits, majority, disjoint_mean, out, kept, scratch):
    """The TIES rule on the columns start .. start + width of τ rows [T, n], into ``out``
    (width values); adds each task's count of kept entries (at or above its threshold) to
    ``kept[0]`` and of those strictly above it to ``kept[1]``; returns (votes,
    sign_ties, columns left undecided: NaN). ``limits``: (thresholds, undecided_from);
    ``scratch``: (total, positive, negative, signs, undecided), each at least ``width``
    long.

    One loop per task: beside the trimmed sum (which elects the sign), the sums and counts
    of its positive and of its negative trimmed entries, each added in task order from 0,
    so the elected side's is bit for bit the sum of the entries that agree with it (a
    second pass, once the sign is known, made the kernel a fifth slower). The loops have
    no branch: they vectorise (a loop over coordinates that walks the T tasks of each
    was 3.5x slower)."""
    thresholds, undecided_from = limits
    total, positive, negative, signs, undecided = scratch
    tasks = rows.shape[0]
    total[:width] = 0
    positive[:width] = 0
    negative[:width] = 0
    signs[:width] = 0
    undecided[:width] = 0
    zero = total[0]  # 0 in τ's dtype
    for t in range(tasks):
        row, threshold, low = rows[t, start : start + width], thresholds[t], undecided_from[t]
        count = np.int32(0)
        above = np.int32(0)
        for j in range(width):
            magnitude = np.float32(abs(row[j]))
            is_kept = magnitude >= threshold
            trimmed = row[j] if is_kept else zero
            total[j] += trimmed
            positive[j] += trimmed if trimmed > 0 else zero
            negative[j] += trimmed if trimmed < 0 else zero
            # positive entries counted in the low 16 bits, negative ones above
            # (:data:`~mergelab.merging.ties.MOST_TASKS`)
            signs[j] += np.int32(trimmed > 0) + (np.int32(trimmed < 0) << 16)
            undecided[j] |= np.int32((magnitude >= low) & ~is_kept)
            count += np.int32(is_kept)
            above += np.int32(magnitude > threshold)
        kept[0, t] += count
        kept[1, t] += above
    pending = majority == PENDING
    votes = 0
    ties = 0
    undecided_columns = 0
    for j in range(width):
        # the elected sign: total's, the majority's where total is 0
        elected_positive = (total[j] > 0) | ((total[j] == 0) & (majority > 0))
        agreeing = signs[j] & 0xFFFF if elected_positive else signs[j] >> 16
        merged = positive[j] if elected_positive else negative[j]
        if disjoint_mean and agreeing > 1:
            # float64 quotient, rounded once to τ's dtype: the correctly rounded division
            merged = merged / agreeing
        tie = (total[j] == 0) & (signs[j] != 0)
        held = (undecided[j] != 0) | (tie & pending)
        out[j] = np.nan if held else merged
        votes += 0 if held else (total[j] > 0) - (total[j] < 0)
        ties += tie & ~held
        undecided_columns += held
    return votes, ties, undecided_columns


@numba.njit(inline="always")
def _scratch(width, dtype):
    """The per-column arrays of :func:`_merge_columns`."""
    return (
        np.empty(width, dtype),
        np.empty(width, dtype),
        np.empty(width, dtype),
        np.empty(width, np.int32),
        np.empty(width, np.int32),
    )


@numba.njit(inline="always")
def _hold_column(taus, j, lows, highs, held, entries, in_band):
    """Appends column ``j`` of τ rows [T, w] to the held arrays ``held`` (tasks, values,
    band tasks, band magnitudes; ``entries`` and ``in_band``: their filled lengths): the
    column's entries whose float32 magnitude is at least their task's ``lows``, in task
    order, and apart those also below their task's ``highs``. Returns (how many entries
    it kept, the new lengths).

    Each step writes and keeps a value by advancing the end, without a branch (the arrays
    hold one slot to spare); the ends are locals, not array elements, so that no step
    waits on the store of the one before."""
    owners, values, band_owners, band_magnitudes = held
    first = entries
    for t in range(taus.shape[0]):
        value = taus[t, j]
        magnitude = np.float32(abs(value))
        kept = magnitude >= lows[t]
        owners[entries] = t
        values[entries] = value
        band_owners[in_band] = t
        band_magnitudes[in_band] = magnitude
        entries += kept
        in_band += kept & (magnitude < highs[t])
    return entries - first, entries, in_band


@numba.njit(
    [
        f"UniTuple(int64, 2)({dtype}[:, ::1], float32[::1], float32[::1], int64, boolean, "
        f"{dtype}[::1])"
        for dtype in ("float32", "float64")
    ],
    cache=True,
    nogil=True,
    parallel=True,
)
def ties_merge(task_vectors, thresholds, undecided_from, majority, disjoint_mean, out):
    """out = ties_vector(τ, thresholds, majority, disjoint_mean, undecided_from).merged
    for τ [T, n]; returns (votes, sign_ties) as :class:`~mergelab.merging.ties.TiesPart`.
    Blocks of coordinates run in parallel."""
    tasks, size = task_vectors.shape
    votes = 0
    ties = 0
    for block in numba.prange((size + _BLOCK - 1) // _BLOCK):
        start = block * _BLOCK
        width = min(size, start + _BLOCK) - start
        kept = np.zeros((2, tasks), np.int64)
        block_votes, block_ties, _ = _merge_columns(
            task_vectors,
            start,
            width,
            (thresholds, undecided_from),
            majority,
            disjoint_mean,
            out[start : start + width],
            kept,
            _scratch(width, task_vectors.dtype),
        )
        votes += block_votes
        ties += block_ties
    return votes, ties


def _stored_value(value):
    """An entry of the models' rows as a float: bfloat16 bits (uint16) widened to
    float32, a float as it is (chosen when a kernel compiles: :func:`_stored_value_of`)."""


@overload(_stored_value, inline="always")
def _stored_value_of(value):
    if isinstance(value, types.Integer):
        return lambda value: widened(value)
    return lambda value: value


# (rows, δ): the models' stored rows (bfloat16 as its bits) and the compute dtype
_ROWS_AND_OUT = (("float32", "float32"), ("float64", "float64"), ("uint16", "float32"))


@numba.njit(
    [
        f"Tuple((int64, int64, int64, int64, int64, boolean))({rows}[:, ::1], float32[::1], "
        f"float32[::1], int64, boolean, {out}[::1], int64[:, ::1], int64[::1], int32[::1], "
        f"int16[::1], {out}[::1], int16[::1], float32[::1])"
        for rows, out in _ROWS_AND_OUT
    ],
    cache=True,
    nogil=True,
)
def ties_merge_models(
    models,
    thresholds,
    undecided_from,
    majority,
    disjoint_mean,
    out,
    kept,
    held_columns,
    held_counts,
    owners,
    values,
    band_owners,
    band_magnitudes,
):
    """:func:`ties_merge` of τt = models[t] − models[0] for the models' rows [T + 1, n]
    (θ0 first; bfloat16 rows as their bits, each entry widened to float32 as it is read),
    formed a few columns at a time beside the rule rather than as a [T, n] temporary, on
    the calling thread; adds each task's count of entries at or above its threshold to
    ``kept[0]``, and strictly above it to ``kept[1]``. Each column left undecided (NaN)
    is held while its τ is in the cache: its position in ``held_columns``, its entries
    as :func:`held_entries` gives them (capacity: n columns, n·T + 1 entries). Returns
    (votes, sign_ties, columns held, entries held, band entries held, whether every τ is
    finite: the rows are then too)."""
    sources, size = models.shape
    taus = np.empty((sources - 1, _BLOCK), out.dtype)
    scratch = _scratch(_BLOCK, out.dtype)
    held = (owners, values, band_owners, band_magnitudes)
    limits = (thresholds, undecided_from)
    entries = in_band = 0
    columns = 0
    votes = 0
    ties = 0
    finite = True
    for start in range(0, size, _BLOCK):
        width = min(size, start + _BLOCK) - start
        base = models[0, start : start + width]
        for t in range(sources - 1):
            row, tau = models[t + 1, start : start + width], taus[t]
            for j in range(width):
                value = _stored_value(row[j]) - _stored_value(base[j])
                tau[j] = value
                finite &= value - value == 0  # False for NaN and ±Inf
        merged = out[start : start + width]
        block = _merge_columns(
            taus, 0, width, limits, majority, disjoint_mean, merged, kept, scratch
        )
        votes, ties = votes + block[0], ties + block[1]
        for j in range(width if block[2] else 0):  # most blocks hold no column
            if np.isnan(out[start + j]):
                held_columns[columns] = start + j
                held_counts[columns], entries, in_band = _hold_column(
                    taus, j, undecided_from, thresholds, held, entries, in_band
                )
                columns += 1
    return votes, ties, columns, entries, in_band, finite


@numba.njit(
    [
        f"UniTuple(int64, 2)(int32[::1], int16[::1], {dtype}[::1], int64, float32[::1], "
        f"int64, boolean, {dtype}[::1])"
        for dtype in ("float32", "float64")
    ],
    cache=True,
    nogil=True,
)
def ties_merge_held(counts, tasks, values, num_tasks, thresholds, majority, disjoint_mean, out):
    """:func:`ties_merge` at exact thresholds of coordinates held sparsely: coordinate i
    has ``counts[i]`` entries, in task order, their tasks and values in ``tasks`` and
    ``values`` (the entries not held are dropped: 0 in the rule). Each few columns are
    laid out densely in a scratch block, then merged by the same rule."""
    size = counts.shape[0]
    taus = np.zeros((num_tasks, _BLOCK), values.dtype)
    scratch = _scratch(_BLOCK, values.dtype)
    kept = np.zeros((2, num_tasks), np.int64)
    limits = (thresholds, thresholds)
    votes = 0
    ties = 0
    entry = 0
    for start in range(0, size, _BLOCK):
        width = min(size, start + _BLOCK) - start
        taus[:, :width] = 0
        for j in range(width):
            for _ in range(counts[start + j]):
                taus[tasks[entry], j] = values[entry]
                entry += 1
        merged = out[start : start + width]
        block = _merge_columns(
            taus, 0, width, limits, majority, disjoint_mean, merged, kept, scratch
        )
        votes, ties = votes + block[0], ties + block[1]
    return votes, ties


@numba.njit(
    [
        f"Tuple((int32[::1], int16[::1], {dtype}[::1], int16[::1], float32[::1]))"
        f"({dtype}[:, ::1], int64[::1], float32[::1], float32[::1])"
        for dtype in ("float32", "float64")
    ],
    cache=True,
    nogil=True,
)
def held_entries(task_vectors, columns, lows, highs):
    """The entries of τ [T, n] at ``columns`` whose float32 magnitude is at least their
    task's ``lows``, column by column in task order: (count per column, their tasks,
    their values), and apart the tasks and magnitudes of those also below their task's
    ``highs``."""
    tasks = task_vectors.shape[0]
    size = columns.shape[0]
    # gathered row by row first: each row read in the columns' (ascending) order
    gathered = np.empty((tasks, size), task_vectors.dtype)
    for t in range(tasks):
        row, out = task_vectors[t], gathered[t]
        for i in range(size):
            out[i] = row[columns[i]]
    counts = np.empty(size, np.int32)
    held = (
        np.empty(size * tasks + 1, np.int16),
        np.empty(size * tasks + 1, task_vectors.dtype),
        np.empty(size * tasks + 1, np.int16),
        np.empty(size * tasks + 1, np.float32),
    )
    entries = in_band = 0
    for i in range(size):
        counts[i], entries, in_band = _hold_column(gathered, i, lows, highs, held, entries, in_band)
    owners, values, band_owners, band_magnitudes = held
    return (
        counts,
        owners[:entries].copy(),
        values[:entries].copy(),
        band_owners[:in_band].copy(),
        band_magnitudes[:in_band].copy(),
    )


@numba.njit(
    ["Tuple((int64[::1], float32[::1]))(int16[::1], float32[::1], int64)"],
    cache=True,
    nogil=True,
)
def group_by_task(owners, magnitudes, tasks):
    """The magnitudes grouped by their task, each group in its given order (a counting
    sort: two linear passes): (offsets [tasks + 1], grouped)."""
    offsets = np.zeros(tasks + 1, np.int64)
    for i in range(owners.shape[0]):
        offsets[owners[i] + 1] += 1
    for t in range(tasks):
        offsets[t + 1] += offsets[t]
    ends = offsets[:-1].copy()
    grouped = np.empty_like(magnitudes)
    for i in range(owners.shape[0]):
        grouped[ends[owners[i]]] = magnitudes[i]
        ends[owners[i]] += 1
    return offsets, grouped
