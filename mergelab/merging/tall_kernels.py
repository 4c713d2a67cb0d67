"""numba kernels for the TALL mask rule, each fusing what would be several numpy passes.

:func:`pack_masks` computes and packs every task's mask in two passes over a block
instead of six (about 5x faster), :func:`add_masked` unpacks a mask and adds m ⊙ τMTL in
two instead of four (about 4x). Both release the GIL, so that
:class:`~mergelab.engine.workspace.BlockWorkers` threads run them side by side.

The signatures are given (float32 and float64, C-contiguous arrays, so that loops over
them vectorise: the same code over arrays of unknown strides ran about 7x slower), so
each kernel is compiled once and a caller passing anything else gets a TypeError instead
of a silent recompilation; ``cache=True`` keeps the machine
code on disk (numba's cache, beside this file or in the user's cache folder), so only the
first process to import this module compiles. The arithmetic is IEEE, in the order the
rule is written, as in numpy: no fastmath.
"""

from __future__ import annotations

import numba


def _signatures(template: str) -> list[str]:
    return [template.format(float=dtype) for dtype in ("float32", "float64")]


@numba.njit(
    _signatures("void({float}[:, ::1], {float}[::1], {float}[::1], uint8[:, :, ::1], uint8[::1])"),
    cache=True,
    nogil=True,
)
def pack_masks(taus, multitask, lambdas, out, keep):
    """out[l, t] = numpy.packbits(|τt| > λl·|τMTL − τt|) for τ [T, n], τMTL [n] and the λ
    of ``lambdas`` (in τ's dtype, so λ·|…| rounds as torch's tensor-times-scalar does);
    ``keep``: n bytes of scratch."""
    tasks, size = taus.shape
    whole = size // 8
    for row in range(lambdas.shape[0]):
        lam = lambdas[row]
        for t in range(tasks):
            tau, packed = taus[t], out[row, t]
            for i in range(size):
                keep[i] = abs(tau[i]) > lam * abs(multitask[i] - tau[i])
            for j in range(whole):
                k = 8 * j
                packed[j] = (
                    (keep[k] << 7)
                    | (keep[k + 1] << 6)
                    | (keep[k + 2] << 5)
                    | (keep[k + 3] << 4)
                    | (keep[k + 4] << 3)
                    | (keep[k + 5] << 2)
                    | (keep[k + 6] << 1)
                    | keep[k + 7]
                )
            if whole * 8 < size:
                last = 0
                for i in range(whole * 8, size):
                    last |= keep[i] << (7 - (i - whole * 8))
                packed[whole] = last


@numba.njit(
    _signatures("void({float}[::1], {float}[::1], uint8[::1], uint8[::1])"), cache=True, nogil=True
)
def add_masked(target, vector, packed, bits):
    """target += m ⊙ vector, m unpacked from ``packed`` (numpy.packbits order) into the
    scratch ``bits`` (8 per byte of ``packed``); m·v is v or ±0, as the rule's product."""
    for j in range(packed.shape[0]):
        byte = packed[j]
        for q in range(8):
            bits[8 * j + q] = (byte >> (7 - q)) & 1
    for i in range(target.shape[0]):
        target[i] = target[i] + bits[i] * vector[i]
