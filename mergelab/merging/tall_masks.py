"""TALL masks (Wang et al., ICML 2024), the per-parameter tensor math.

Task t keeps a coordinate when its own update is larger than λ times what the other
tasks add there: mt = 1{|θ0 − θt| > λ·|θmt − θt|} = 1{|τt| > λ·|τMTL − τt|}, with θmt =
θ0 + τMTL. The retrieved model is θ0 + mt ⊙ τMTL, with no extra scaling.

The block functions run single-threaded (numpy, or numba kernels that release the GIL),
so that the caller can run blocks on several threads at once (see
:class:`~mergelab.engine.workspace.BlockWorkers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from mergelab.merging.compiled import kernels


class Scratch(Protocol):
    """Reused scratch buffers by name (the engine's Workspace): a view of a buffer is
    valid until the next request of its name."""

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...


def pack_tall_masks(
    task_vectors: torch.Tensor,
    multitask_vector: torch.Tensor,
    lambdas: Sequence[float],
    out: torch.Tensor,
    workspace: Scratch,
) -> None:
    """Every task's mask at every λ for one block of columns, from τ stacked as [T, n]
    and τMTL [n], into ``out`` ([len(λ), T, ⌈n/8⌉] uint8) packed as numpy.packbits does:
    8 coordinates a byte, the first in the highest bit, the last byte zero-padded. Strict
    '>', so a coordinate no task moves is dropped.

    λ·|τMTL − τt| is rounded to the dtype of τ, as torch computes a tensor times a scalar.
    """
    taus = task_vectors.contiguous().numpy()
    scales = np.asarray(lambdas, dtype=taus.dtype)
    keep = workspace.get("keep", (taus.shape[1],), torch.uint8).numpy()
    # the kernel writes contiguous rows; ``out`` is often a block of wider rows
    packed = out if out.is_contiguous() else workspace.get("packed", out.shape, torch.uint8)
    multitask = multitask_vector.contiguous().numpy()
    kernels("tall_kernels").pack_masks(taus, multitask, scales, packed.numpy(), keep)
    if packed is not out:
        np.copyto(out.numpy(), packed.numpy())  # numpy: torch's copy_ would start threads


def add_masked(
    target: torch.Tensor, vector: torch.Tensor, packed: torch.Tensor, workspace: Scratch
) -> torch.Tensor:
    """target += m ⊙ v in place, for flat blocks of one dtype and the block's mask packed
    as by :func:`pack_tall_masks`: θ0 + mt ⊙ τMTL, the retrieved model, chunk by chunk.

    m·v is v or ±0 exactly (never a skipped addition), so the sum rounds once, as the
    rule written out in tensors does.
    """
    bits = workspace.get("bits", (8 * packed.numel(),), torch.uint8).numpy()
    kernels("tall_kernels").add_masked(target.numpy(), vector.numpy(), packed.numpy(), bits)
    return target


def apply_mask(
    vector: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """m ⊙ v (into ``out`` if given), for a whole parameter: mcons ⊙ τMTL in consensus.

    The mask is cast to v's dtype first: a float-by-bool multiply takes a slow,
    type-promoting loop (several times slower than the cast and a float multiply).
    """
    if out is None:
        return vector * mask.to(vector.dtype)
    return out.copy_(mask).mul_(vector)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The mask of ``shape`` packed flat by :func:`pack_tall_masks`."""
    count = int(np.prod(shape, dtype=np.int64))
    bits = np.unpackbits(packed.numpy(), count=count).view(bool)
    return torch.from_numpy(bits).reshape(shape)
