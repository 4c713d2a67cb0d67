"""Which tensors a merge merges and which it copies from the base, and the layouts it
refuses, named by model and tensor."""

from __future__ import annotations

import pytest
import torch

from mergelab.engine.checkpoints import tensor_spec
from mergelab.engine.pool import ModelPool
from mergelab.engine.tensor_selection import TensorSelection, select_tensors
from mergelab.errors import BadValue, MissingKey

BASE = {
    "embed.weight": torch.zeros(10, 4),
    "layer.weight": torch.zeros(4, 4),
    "layer.bias": torch.zeros(4),
    "head.weight": torch.zeros(10, 4),
    "steps": torch.zeros(1, dtype=torch.int64),
}
COPYING = TensorSelection(("head.*",), copy_mismatched_shapes=True)


def specs(state: dict) -> dict:
    return {key: tensor_spec(state, key) for key in state}


def test_merged_and_copied_with_their_reasons():
    resized = dict(BASE, **{"embed.weight": torch.zeros(12, 4), "head.weight": torch.zeros(12, 4)})
    merged, copied = select_tensors(specs(BASE), {"a": BASE, "b": resized}, COPYING)
    assert merged == ["layer.weight", "layer.bias"]
    assert copied == {
        "embed.weight": "shape differs between models",
        "head.weight": "excluded by pattern 'head.*'",
        "steps": "not floating point",
    }


WITHOUT_BIAS = {k: v for k, v in BASE.items() if k != "layer.bias"}
HALF = dict(BASE, **{"layer.weight": torch.zeros(4, 4, dtype=torch.float16)})
WIDER = dict(BASE, **{"layer.weight": torch.zeros(4, 5)})


@pytest.mark.parametrize(
    "model, selection, error, message",
    [
        (WITHOUT_BIAS, COPYING, MissingKey, "'b' lacks 'layer.bias'"),
        (dict(BASE, extra=torch.zeros(2)), COPYING, MissingKey, "'b' has 'extra'"),
        (HALF, COPYING, BadValue, r"'layer.weight' is \(4, 4\) torch.float16"),
        (WIDER, TensorSelection(), BadValue, r"'layer.weight' is \(4, 5\)"),
    ],
    ids=["missing", "extra", "another dtype", "another shape, not copying"],
)
def test_layouts_that_cannot_merge_are_named(model, selection, error, message):
    with pytest.raises(error, match=message):
        select_tensors(specs(BASE), {"a": BASE, "b": model}, selection)


def test_excluded_tensors_may_be_missing_or_differ():
    other = {k: v for k, v in BASE.items() if k != "head.weight"}
    pool = ModelPool(BASE, {"a": BASE, "b": other}, COPYING)
    assert "head.weight" in pool.copied and "head.weight" not in pool.merged_keys


def test_a_pattern_must_be_a_name_pattern():
    with pytest.raises(BadValue, match="exclude"):
        TensorSelection(("",))
