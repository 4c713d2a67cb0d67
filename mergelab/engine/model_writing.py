"""A merged model written to a file parameter by parameter (:func:`write_model`, for
``mergelab merge``): θ0 + λ·δ in pieces, on a thread of its own while the next
parameter's δ is computed; δ may be provisional, corrected in place once the whole
model is written, or the model written again (:class:`ProvisionalDeltas`)."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from mergelab.engine.checkpoints import TensorSpec, convert_into, read_into, tensor_spec
from mergelab.engine.model_files import ShardedWriter
from mergelab.engine.pool import flat_blocks
from mergelab.engine.streaming import merged_parameter, not_finite_model, progress
from mergelab.engine.workspace import Workspace
from mergelab.merging.compiled import kernels

# elements per piece when a model is written to a file: θ0's piece, the result and its
# cast stay a few MB whatever the parameter's size
WRITE_PIECE = 1 << 22


def output_specs(
    pretrained: Mapping[str, torch.Tensor], dtype: torch.dtype | None
) -> dict[str, TensorSpec]:
    """θ0's layout, its floating-point tensors in ``dtype`` (their own when None)."""
    specs = {key: tensor_spec(pretrained, key) for key in pretrained}
    if dtype is None:
        return specs
    return {
        key: TensorSpec(spec.shape, dtype) if spec.dtype.is_floating_point else spec
        for key, spec in specs.items()
    }


class Patch(NamedTuple):
    """Corrections to a parameter written from a provisional δ."""

    positions: np.ndarray  # flat, ascending, int64
    theta0: torch.Tensor  # θ0 there, in the compute dtype
    delta: torch.Tensor  # the final δ there


class ProvisionalDeltas(abc.ABC):
    """δ of each parameter (``self(key)``, in the models' key order), found while the
    model is written, before a model-wide statistic it depends on is known: once every
    parameter is written, :meth:`settle` gives the corrections, or None where the model
    must be written again (``self`` then gives every parameter's final δ)."""

    @abc.abstractmethod
    def __call__(self, key: str) -> torch.Tensor: ...

    @abc.abstractmethod
    def settle(self) -> Mapping[str, Patch] | None: ...


def write_model(
    pretrained: Mapping[str, torch.Tensor],
    merged_keys: Iterable[str],
    delta_of: Callable[[str], torch.Tensor],
    scaling_factor: float,
    writer: ShardedWriter,
    dtype: torch.dtype | None = None,
    desc: str = "merge",
) -> None:
    """θ0 + λ·δ written parameter by parameter into ``writer`` (declared with
    :func:`output_specs`), floating-point tensors in ``dtype``; the other keys of θ0
    copied. θ0 is read and the result cast in pieces of :data:`WRITE_PIECE` elements, so
    memory holds two parameters' δ (one written by a thread of its own while the next is
    computed) and a few pieces, whatever the model's size. Where ``delta_of`` is
    :class:`ProvisionalDeltas`, its corrections are written in place afterwards, or the
    model is written again into ``writer`` restarted."""
    merged = frozenset(merged_keys)
    written = output_specs(pretrained, dtype)
    workspace = Workspace()  # the writing thread's

    def write(key: str, delta: torch.Tensor | None) -> None:
        spec, out_dtype = tensor_spec(pretrained, key), written[key].dtype
        bfloat16 = (
            spec.dtype == out_dtype == torch.bfloat16
            and delta is not None
            and delta.dtype == torch.float32
            and delta.device.type == "cpu"
        )

        def pieces() -> Iterator[torch.Tensor]:
            for part in flat_blocks(spec.numel, WRITE_PIECE):
                theta0 = workspace.get("theta0", (part.stop - part.start,), spec.dtype)
                read_into(pretrained, key, theta0, part.start, part.stop)
                if delta is None:
                    yield theta0.to(out_dtype)
                elif bfloat16:
                    yield _merged_bfloat16(key, theta0, delta[part], scaling_factor, workspace)
                else:
                    yield merged_parameter(
                        key, theta0, delta[part], scaling_factor, dtype=out_dtype
                    )

        writer.write_parts(key, pieces())

    def write_all(desc: str) -> None:
        # one thread writes each parameter while the next one's δ is computed
        with ThreadPoolExecutor(1) as writing:
            pending: Future | None = None
            for key in progress(list(written), desc):
                delta = delta_of(key).reshape(-1) if key in merged else None
                if pending is not None:
                    pending.result()
                pending = writing.submit(write, key, delta)
            if pending is not None:
                pending.result()

    write_all(desc)
    if not isinstance(delta_of, ProvisionalDeltas):
        return
    patches = delta_of.settle()
    if patches is None:
        writer.restart()
        write_all(f"{desc} (again)")
        return
    for key, patch in patches.items():
        values = merged_parameter(
            key, patch.theta0, patch.delta, scaling_factor, dtype=written[key].dtype
        )
        writer.patch(key, patch.positions, values)


def _merged_bfloat16(
    key: str, theta0: torch.Tensor, delta: torch.Tensor, factor: float, workspace: Workspace
) -> torch.Tensor:
    """:func:`merged_parameter` of a bfloat16 θ0 piece and a float32 δ piece, in bfloat16,
    in one compiled pass into a ``workspace`` buffer (overwritten by its next use)."""
    out = workspace.get("merged", theta0.shape, torch.bfloat16)
    kernel = kernels("task_arithmetic_kernels").add_scaled_to_bfloat16
    if not kernel(bfloat16_bits(theta0), delta.numpy(), factor, bfloat16_bits(out)):
        raise not_finite_model(key, factor, out.dtype)
    return out


def bfloat16_bits(tensor: torch.Tensor) -> np.ndarray:
    """A bfloat16 tensor's bits, as numpy's uint16 (numpy has no bfloat16)."""
    return tensor.view(torch.int16).numpy().view(np.uint16)


def widened_theta0(theta0: np.ndarray) -> np.ndarray:
    """θ0's values (a block or a gather of one) in the compute dtype, as a
    :class:`Patch` takes them: bfloat16 bits (uint16, as :func:`bfloat16_bits` and the
    kernels over stored rows give them) widened to float32, anything else as it is."""
    if theta0.dtype != np.uint16:
        return theta0
    out = np.empty(theta0.shape, np.float32)
    convert_into(
        torch.from_numpy(out), torch.from_numpy(theta0.view(np.int16)).view(torch.bfloat16)
    )
    return out
