"""Task Arithmetic over bfloat16 models: the kernel that widens each entry as it reads it
(merging/task_arithmetic_kernels.py) against a transcription of the float32 sum it must
equal bit for bit: τt = float32(θt) − float32(θ0), added task by task."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mergelab import ModelPool
from mergelab.engine.task_arithmetic import task_arithmetic_vector

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
