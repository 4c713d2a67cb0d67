"""Zero-shot TATR's bfloat16 kernel (merging/trust_region_kernels.py) against a
transcription it must equal bit for bit: τt = float32(θt) − float32(θ0); Ω = max((Σt
|τt|)² − Σt τt², 0) and δ = Σt τt, each sum taken task by task from the first task's
value, every operation rounded in float32; and zero-shot TATR over bfloat16 and float32
models, end to end, against the naive double loop."""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import naive
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import assert_states_equal, families, stored_as, written_model

from mergelab import ModelPool
from mergelab.engine import trust_region_streamed
from mergelab.engine.trust_region import trust_region_vector
from mergelab.merging.trust_region_kernels import zero_shot_conflict_and_sum_bfloat16

VALUES = st.one_of(
    st.floats(-1e3, 1e3, width=32),
    st.just(-0.0),
    st.integers(-3, 3).map(float),
    # a subnormal, a square that overflows float32, NaN and Inf
    st.sampled_from([1e-40, -1e-40, 3e20, 3e38, math.nan, math.inf]),
)


def _transcription(models: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ω, δ) of float32 rows [T + 1, n], one float32 operation at a time."""
    taus = [row - models[0] for row in models[1:]]
    magnitude, square, total = taus[0].abs(), taus[0] * taus[0], taus[0].clone()
    for tau in taus[1:]:
        magnitude = magnitude + tau.abs()
        square = square + tau * tau
        total = total + tau
    omega = magnitude * magnitude - square
    omega = torch.where(omega < 0, torch.zeros_like(omega), omega)  # NaN and −0 stay
    return omega, total


def _assert_same_bits(got: np.ndarray, expected: torch.Tensor) -> None:
    expected = expected.numpy()
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    same = ~np.isnan(expected)
    assert np.array_equal(got[same].view(np.uint32), expected[same].view(np.uint32))


def _bits(models: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(models.bfloat16().view(torch.int16).numpy().view(np.uint16))


@given(data=st.data(), tasks=st.integers(1, 5), size=st.integers(1, 2100))
def test_the_bfloat16_kernel_equals_the_float32_transcription(data, tasks, size):
    """Widths over the kernel's 1024 columns at a time."""
    values = st.lists(VALUES, min_size=size, max_size=size)
    models = torch.tensor([data.draw(values) for _ in range(tasks + 1)]).bfloat16()
    omega, delta = np.empty(size, np.float32), np.empty(size, np.float32)
    zero_shot_conflict_and_sum_bfloat16(_bits(models), omega, delta)
    expected_omega, expected_delta = _transcription(models.float())
    _assert_same_bits(omega, expected_omega)
    _assert_same_bits(delta, expected_delta)


def test_a_hand_worked_block():
    """θ0 = 0, τ1 = (1, −2, 0), τ2 = (3, 2, −0): Ω = (|1|+|3|)² − (1+9) = 6, (2+2)² − 8 = 8
    and 0; δ = (4, 0, +0)."""
    models = torch.tensor([[0, 0, 0], [1, -2, 0], [3, 2, -0.0]])
    omega, delta = np.empty(3, np.float32), np.empty(3, np.float32)
    zero_shot_conflict_and_sum_bfloat16(_bits(models), omega, delta)
    assert omega.tolist() == [6, 8, 0] and delta.tolist() == [4, 0, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@given(family=families(), q=st.sampled_from([0.99, 0.9, 0.5, 0.1]), missed=st.booleans())
def test_zero_shot_tatr_over_stored_models_equals_the_naive_double_loop(dtype, family, q, missed):
    """Integer-valued models (exact in bfloat16 and in every sum), stored as ``dtype``, in
    several of the engine's blocks: bfloat16 takes the kernel, float32 numpy. In memory,
    and written as ``mergelab merge`` writes (θ0 put back from its stored bits where the
    threshold drops a coordinate; or, the floor above every Ω, written again)."""
    pretrained = stored_as(family.pretrained, dtype)
    finetuned = {task: stored_as(model, dtype) for task, model in family.finetuned.items()}
    delta, _, threshold, _ = naive.trust_region_parts(family.pretrained, family.finetuned, q)

    pool = ModelPool(pretrained, finetuned)
    pool.chunk = 8
    merged = trust_region_vector(pool, q)
    assert merged.threshold == threshold
    assert_states_equal(merged.delta, delta)

    high = mock.patch.object(trust_region_streamed, "conflict_floor", return_value=math.inf)
    with high if missed else contextlib.nullcontext():
        streamed = trust_region_streamed.StreamedTrustRegion(pool, q, None)
        model = written_model(pool, streamed)
    assert streamed.threshold == threshold
    assert_states_equal(model, stored_as(naive.assemble(family.pretrained, delta, 1.0), dtype))
