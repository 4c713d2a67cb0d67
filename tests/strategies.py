"""Hypothesis strategies and comparison helpers shared by the merge tests."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from hypothesis import strategies as st

from mergelab.engine.model_files import ShardedWriter
from mergelab.engine.model_writing import output_specs, write_model
from mergelab.engine.pool import ModelPool

BUFFER = "embeddings.position_ids"
LAMBDA_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)
# dyadic factors multiply integer-valued tensors exactly; 0.3 is the usual default
FACTORS = st.sampled_from([0.3, 0.25, 0.5, 1.0, 0.7, 2.0, -0.5])


@dataclass
class Family:
    """θ0, {task: θt} and {task: ḡ} for the merged (floating-point) keys."""

    pretrained: dict[str, torch.Tensor]
    finetuned: dict[str, dict[str, torch.Tensor]]
    gradients: dict[str, dict[str, torch.Tensor]]

    @property
    def tasks(self) -> list[str]:
        return list(self.finetuned)

    @property
    def merged_keys(self) -> list[str]:
        return [k for k, v in self.pretrained.items() if v.is_floating_point()]

    @property
    def num_merged(self) -> int:
        return sum(self.pretrained[k].numel() for k in self.merged_keys)

    def snapshot(self):
        """Deep copies, to check later that no input was modified."""
        return (
            clone_state(self.pretrained),
            {t: clone_state(m) for t, m in self.finetuned.items()},
            {t: clone_state(g) for t, g in self.gradients.items()},
        )


def clone_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


def make_family(
    seed: int,
    shapes: list[tuple[int, ...]],
    num_tasks: int,
    integer: bool = True,
    sparsity: float = 0.0,
    buffer_at: int = 0,
) -> Family:
    """Random models: integer-valued float32 (exact arithmetic, many ties) or randn.

    Integer mode: θ0 ∈ [-20, 20], τt ∈ [-6, 6], ḡ ∈ [0, 5]. An int64 buffer sits at
    position ``buffer_at`` among the keys; each fine-tuned model holds different values
    there, so only copying θ0's passes.
    """
    gen = torch.Generator().manual_seed(seed)
    keys = [f"blocks.{i}.weight" for i in range(len(shapes))]
    pretrained: dict[str, torch.Tensor] = {}
    items = list(zip(keys, shapes, strict=True))
    items.insert(min(buffer_at, len(items)), (BUFFER, None))
    for key, shape in items:
        if shape is None:
            pretrained[key] = torch.arange(7, dtype=torch.int64)
        elif integer:
            pretrained[key] = torch.randint(-20, 21, shape, generator=gen).to(torch.float32)
        else:
            pretrained[key] = torch.randn(shape, generator=gen)
    finetuned = {}
    gradients = {}
    for t in range(num_tasks):
        model, grads = {}, {}
        for key, value in pretrained.items():
            if not value.is_floating_point():
                model[key] = value + 100 * (t + 1)
                continue
            if integer:
                tau = torch.randint(-6, 7, value.shape, generator=gen).to(torch.float32)
                grads[key] = torch.randint(0, 6, value.shape, generator=gen).to(torch.float32)
            else:
                tau = 0.1 * torch.randn(value.shape, generator=gen)
                grads[key] = torch.rand(value.shape, generator=gen)
            if sparsity:
                tau = torch.where(torch.rand(value.shape, generator=gen) < sparsity, 0.0, tau)
            model[key] = value + tau
        finetuned[f"task{t}"] = model
        gradients[f"task{t}"] = grads
    return Family(pretrained, finetuned, gradients)


@st.composite
def families(draw, min_tasks: int = 2, max_tasks: int = 5, integer: bool = True) -> Family:
    shapes = draw(
        st.lists(
            st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
            min_size=1,
            max_size=4,
        )
    )
    return make_family(
        seed=draw(st.integers(0, 2**32 - 1)),
        shapes=shapes,
        num_tasks=draw(st.integers(min_tasks, max_tasks)),
        integer=integer,
        sparsity=draw(st.sampled_from([0.0, 0.0, 0.4, 0.8])),
        buffer_at=draw(st.integers(0, len(shapes))),
    )


QUANTILES = st.one_of(
    st.sampled_from([1.0, 0.99, 0.9, 0.5, 0.29, 0.1, 0.01, 1e-9]),
    st.floats(min_value=1e-6, max_value=1.0, exclude_min=False),
)


def assert_states_equal(actual: Mapping, expected: Mapping, ordered: bool = True) -> None:
    """Same keys (in the same order unless read from a file, where safetensors keeps no
    order), same dtypes and shapes, equal values."""
    if ordered:
        assert list(actual) == list(expected)
    else:
        assert sorted(actual) == sorted(expected)
    for key in expected:
        a, e = actual[key], expected[key]
        assert a.dtype == e.dtype, key
        assert a.shape == e.shape, key
        assert torch.equal(a, e), f"{key}: max |diff| {(a.double() - e.double()).abs().max()}"


def assert_states_close(actual: Mapping, expected: Mapping, scale: float, rtol=1e-6) -> None:
    """Equal within rtol relative, with an absolute floor of rtol times the magnitude of
    the terms that were summed (``scale``), since cancellation leaves small results."""
    assert list(actual) == list(expected)
    for key in expected:
        a, e = actual[key], expected[key]
        assert a.dtype == e.dtype and a.shape == e.shape, key
        if not a.is_floating_point():
            assert torch.equal(a, e), key
            continue
        torch.testing.assert_close(
            a.double(), e.double(), rtol=rtol, atol=rtol * scale, msg=lambda m, k=key: f"{k}: {m}"
        )


def load_file(path) -> dict[str, torch.Tensor]:
    """A safetensors file as a state dict (keys in the file's own order)."""
    from safetensors.torch import load_file as _load

    return _load(str(path))


def written_model(
    pool: ModelPool, delta_of: Callable[[str], torch.Tensor], scaling: float = 1.0
) -> dict[str, torch.Tensor]:
    """The model ``mergelab merge`` writes from ``delta_of`` (θ0 + scaling·δ in θ0's
    dtypes, one file), read back."""
    specs = output_specs(pool.pretrained, None)
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "merged"
        with ShardedWriter(target, specs, [list(specs)]) as writer:
            write_model(pool.pretrained, pool.merged_keys, delta_of, scaling, writer)
        return load_file(target / "model.safetensors")


def stored_as(model: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A model with its floating-point tensors in ``dtype`` (the integer-valued families
    are exact in bfloat16: |values| < 256), the others as they are."""
    return {
        key: value.to(dtype) if value.is_floating_point() else value for key, value in model.items()
    }
