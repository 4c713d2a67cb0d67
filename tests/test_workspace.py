"""mergelab.workspace.empty: torch.empty's contract, with numpy-allocated memory."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load, save

from mergelab.workspace import empty

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
    torch.complex128,  # no numpy integer of its width: plain torch.empty
]


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=st.lists(st.integers(0, 6), max_size=3).map(tuple))
def test_empty_is_an_own_writable_tensor_of_the_shape_and_dtype(dtype, shape):
    first, second = empty(shape, dtype), empty(shape, dtype)
    for tensor in (first, second):
        assert tensor.shape == shape and tensor.dtype == dtype and tensor.is_contiguous()
    values = torch.arange(first.numel()).reshape(shape).to(dtype)
    first.copy_(values)
    second.zero_()
    assert torch.equal(first, values)  # no memory shared with the second tensor
    if dtype != torch.complex128:  # (safetensors has no complex128)
        # safetensors refuses to save tensors that share memory
        assert torch.equal(load(save({"a": first, "b": second}))["a"], values)
