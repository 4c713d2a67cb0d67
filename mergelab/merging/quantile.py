"""Exact k-th smallest value of a stream of float tensors, in two passes, in O(1) memory.

A global sort of Ω (REFERENCE §2, pitfall 3) costs about 12 bytes per parameter, and
``torch.quantile`` refuses inputs above 2**24 elements. Instead, each float32 value is
mapped to a 32-bit integer with the same order (radix select): the first pass counts
values per bucket of the upper 16 bits, which locates the bucket holding the wanted
rank; the second pass counts the lower 16 bits inside that bucket, which pins the exact
value. Memory is two 65,536-bin histograms whatever the stream's length.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

_BINS = 1 << 16
_SIGN_FLIP = 0x7FFFFFFF


def quantile_rank(q: float, n: int) -> int:
    """0-based rank ⌊q·n⌋ of the q-quantile among n values, q taken as the decimal written.

    ``Fraction(repr(q))`` keeps 0.29 · 100 at 29 instead of 28.999….
    """
    return math.floor(Fraction(repr(float(q))) * n)


def _sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys whose signed order is the float order of ``values`` (-0.0 just below +0.0)."""
    bits = values.detach().to(torch.float32).reshape(-1).view(torch.int32)
    # negative floats: flip the magnitude bits so that larger magnitudes sort lower
    return bits ^ ((bits >> 31) & _SIGN_FLIP)


def _key_to_float(key: int) -> float:
    key = torch.tensor([key], dtype=torch.int32)
    bits = key ^ ((key >> 31) & _SIGN_FLIP)
    return bits.view(torch.float32).item()


class RadixSelect:
    """Finds the value of 0-based ``rank`` among ``total`` float32 values streamed twice.

    Usage: call :meth:`observe` on every chunk, :meth:`next_pass`, call :meth:`observe`
    on the same chunks again (any order, any chunking), then read :attr:`value`.
    The values may be on any device (the histograms stay on the CPU).
    :meth:`observe` returns each value's upper-16-bit bucket; in the second pass,
    values in buckets below :attr:`bucket` are certainly smaller than the result and
    values above it certainly larger, so callers can act on them at once.
    """

    def __init__(self, rank: int, total: int):
        if not 0 <= rank < total:
            raise ValueError(f"rank {rank} is outside 0..{total - 1}")
        self.rank = rank
        self.total = total
        self.bucket: int | None = None
        self._counts = torch.zeros(_BINS, dtype=torch.int64)
        self._seen = 0
        self._rank_in_bucket = 0

    def observe(self, values: torch.Tensor) -> torch.Tensor:
        keys = _sortable_keys(values)
        buckets = (keys >> 16) + (_BINS // 2)
        if self.bucket is None:
            self._counts += torch.bincount(buckets, minlength=_BINS).cpu()
        else:
            low = keys[buckets == self.bucket] & (_BINS - 1)
            self._counts += torch.bincount(low, minlength=_BINS).cpu()
        self._seen += keys.numel()
        return buckets

    def next_pass(self) -> None:
        if self.bucket is not None:
            raise RuntimeError("RadixSelect takes exactly two passes")
        self._check_seen()
        cumulative = self._counts.cumsum(0)
        self.bucket = int(torch.searchsorted(cumulative, self.rank, right=True))
        below = int(cumulative[self.bucket - 1]) if self.bucket else 0
        self._rank_in_bucket = self.rank - below
        self._counts.zero_()
        self._seen = 0

    @property
    def value(self) -> float:
        if self.bucket is None:
            raise RuntimeError("RadixSelect.value needs both passes")
        self._check_seen()
        low = int(torch.searchsorted(self._counts.cumsum(0), self._rank_in_bucket, right=True))
        return _key_to_float(((self.bucket - _BINS // 2) << 16) | low)

    def _check_seen(self) -> None:
        if self._seen != self.total:
            raise RuntimeError(f"RadixSelect saw {self._seen} values, expected {self.total}")
