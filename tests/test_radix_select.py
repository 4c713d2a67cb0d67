"""RadixSelect, the streamed exact k-th smallest value, against torch.kthvalue."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mergelab.engine.workspace import sparse_zeros
from mergelab.merging.magnitude_kernels import add_piece_magnitude_counts
from mergelab.merging.quantile import (
    COARSE_BUCKETS,
    MAGNITUDE_BUCKETS,
    RadixSelect,
    bucket_floor,
    count_below,
    quantile_rank,
    rank_bucket,
)

# a small pool of awkward float32 values, so ties, both zeros and both signs are common
SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 1e-38, -1e-38, 1e-45, -1e-45, 3.4e38, -3.4e38]
VALUES = st.one_of(
    st.sampled_from(SPECIAL),
    st.sampled_from([math.inf, -math.inf]),
    st.floats(width=32, allow_nan=False),
    st.integers(-3, 3).map(float),
)


def _chunks(values: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    bounds = sorted({0, values.numel(), *(c % (values.numel() + 1) for c in cuts)})
    return [values[a:b] for a, b in itertools.pairwise(bounds)]


def _select(values: torch.Tensor, rank: int, first: list, second: list) -> float:
    select = RadixSelect(rank, values.numel())
    for chunk in first:
        select.observe(chunk)
    select.next_pass()
    for chunk in second:
        select.observe(chunk)
    return select.value


@given(
    values=st.lists(VALUES, min_size=1, max_size=300),
    data=st.data(),
)
def test_radix_select_matches_kthvalue(values, data):
    tensor = torch.tensor(values, dtype=torch.float32)
    n = tensor.numel()
    rank = data.draw(st.integers(0, n - 1), label="rank")
    # each pass chunked differently, the second pass in another order, chunks 2-D at times
    first = _chunks(tensor, data.draw(st.lists(st.integers(0, n), max_size=6), label="cuts1"))
    second = _chunks(tensor, data.draw(st.lists(st.integers(0, n), max_size=6), label="cuts2"))
    second = data.draw(st.permutations(second), label="order")
    first = [c.reshape(1, -1) if c.numel() % 2 else c for c in first]
    expected = torch.kthvalue(tensor, rank + 1).values.item()
    got = _select(tensor, rank, first, second)
    assert got == expected  # -0.0 == +0.0: a zero of either sign is the same threshold
    # at most rank values lie strictly below it, more than rank at or below it
    assert int((tensor < got).sum()) <= rank < int((tensor <= got).sum())


def test_radix_select_orders_negative_zero_below_positive_values():
    tensor = torch.tensor([0.0, -0.0, -1e-45, 1e-45, -0.0, 0.0])
    for rank in range(tensor.numel()):
        expected = torch.kthvalue(tensor, rank + 1).values.item()
        assert _select(tensor, rank, [tensor], [tensor]) == expected


def test_radix_select_on_three_million_values():
    # beyond what a single radix bucket of 65,536 bins sees in one pass; torch.quantile
    # refuses more than 2**24 values, and RadixSelect must not depend on that
    gen = torch.Generator().manual_seed(0)
    values = torch.cat(
        [
            torch.randn(2_000_000, generator=gen),
            torch.randint(-50, 50, (1_000_000,), generator=gen).float() / 8,
            torch.zeros(50_000),
            -torch.zeros(50_000),
        ]
    )
    values = values[torch.randperm(values.numel(), generator=gen)]
    chunks = list(values.split(777_777))
    for rank in (0, 1_234_567, quantile_rank(0.99, values.numel()), values.numel() - 1):
        expected = torch.kthvalue(values, rank + 1).values.item()
        assert _select(values, rank, chunks, chunks[::-1]) == expected


def test_radix_select_refuses_misuse():
    with pytest.raises(ValueError, match="rank"):
        RadixSelect(5, 5)
    with pytest.raises(ValueError, match="rank"):
        RadixSelect(-1, 5)
    select = RadixSelect(1, 3)
    with pytest.raises(RuntimeError):
        select.value  # noqa: B018 -- before any pass
    select.observe(torch.ones(2))
    with pytest.raises(RuntimeError, match="saw 2"):
        select.next_pass()  # one value missing
    select.observe(torch.ones(1))
    select.next_pass()
    with pytest.raises(RuntimeError):
        select.next_pass()
    select.observe(torch.ones(3))
    assert select.value == 1.0


@pytest.mark.parametrize(
    ("q", "n", "rank"), [(0.29, 100, 29), (0.57, 100, 57), (1.0, 7, 7), (0.99, 1000, 990)]
)
def test_quantile_rank_reads_the_decimal(q, n, rank):
    assert quantile_rank(q, n) == rank


@given(
    magnitudes=st.lists(st.floats(0, width=32, allow_infinity=False), min_size=1, max_size=400),
    data=st.data(),
)
def test_rank_bucket_count_below_and_the_sample_kernel_match_a_sort(magnitudes, data):
    """The sample's counts (per bucket and per coarse bucket, from the models' rows, in
    per-thread arrays) and the two-level bucket search give the bucket of the rank-th
    smallest magnitude of a sort."""
    base = np.zeros(len(magnitudes), np.float32)
    signs = data.draw(
        st.lists(st.sampled_from([1, -1]), min_size=len(magnitudes), max_size=len(magnitudes))
    )
    models = np.stack([base, np.array(magnitudes, np.float32) * np.array(signs, np.float32)])
    threads = data.draw(st.integers(1, 3), label="threads")
    counts = [sparse_zeros((1, MAGNITUDE_BUCKETS), np.int32) for _ in range(threads)]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(magnitudes)), max_size=3), label="cuts"))
    edges = list(itertools.pairwise([0, *cuts, len(magnitudes)]))
    piece_counts = sparse_zeros((1, COARSE_BUCKETS, len(edges)), np.int32)
    for number, (start, stop) in enumerate(edges):
        piece = np.ascontiguousarray(models[:, start:stop])
        add_piece_magnitude_counts(piece, counts[number % threads], piece_counts, number)
    coarse = piece_counts.sum(2)
    rank = data.draw(st.integers(0, len(magnitudes) - 1), label="rank")
    value = sorted(magnitudes)[rank]
    bucket = rank_bucket(coarse[0], [part[0] for part in counts], rank)
    assert bucket_floor(bucket) <= value < bucket_floor(bucket + 1)
    fine = np.array(magnitudes, np.float32).view(np.int32) >> 11
    for edge in (bucket, bucket + 1, int(fine.min()), int(fine.max()) + 1):
        below = count_below(coarse[0], [part[0] for part in counts], edge)
        assert below == int((fine < edge).sum())
    bits = np.array(magnitudes, np.float32).view(np.int32)
    for number, (start, stop) in enumerate(edges):
        expected = np.bincount(bits[start:stop] >> 21, minlength=COARSE_BUCKETS)
        assert piece_counts[0, :, number].tolist() == expected.tolist()
