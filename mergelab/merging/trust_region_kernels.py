"""A numba kernel for zero-shot TATR over bfloat16 models on the CPU, on the calling
thread (the engine's block threads): Ω and Σ τ of a block in one pass from the models'
stored rows, where the rows widened to float32,
:func:`~mergelab.merging.trust_region.zero_shot_conflict` and
:func:`~mergelab.merging.task_arithmetic.task_vector_sum` make eight passes over [T, n]
float32 temporaries (τ, |τ|, τ², their sums). The arithmetic is theirs, in their order:
IEEE float32, sums task by task from the first task's value, no fastmath, so the bits
are the same. Kernel: 0.15 ns per entry against 1.4 for the numpy passes (8 tasks).
Float32 models keep the numpy passes: loading numba costs 127 MB of RSS, which would
take TATR in memory (scripts/bench_merge.py, ViT-B/32) past its 3 models.
``mergelab merge``'s zero-shot TATR of a bf16 model of 0.3 G parameters and 8
fine-tunes, warm (scripts/bench_model_merge.py's models): user CPU 9.8-10.8 → 4.9-5.0 s,
wall 10.8-11.3 → 7.2-8.0 s, the same bytes written.
"""

from __future__ import annotations

import numba
import numpy as np

from mergelab.merging.task_arithmetic_kernels import widened

_BLOCK = 1024  # columns at a time: their three running sums stay in the L1 cache


@numba.njit(["void(uint16[:, ::1], float32[::1], float32[::1])"], cache=True, nogil=True)
def zero_shot_conflict_and_sum_bfloat16(models, omega, delta):
    """Ω = max((Σt |τt|)² − Σt τt², 0) into ``omega`` and δ = Σt τt into ``delta``, with
    τt = float32(θt) − float32(θ0), for the bfloat16 models' rows [T + 1, n] given as
    their bits (θ0 first), each entry widened as it is read. A NaN or Inf in τ makes Ω
    NaN there: callers check Ω."""
    sources, size = models.shape
    magnitudes = np.empty(_BLOCK, np.float32)
    squares = np.empty(_BLOCK, np.float32)
    for start in range(0, size, _BLOCK):
        stop = min(size, start + _BLOCK)
        base, first = models[0, start:stop], models[1, start:stop]
        total, magnitude, square = delta[start:stop], magnitudes, squares
        for j in range(stop - start):
            tau = widened(first[j]) - widened(base[j])
            total[j] = tau
            magnitude[j] = abs(tau)
            square[j] = tau * tau
        for t in range(2, sources):
            row = models[t, start:stop]
            for j in range(stop - start):
                tau = widened(row[j]) - widened(base[j])
                total[j] += tau
                magnitude[j] += abs(tau)
                square[j] += tau * tau
        out = omega[start:stop]
        for j in range(stop - start):
            value = magnitude[j] * magnitude[j] - square[j]
            # numpy's maximum(value, 0): NaN kept, and value where value >= 0 (-0 too)
            out[j] = value if (value >= 0) | (value != value) else np.float32(0)
