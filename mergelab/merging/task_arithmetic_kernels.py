"""numba kernels for bfloat16 models, on the calling thread (the engine's block threads, or
the thread writing a model): Task Arithmetic's sum from the models' rows, and θ0 + λ·δ
rounded to bfloat16. Each entry is widened to float32 as it is read, rather than the
rows converted to float32 first (passes over float32 temporaries)."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(inline="always")
def widened(bits):
    """A bfloat16's float32 value from its 16 bits: the upper half of a float32."""
    return np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32)


@numba.njit(["void(uint16[:, ::1], float32[::1])"], cache=True, nogil=True)
def sum_bfloat16_task_vectors(models, out):
    """out = Σt τt, τt = float32(θt) − float32(θ0), for the bfloat16 models' rows [T + 1, n]
    given as their bits (θ0 first): each τt rounded once in float32 and added task by
    task, as :func:`~mergelab.merging.task_arithmetic.task_vector_sum` adds them (the
    first copied, not added to 0: −0 stays −0)."""
    sources, size = models.shape
    base, first = models[0], models[1]
    for j in range(size):
        out[j] = widened(first[j]) - widened(base[j])
    for t in range(2, sources):
        row = models[t]
        for j in range(size):
            out[j] += widened(row[j]) - widened(base[j])


@numba.njit(["boolean(uint16[::1], float32[::1], float32, uint16[::1])"], cache=True, nogil=True)
def add_scaled_to_bfloat16(base, delta, factor, out):
    """out = bfloat16(float32(θ0) + λ·δ) for bfloat16 θ0 and float32 δ given as bits: λ·δ
    and the sum each rounded once in float32, then rounded to nearest bfloat16 (ties to
    even), as :func:`~mergelab.merging.task_arithmetic.apply_task_vector` computes it
    with torch's temporaries (three of them, a piece's size each). Returns whether
    every result is finite."""
    finite = True
    for j in range(base.shape[0]):
        scaled = delta[j] * factor
        bits = np.float32(scaled + widened(base[j])).view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> 16
        out[j] = np.uint16(rounded)
        finite &= (rounded & np.uint32(0x7F80)) != np.uint32(0x7F80)
    return finite
