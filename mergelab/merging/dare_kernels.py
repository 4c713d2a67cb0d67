"""numba kernels for DARE's random drop (:mod:`mergelab.merging.dare`), on the CPU.

A coordinate's draw is a counter hash of its flat index i under the mask's 32-bit key k:
``lowbias32(lowbias32(k ^ (i >> 32)) ^ (i mod 2^32)) >> 8``, 24 uniform bits, where
lowbias32 is Chris Wellons' 32-bit integer hash (constants 0x7feb352d, 0x846ca68b; "Hash
Prospector", 2018). Any coordinate is drawn on its own, in parallel, in any order, with
the same result everywhere. Against ``torch.rand`` with a seeded generator (one thread,
then a ``torch.where`` and a division, each a pass) this is one parallel, vectorised
pass: on ViT-B/32 with eight tasks, 7.5 s became about 0.7 s (scripts/bench_merge.py);
SplitMix64, a 64-bit hash, took 3x longer than lowbias32 on AVX2, which has no 64-bit
vector multiply.
"""

from __future__ import annotations

import numba
import numpy as np

_MULTIPLIER_1 = np.uint32(0x7FEB352D)
_MULTIPLIER_2 = np.uint32(0x846CA68B)
# coordinates per parallel block; 2^32 is a multiple: i >> 32 is the block's
BLOCK = 4096


@numba.njit(inline="always")
def _lowbias32(h):
    # numba widens uint32 arithmetic to 64 bits: each step is cut back to 32
    h = np.uint32(h ^ (h >> 16))
    h = np.uint32(h * _MULTIPLIER_1)
    h = np.uint32(h ^ (h >> 15))
    h = np.uint32(h * _MULTIPLIER_2)
    return np.uint32(h ^ (h >> 16))


@numba.njit(inline="always")
def _block_key(key, start):
    """The key of the block of coordinates from ``start``: the high half of i hashed in."""
    return _lowbias32(np.uint32(key ^ (np.uint64(start) >> np.uint64(32))))


@numba.njit(inline="always")
def _kept(key, low, j, cutoff):
    return (_lowbias32(np.uint32(key ^ np.uint32(low + j))) >> 8) >= cutoff


@numba.njit(
    [f"void({dtype}[:, ::1], uint32[::1], uint32, {dtype})" for dtype in ("float32", "float64")],
    cache=True,
    nogil=True,
    parallel=True,
)
def drop_and_rescale(task_vectors, keys, cutoff, divisor):
    """In place: τt[i] / divisor where the draw of (keys[t], i) is at least ``cutoff``,
    else 0, for τ [T, n]."""
    tasks, size = task_vectors.shape
    for block in numba.prange((size + BLOCK - 1) // BLOCK):
        start = block * BLOCK
        width = min(size, start + BLOCK) - start
        for t in range(tasks):
            row = task_vectors[t, start : start + width]
            key = _block_key(keys[t], start)
            low = np.uint32(np.uint64(start) & np.uint64(0xFFFFFFFF))
            zero = row[0] - row[0]
            for j in range(width):
                kept = _kept(key, low, j, cutoff)
                value = row[j] / divisor
                row[j] = value if kept else zero


@numba.njit(
    [
        f"void({dtype}[:, ::1], uint32[::1], uint32, {dtype}, uint64, {dtype}[::1])"
        for dtype in ("float32", "float64")
    ],
    cache=True,
    nogil=True,
)
def drop_and_sum(models, keys, cutoff, divisor, offset, out):
    """out = Σ_{t ≥ 1} τt ⊙ mt / divisor, added in order of t, for models [T + 1, n] (θ0
    first) holding a parameter's columns from ``offset`` (a multiple of the block width):
    τt = models[t] − models[0], mt where the draw of (keys[t − 1], offset + i) is at
    least ``cutoff``. The bits of :func:`drop_and_rescale` on the subtracted rows, then
    their sum in order, in one pass without the [T, n] temporaries."""
    sources, size = models.shape
    zero = divisor - divisor
    for start in range(0, size, BLOCK):
        stop = min(size, start + BLOCK)
        first = np.uint64(offset) + np.uint64(start)  # the parameter's flat index
        low = np.uint32(first & np.uint64(0xFFFFFFFF))
        # slices per block, indexed from 0, one store per loop: the loops then vectorise
        total, base, row = out[start:stop], models[0, start:stop], models[1, start:stop]
        key = _block_key(keys[0], first)
        for j in range(stop - start):
            total[j] = (row[j] - base[j]) / divisor if _kept(key, low, j, cutoff) else zero
        for t in range(2, sources):
            row = models[t, start:stop]
            key = _block_key(keys[t - 1], first)
            for j in range(stop - start):
                total[j] += (row[j] - base[j]) / divisor if _kept(key, low, j, cutoff) else zero


@numba.njit("void(uint32[::1], uint32, boolean[:, ::1])", cache=True, nogil=True, parallel=True)
def keep_masks(keys, cutoff, out):
    """out[t, i] = the draw of (keys[t], i) is at least ``cutoff``."""
    tasks, size = out.shape
    for block in numba.prange((size + BLOCK - 1) // BLOCK):
        start = block * BLOCK
        width = min(size, start + BLOCK) - start
        low = np.uint32(np.uint64(start) & np.uint64(0xFFFFFFFF))
        for t in range(tasks):
            key = _block_key(keys[t], start)
            for j in range(width):
                out[t, start + j] = _kept(key, low, j, cutoff)
