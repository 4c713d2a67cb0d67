"""numba kernels that count TIES's magnitudes per bucket (the bucket of a float32 |τ|: the
upper bits of its bits, :data:`~mergelab.merging.quantile.MAGNITUDE_LOW_BITS`), for
:class:`~mergelab.merging.quantile.MagnitudeSelect` and the one pass's sample. They
compile once per given signature (``cache=True``)."""

from __future__ import annotations

import numba
import numpy as np

from mergelab.merging.quantile import COARSE_LOW_BITS, MAGNITUDE_LOW_BITS

_MAGNITUDE = 0x7FFFFFFF  # a float32's bits without the sign: its magnitude's bits


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
        f"void({dtype}[:, ::1], {count}[:, ::1])"
        for dtype in ("float32", "float64")
        for count in ("int32", "int64")
    ],
    cache=True,
    nogil=True,
)
def add_model_magnitude_counts(models, counts):
    """:func:`add_magnitude_counts` of τt = models[t] − models[0] (float32 |τt|) for the
    models' rows [T + 1, n] (θ0 first), on the calling thread (the engine's block threads)."""
    sources, size = models.shape
    base = models[0]
    for t in range(1, sources):
        row, histogram = models[t], counts[t - 1]
        for i in range(size):
            magnitude = np.float32(abs(row[i] - base[i])).view(np.uint32)
            histogram[magnitude >> MAGNITUDE_LOW_BITS] += 1


@numba.njit(
    [
        f"void({dtype}[:, ::1], int32[:, ::1], int32[:, :, ::1], int64)"
        for dtype in ("float32", "float64")
    ],
    cache=True,
    nogil=True,
)
def add_piece_magnitude_counts(models, counts, piece_counts, piece):
    """:func:`add_model_magnitude_counts` into ``counts`` [T, 2^20], and into
    ``piece_counts[:, :, piece]`` ([T, 2^10, pieces]) the piece's own counts per coarse
    bucket (4 an octave: :data:`~mergelab.merging.quantile.COARSE_LOW_BITS`). Pieces side
    by side: the few coarse buckets a task's magnitudes fall in share their pages."""
    sources, size = models.shape
    base = models[0]
    for t in range(1, sources):
        row, histogram, coarse = models[t], counts[t - 1], piece_counts[t - 1, :, piece]
        for i in range(size):
            magnitude = np.float32(abs(row[i] - base[i])).view(np.uint32)
            histogram[magnitude >> MAGNITUDE_LOW_BITS] += 1
            coarse[magnitude >> COARSE_LOW_BITS] += 1
