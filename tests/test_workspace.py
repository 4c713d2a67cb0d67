"""mergelab.engine.workspace: empty keeps torch.empty's contract; BlockWorkers keep the caller's
autograd mode."""

import resource

import naive
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load, save
from strategies import assert_states_equal, make_family

from mergelab import ModelPool, TallMasks
from mergelab.engine.workspace import BlockWorkers, ThreadTotals, empty, sparse_zeros

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


@given(
    shape=st.lists(st.integers(0, 5), max_size=3).map(tuple),
    dtype=st.sampled_from([np.int32, np.int64, np.float32, np.uint8]),
)
def test_sparse_zeros_are_own_writable_zeros_of_the_shape_and_dtype(shape, dtype):
    first, second = sparse_zeros(shape, dtype), sparse_zeros(shape, dtype)
    for array in (first, second):
        assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous
        assert not array.any()
    first[...] = 7
    assert not second.any()  # no memory shared
    assert (first == 7).all()


def test_sparse_zeros_map_only_the_pages_written():
    """Scattered writes into a large count array fault in only their own 4 KiB pages (the
    point of sparse_zeros: np.zeros asks for huge pages, each first write then maps 2 MiB)."""
    pages = 1 << 12  # 16 MiB of int32
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    counts = sparse_zeros((pages, 1024), np.int32)
    counts[::64, 3] += 1  # 64 pages written
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert int(counts.sum()) == 64
    assert 64 <= faults < 1000  # huge pages: a fault per 2 MiB, but 8 MiB more RSS


@given(items=st.lists(st.integers(0, 4), max_size=40), threads=st.integers(1, 3))
def test_thread_totals_add_every_threads_counts_to_what_out_held(items, threads):
    start = np.array([1, 0, 2, 0, 5], np.int64)
    expected = (np.bincount(items, minlength=5) + start).tolist()
    out = start.copy()
    totals = ThreadTotals(out)
    with BlockWorkers(threads) as workers:
        workers.run(lambda item: np.add.at(totals.mine(), item, 1), items)
    parts = totals.parts()
    assert sum(parts).tolist() == expected
    assert any(part is out for part in parts)
    assert totals.total() is out
    assert out.tolist() == expected


@pytest.mark.parametrize("inference", [True, False])
def test_block_workers_run_in_the_callers_autograd_mode(inference):
    """Inference tensors made by the caller (a Lightning test loop runs in inference
    mode) can be updated in place from every worker thread."""
    with BlockWorkers(threads=3) as workers, torch.inference_mode(inference):
        target = torch.zeros(12)
        modes = workers.run(
            lambda part: (target[part].add_(1), torch.is_inference_mode_enabled())[1],
            [slice(i, i + 3) for i in range(0, 12, 3)],
        )
    assert modes == [inference] * 4
    assert torch.equal(target, torch.ones(12))


def test_tall_retrieval_of_many_blocks_under_inference_mode(monkeypatch):
    """Retrieval into a reused model inside a test loop, with parameters of several
    blocks, so that worker threads write into the caller's inference tensors."""
    monkeypatch.setattr(ModelPool, "chunk", 8)
    family = make_family(3, [(9, 13), (70,)], num_tasks=3, integer=True)
    masks = TallMasks.build(family.pretrained, family.finetuned, lambdas=[0.4])
    with torch.inference_mode():
        first = masks.retrieve(family.pretrained, "task0", 0.4)
        second = masks.retrieve(family.pretrained, "task1", 0.4, reuse=first)
    mtl = naive.multitask_vector(family.pretrained, family.finetuned)
    expected = naive.tall_masks(family.pretrained, family.finetuned, [0.4], mtl)
    assert_states_equal(second, naive.retrieve(family.pretrained, mtl, expected["task1"][0.4]))
