"""numba kernel for Task Arithmetic's sum from bfloat16 models' rows, on the calling thread
(the engine's block threads): each entry widened to float32 as it is read, rather than
the rows converted to float32 first, then τ formed, then summed (three passes over a
[T + 1, n] block, two of them float32 temporaries)."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(inline="always")
def _widened(bits):
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
        out[j] = _widened(first[j]) - _widened(base[j])
    for t in range(2, sources):
        row = models[t]
        for j in range(size):
            out[j] += _widened(row[j]) - _widened(base[j])
