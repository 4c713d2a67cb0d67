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
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch

from mergelab.errors import BadValue

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
            raise BadValue(f"rank {rank} is outside 0..{total - 1}")
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


# A magnitude's float32 bits (sign bit 0) order like the magnitudes: the upper 20 of its 31
# bits locate a bucket 2^-12 of a value wide, the lower 11 pin the value inside it
MAGNITUDE_LOW_BITS = 11
MAGNITUDE_BUCKETS = 1 << (31 - MAGNITUDE_LOW_BITS)
_LOW_BINS = 1 << MAGNITUDE_LOW_BITS
# coarse buckets, four an octave (the upper 10 bits: exponent and two of the fraction's)
COARSE_LOW_BITS = 21
COARSE_BUCKETS = 1 << (31 - COARSE_LOW_BITS)
COARSE_SHIFT = COARSE_LOW_BITS - MAGNITUDE_LOW_BITS  # a bucket's coarse bucket: bucket >> this


def magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """The int32 bits of each float32(|value|), flat: their order is the magnitudes'."""
    return values.detach().abs().to(torch.float32).reshape(-1).view(torch.int32)


def _bits_to_float(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def rank_bucket(coarse_counts: np.ndarray, counts: Sequence[np.ndarray], rank: int) -> int:
    """The bucket (of 2^20) holding 0-based ``rank`` of magnitudes counted per bucket in
    ``counts`` (added together: one array per thread), given their counts per coarse
    bucket (of 2^10, :data:`COARSE_LOW_BITS`): the coarse bucket first, then only its own
    buckets are read (pages of counts never touched stay unmapped)."""
    coarse_cumulative = np.cumsum(coarse_counts, dtype=np.int64)
    coarse = int(np.searchsorted(coarse_cumulative, rank, side="right"))
    below = int(coarse_cumulative[coarse - 1]) if coarse else 0
    width = 1 << COARSE_SHIFT
    inside = sum(part[coarse * width : (coarse + 1) * width].astype(np.int64) for part in counts)
    return coarse * width + int(np.searchsorted(np.cumsum(inside), rank - below, side="right"))


def count_below(coarse_counts: np.ndarray, counts: Sequence[np.ndarray], bucket: int) -> int:
    """How many magnitudes lie in the buckets (of 2^20) below ``bucket``, from the counts
    of :func:`rank_bucket`, reading only the buckets of ``bucket``'s coarse bucket."""
    coarse, width = bucket >> COARSE_SHIFT, 1 << COARSE_SHIFT
    inside = sum(int(part[coarse * width : bucket].sum(dtype=np.int64)) for part in counts)
    return int(coarse_counts[:coarse].sum(dtype=np.int64)) + inside


def bucket_floor(bucket: int) -> float:
    """The smallest magnitude in a bucket (of 2^20)."""
    return _bits_to_float(bucket << MAGNITUDE_LOW_BITS)


class MagnitudeSelect:
    """The value of 0-based ``rank`` among ``total`` magnitudes (float32 |values|), for
    each of ``rows`` streams at once (TIES: one per task vector).

    The first pass counts each row's magnitudes per bucket into :attr:`counts` [rows,
    2^20] (:meth:`observe`, or a compiled kernel adding to the same array); :meth:`locate`
    then finds each row's bucket holding the rank. Magnitudes below its :meth:`bounds`
    are certainly smaller than the result, those at or above them certainly not. The
    value is pinned either from every magnitude of that bucket (:meth:`resolve`: callers
    that kept them) or by a second pass counting the low bits inside the bucket
    (:meth:`observe_low`, then :meth:`value`).
    """

    def __init__(self, rank: int, total: int, rows: int):
        if not 0 <= rank < total:
            raise BadValue(f"rank {rank} is outside 0..{total - 1}")
        self.rank = rank
        self.total = total
        # int32 where no count can reach 2^31: half the memory (T × 4 MiB)
        wide = total >= 2**31
        self.counts = torch.zeros(
            rows, MAGNITUDE_BUCKETS, dtype=torch.int64 if wide else torch.int32
        )
        self.buckets: list[int] | None = None
        self._low = torch.zeros(rows, _LOW_BINS, dtype=torch.int64)
        self._rank_in_bucket: list[int] = []
        self._in_bucket: list[int] = []

    def observe(self, values: torch.Tensor) -> None:
        """First pass: add the magnitudes of ``values`` [rows, …] (any device) to the counts."""
        for row, part in zip(self.counts, values, strict=True):
            buckets = magnitude_bits(part) >> MAGNITUDE_LOW_BITS
            row += torch.bincount(buckets, minlength=MAGNITUDE_BUCKETS).cpu().to(row.dtype)

    def locate(self) -> None:
        """End of the first pass: each row's bucket and the rank inside it."""
        seen = self.counts.sum(1, dtype=torch.int64)
        if (seen != self.total).any():
            raise RuntimeError(f"MagnitudeSelect saw {seen.tolist()} values, expected {self.total}")
        cumulative = self.counts.cumsum(1, dtype=torch.int64)
        self.buckets = (
            torch.searchsorted(cumulative, torch.full((len(cumulative), 1), self.rank), right=True)
            .reshape(-1)
            .tolist()
        )
        for row, bucket in enumerate(self.buckets):
            below = int(cumulative[row, bucket - 1]) if bucket else 0
            self._rank_in_bucket.append(self.rank - below)
            self._in_bucket.append(int(self.counts[row, bucket]))

    def in_bucket(self) -> list[int]:
        """Each row's count of magnitudes inside its bucket."""
        self._located()
        return list(self._in_bucket)

    def bounds(self) -> tuple[list[float], list[float]]:
        """Each row's bucket as [low, high): the smallest magnitude in it, the smallest above."""
        lows = [_bits_to_float(bucket << MAGNITUDE_LOW_BITS) for bucket in self._located()]
        highs = [_bits_to_float((bucket + 1) << MAGNITUDE_LOW_BITS) for bucket in self._located()]
        return lows, highs

    def resolve(self, row: int, in_bucket: torch.Tensor) -> float:
        """The row's value from every one of its magnitudes inside its bucket."""
        self._located()
        if in_bucket.numel() != self._in_bucket[row]:
            raise RuntimeError(
                f"MagnitudeSelect row {row}: {in_bucket.numel()} values in the bucket, "
                f"the first pass counted {self._in_bucket[row]}"
            )
        magnitudes = in_bucket.abs().to(torch.float32).reshape(-1)
        return torch.kthvalue(magnitudes.cpu(), self._rank_in_bucket[row] + 1).values.item()

    def observe_low(self, values: torch.Tensor) -> None:
        """Second pass: add the low bits of the magnitudes of ``values`` [rows, …] that lie
        in their row's bucket."""
        for row, (bucket, part) in enumerate(zip(self._located(), values, strict=True)):
            bits = magnitude_bits(part)
            inside = bits[(bits >> MAGNITUDE_LOW_BITS) == bucket] & (_LOW_BINS - 1)
            self._low[row] += torch.bincount(inside, minlength=_LOW_BINS).cpu()

    def low_counts(self, values: torch.Tensor) -> np.ndarray:
        """What :meth:`observe_low` would add for float32 ``values`` [rows, …] on the CPU,
        counted in numpy without touching this object: threads count their blocks side by
        side, then :meth:`add_low` each result."""
        bits = values.numpy().view(np.uint32).reshape(len(self._located()), -1)
        counts = np.zeros((len(bits), _LOW_BINS), dtype=np.int64)
        for row, (bucket, part) in enumerate(zip(self._located(), bits, strict=True)):
            magnitude = part & np.uint32(0x7FFFFFFF)  # float32 |v|: the sign bit cleared
            inside = magnitude[(magnitude >> MAGNITUDE_LOW_BITS) == bucket] & (_LOW_BINS - 1)
            counts[row] = np.bincount(inside, minlength=_LOW_BINS)
        return counts

    def add_low(self, counts: np.ndarray) -> None:
        """Add counts of :meth:`low_counts` to the second pass."""
        self._low += torch.from_numpy(counts)

    def values(self) -> list[float]:
        """After the second pass: each row's value."""
        found = []
        for row, bucket in enumerate(self._located()):
            if int(self._low[row].sum()) != self._in_bucket[row]:
                raise RuntimeError("MagnitudeSelect.values needs a complete second pass")
            cumulative = self._low[row].cumsum(0)
            low = int(torch.searchsorted(cumulative, self._rank_in_bucket[row], right=True))
            found.append(_bits_to_float((bucket << MAGNITUDE_LOW_BITS) | low))
        return found

    def _located(self) -> list[int]:
        if self.buckets is None:
            raise RuntimeError("MagnitudeSelect: locate() after the first pass")
        return self.buckets
