"""bfloat16 models' kernels (merging/task_arithmetic_kernels.py) against transcriptions
they must equal bit for bit: Task Arithmetic's sum, τt = float32(θt) − float32(θ0) added
task by task; and θ0 + λ·δ in float32, rounded to the nearest bfloat16."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mergelab import ModelPool
from mergelab.engine.task_arithmetic import task_arithmetic_vector
from mergelab.merging.task_arithmetic_kernels import add_scaled_to_bfloat16

VALUES = st.one_of(
    st.floats(-1e3, 1e3, width=32),
    st.just(-0.0),
    st.integers(-3, 3).map(float),
    st.sampled_from([1e-40, -1e-40, 3e38]),  # a subnormal, and a float32 sum that overflows
)


def _pool(models: list[torch.Tensor]) -> ModelPool:
    pretrained = {"w": models[0]}
    finetuned = {f"t{number}": {"w": model} for number, model in enumerate(models[1:])}
    pool = ModelPool(pretrained, finetuned)
    pool.chunk = 64  # several blocks, on the block threads
    return pool


@given(data=st.data(), tasks=st.integers(1, 4), size=st.integers(1, 300))
def test_bfloat16_models_sum_their_float32_task_vectors_in_task_order(data, tasks, size):
    models = [
        torch.tensor(data.draw(st.lists(VALUES, min_size=size, max_size=size))).bfloat16()
        for _ in range(tasks + 1)
    ]
    taus = [model.float() - models[0].float() for model in models[1:]]
    expected = taus[0].clone()
    for tau in taus[1:]:
        expected = expected + tau
    if not torch.isfinite(expected).all():
        with pytest.raises(ValueError, match="'w'"):
            task_arithmetic_vector(_pool(models))
        return
    delta = task_arithmetic_vector(_pool(models))["w"]
    assert delta.dtype == torch.float32
    assert torch.equal(delta.view(torch.int32), expected.view(torch.int32))  # −0 too


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_bfloat16_task_vector_not_finite_is_named(bad):
    models = [torch.zeros(200, dtype=torch.bfloat16) for _ in range(3)]
    models[2][150] = bad
    with pytest.raises(ValueError, match="task vector of 't1' has NaN or Inf values at 'w'"):
        task_arithmetic_vector(_pool(models))


def _nearest_bfloat16(value: np.float32) -> float:
    """The bfloat16 nearest a float32 (ties to the even last bit), as a float: between the
    two bfloat16 values around it, by their distances in float64 (exact: all three are
    float32 values of one binade or two)."""
    if not math.isfinite(value):
        return float(value)
    bits = int(np.float32(value).view(np.uint32))
    low = bits & 0xFFFF0000  # toward 0
    near = [np.uint32(low).view(np.float32), np.uint32(low + 0x10000).view(np.float32)]
    below, above = (float(abs(v)) for v in near)
    magnitude = abs(float(value))
    if magnitude - below < above - magnitude or (
        magnitude - below == above - magnitude and not low & 0x10000
    ):
        return float(near[0])
    return float(near[1])  # past the largest finite bfloat16: ±Inf


@given(
    data=st.data(),
    size=st.integers(1, 200),
    factor=st.one_of(st.floats(-4, 4, width=32), st.just(1.0), st.just(0.3)),
)
def test_theta0_plus_scaled_delta_rounds_once_more_to_nearest_bfloat16(data, size, factor):
    base = torch.tensor(data.draw(st.lists(VALUES, min_size=size, max_size=size))).bfloat16()
    # halfway between bfloat16 neighbours beside θ0 = 1, 2 or 3 (a tie, with λ = 1)
    halves = st.sampled_from([2**-8, -(2**-8), 3 * 2**-8, 2**-7, 5 * 2**-7])
    entries = st.one_of(VALUES, halves)
    delta = torch.tensor(data.draw(st.lists(entries, min_size=size, max_size=size)))
    factor32 = np.float32(factor)
    expected = []
    with np.errstate(over="ignore"):
        for theta, change in zip(base.float().numpy(), delta.numpy(), strict=True):
            expected.append(_nearest_bfloat16(np.float32(change * factor32) + theta))
    out = torch.empty(size, dtype=torch.bfloat16)
    bits = [tensor.view(torch.int16).numpy().view(np.uint16) for tensor in (base, out)]
    finite = add_scaled_to_bfloat16(bits[0], delta.numpy(), factor32, bits[1])
    assert finite == all(math.isfinite(value) for value in expected)
    assert out.float().tolist() == expected
    signs = [math.copysign(1, value) for value in expected]
    assert [math.copysign(1, value) for value in out.float().tolist()] == signs  # −0 too
