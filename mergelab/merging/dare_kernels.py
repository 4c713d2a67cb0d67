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
_BLOCK = 4096  # coordinates per parallel block; 2^32 is a multiple: i >> 32 is the block's


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
    for block in numba.prange((size + _BLOCK - 1) // _BLOCK):
        start = block * _BLOCK
        width = min(size, start + _BLOCK) - start
        for t in range(tasks):
            row = task_vectors[t, start : start + width]
            key = _block_key(keys[t], start)
            low = np.uint32(np.uint64(start) & np.uint64(0xFFFFFFFF))
            zero = row[0] - row[0]
            for j in range(width):
                kept = _kept(key, low, j, cutoff)
                value = row[j] / divisor
                row[j] = value if kept else zero


@numba.njit("void(uint32[::1], uint32, boolean[:, ::1])", cache=True, nogil=True, parallel=True)
def keep_masks(keys, cutoff, out):
    """out[t, i] = the draw of (keys[t], i) is at least ``cutoff``."""
    tasks, size = out.shape
    for block in numba.prange((size + _BLOCK - 1) // _BLOCK):
        start = block * _BLOCK
        width = min(size, start + _BLOCK) - start
        low = np.uint32(np.uint64(start) & np.uint64(0xFFFFFFFF))
        for t in range(tasks):
            key = _block_key(keys[t], start)
            for j in range(width):
                out[t, start + j] = _kept(key, low, j, cutoff)
