"""numba kernel for :func:`mergelab.merging.finite.rows_finite`: whether rows of floats
are all finite, decided on their bits."""

from __future__ import annotations

import numba


@numba.njit(
    ["boolean(uint32[:, ::1], uint32)", "boolean(uint64[:, ::1], uint64)"],
    cache=True,
    nogil=True,
)
def exponents_below(bits, exponent):
    """Whether every float of ``bits`` (a float array's view as unsigned integers of its
    width) has exponent bits below ``exponent`` (all ones: Inf or NaN): an integer max,
    which vectorises where a float test does not."""
    rows, size = bits.shape
    top = exponent - exponent
    for t in range(rows):
        row = bits[t]
        for j in range(size):
            top = max(top, row[j] & exponent)
    return top < exponent
