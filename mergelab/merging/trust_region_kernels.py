"""numba kernels for zero-shot TATR on the CPU, on the calling thread (the engine's block
threads): Ω and Σ τ of a block in one pass from the models' rows, where
:func:`~mergelab.merging.trust_region.zero_shot_conflict` and
:func:`~mergelab.merging.task_arithmetic.task_vector_sum` make eight passes over [T, n]
float32 temporaries (τ, |τ|, τ², their sums). The arithmetic is theirs, in their order:
IEEE float32, sums task by task from the first task's value, no fastmath, so the bits
are the same. Kernel: 0.17 ns per entry against 1.4 for the numpy passes (8 tasks).
``mergelab merge``'s zero-shot TATR of a bf16 model of 0.3 G parameters and 8
fine-tunes, warm (scripts/bench_model_merge.py's models): user CPU 9.8-10.8 → 4.9-5.0 s,
wall 10.8-11.3 → 7.2-8.0 s, the same bytes written.
"""

from __future__ import annotations

import numba
import numpy as np

from mergelab.merging.task_arithmetic_kernels import widened

_BLOCK = 1024  # columns at a time: their three running sums stay in the L1 cache


@numba.njit(inline="always")
def _as_float32(value):
    return value


@numba.njit(inline="always")
def _conflict_and_sum(models, omega, delta, value_of):
    """The kernels' loop; ``value_of`` gives a stored entry's float32 value."""
    sources, size = models.shape
    magnitudes = np.empty(_BLOCK, np.float32)
    squares = np.empty(_BLOCK, np.float32)
    for start in range(0, size, _BLOCK):
        stop = min(size, start + _BLOCK)
        base, first = models[0, start:stop], models[1, start:stop]
        total, magnitude, square = delta[start:stop], magnitudes, squares
        for j in range(stop - start):
            tau = value_of(first[j]) - value_of(base[j])
            total[j] = tau
            magnitude[j] = abs(tau)
            square[j] = tau * tau
        for t in range(2, sources):
            row = models[t, start:stop]
            for j in range(stop - start):
                tau = value_of(row[j]) - value_of(base[j])
                total[j] += tau
                magnitude[j] += abs(tau)
                square[j] += tau * tau
        out = omega[start:stop]
        for j in range(stop - start):
            value = magnitude[j] * magnitude[j] - square[j]
            # numpy's maximum(value, 0): NaN kept, and value where value >= 0 (-0 too)
            out[j] = value if (value >= 0) | (value != value) else np.float32(0)


@numba.njit(["void(float32[:, ::1], float32[::1], float32[::1])"], cache=True, nogil=True)
def zero_shot_conflict_and_sum(models, omega, delta):
    """Ω = max((Σt |τt|)² − Σt τt², 0) into ``omega`` and δ = Σt τt into ``delta``, with
    τt = models[t] − models[0], for the float32 models' rows [T + 1, n] (θ0 first). A
    NaN or Inf in τ makes Ω NaN there: callers check Ω."""
    _conflict_and_sum(models, omega, delta, _as_float32)


@numba.njit(["void(uint16[:, ::1], float32[::1], float32[::1])"], cache=True, nogil=True)
def zero_shot_conflict_and_sum_bfloat16(models, omega, delta):
    """:func:`zero_shot_conflict_and_sum` for bfloat16 models' rows given as their bits,
    each entry widened to float32 as it is read (τt = float32(θt) − float32(θ0))."""
    _conflict_and_sum(models, omega, delta, widened)
