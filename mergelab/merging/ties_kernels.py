"""numba kernels for TIES on the CPU: each is one pass over a parameter's T task vectors,
where the torch rule (:func:`mergelab.merging.ties.ties_vector`) takes about ten, each
allocating a [T, *shape] temporary (ViT-B/32, eight tasks: 9 s for the torch rule's
passes, 0.75 s for the kernels; see scripts/bench_merge.py).

Both run their outer loop over threads (``parallel=True``; numba's own thread pool,
``NUMBA_NUM_THREADS``), take C-contiguous [T, n] task vectors and compile once per given
signature (``cache=True``: the machine code is kept on disk). The arithmetic is IEEE in
the order of the torch rule, in the task vectors' dtype: no fastmath.
"""

from __future__ import annotations

import numba
import numpy as np

from mergelab.merging.quantile import MAGNITUDE_LOW_BITS
from mergelab.merging.ties import PENDING

_MAGNITUDE = 0x7FFFFFFF  # a float32's bits without the sign: its magnitude's bits
_BLOCK = 1024  # coordinates per parallel block: its running sums stay in the L1 cache


@numba.njit(
    [f"void(float32[:, ::1], {count}[:, ::1])" for count in ("int32", "int64")],
    cache=True,
    nogil=True,
    parallel=True,
)
def add_magnitude_counts(task_vectors, counts):
    """counts[t, bucket of |τt[i]|] += 1 for every i: the first pass of
    :class:`~mergelab.merging.quantile.MagnitudeSelect` (float32 τ; rows run in parallel)."""
    bits = task_vectors.view(np.uint32)
    for t in numba.prange(bits.shape[0]):
        row, histogram = bits[t], counts[t]
        for i in range(row.shape[0]):
            histogram[(row[i] & _MAGNITUDE) >> MAGNITUDE_LOW_BITS] += 1


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

    Blocks of coordinates run in parallel; inside a block each task's row is one loop
    without branches, which vectorises (3.5x faster than a loop over coordinates that
    walks the T tasks of each)."""
    tasks, size = task_vectors.shape
    votes = 0
    ties = 0
    for block in numba.prange((size + _BLOCK - 1) // _BLOCK):
        start = block * _BLOCK
        width = min(size, start + _BLOCK) - start
        total = np.zeros(width, task_vectors.dtype)
        merged = np.zeros(width, task_vectors.dtype)
        agreeing = np.zeros(width, np.int64)
        undecided = np.zeros(width, np.bool_)
        nonzero = np.zeros(width, np.bool_)
        zero = total[0]
        for t in range(tasks):
            row, threshold, low = (
                task_vectors[t, start : start + width],
                thresholds[t],
                undecided_from[t],
            )
            for j in range(width):
                magnitude = np.float32(abs(row[j]))
                kept = magnitude >= threshold
                total[j] += row[j] if kept else zero
                undecided[j] |= (magnitude >= low) & ~kept
        for t in range(tasks):
            row, threshold = task_vectors[t, start : start + width], thresholds[t]
            for j in range(width):
                value = row[j]
                kept = np.float32(abs(value)) >= threshold
                positive = (total[j] > 0) | ((total[j] == 0) & (majority > 0))
                agree = kept & ((value > 0) if positive else (value < 0))
                merged[j] += value if agree else zero
                agreeing[j] += agree
                nonzero[j] |= kept & (value != 0)
        for j in range(width):
            tie = total[j] == 0 and nonzero[j]
            if undecided[j] or (tie and majority == PENDING):
                out[start + j] = np.nan
            else:
                # float64 quotient, rounded once to τ's dtype: the correctly rounded division
                mean = disjoint_mean and agreeing[j] > 1
                out[start + j] = merged[j] / agreeing[j] if mean else merged[j]
                if total[j] > 0:
                    votes += 1
                elif total[j] < 0:
                    votes += -1
                elif tie:
                    ties += 1
    return votes, ties
