"""TALL masks (Wang et al., ICML 2024), the per-parameter tensor math.

Task t keeps a coordinate when its own update is larger than λ times what the other
tasks add there: mt = 1{|θ0 − θt| > λ·|θmt − θt|} = 1{|τt| > λ·|τMTL − τt|}, with θmt =
θ0 + τMTL. The retrieved model is θ0 + mt ⊙ τMTL, with no extra scaling.

The block functions run in numpy, single-threaded, so that the caller can run blocks on
several threads at once (see :class:`~mergelab.workspace.BlockWorkers`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mergelab.workspace import Workspace


def sum_in_order(task_vectors: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """τMTL = Σt τt of one block of τ stacked as [T, n], added task by task into ``out``:
    the order the rule is written in (``torch.sum`` over dim 0 regroups the additions
    for some widths, so its last bits can differ)."""
    taus, total = task_vectors.numpy(), out.numpy()
    np.copyto(total, taus[0])
    for tau in taus[1:]:
        np.add(total, tau, out=total)
    return out


def pack_tall_masks(
    task_vectors: torch.Tensor,
    multitask_vector: torch.Tensor,
    lambdas: Sequence[float],
    out: torch.Tensor,
    workspace: Workspace,
) -> None:
    """Every task's mask at every λ for one block of columns, from τ stacked as [T, n]
    and τMTL [n], into ``out`` ([len(λ), T, ⌈n/8⌉] uint8) packed as numpy.packbits does:
    8 coordinates a byte, the first in the highest bit, the last byte zero-padded. Strict
    '>', so a coordinate no task moves is dropped.

    In numpy, in ``workspace`` buffers: |τt| and |τMTL − τt| are computed once for all λ,
    and numpy's float comparison into bool is several times faster than torch's.
    λ·|τMTL − τt| is rounded to the dtype of τ, as torch computes a tensor times a scalar.
    """
    taus = task_vectors.numpy()
    shape = tuple(task_vectors.shape)

    def scratch(name: str, dtype: torch.dtype = task_vectors.dtype) -> np.ndarray:
        return workspace.get(name, shape, dtype).numpy()

    own = np.abs(taus, out=scratch("own"))
    others = np.subtract(multitask_vector.numpy(), taus, out=scratch("others"))
    np.abs(others, out=others)
    keep = scratch("keep", torch.bool)
    scaled = others if len(lambdas) == 1 else scratch("scaled")
    for rows, lam in zip(out.numpy(), lambdas, strict=True):
        np.multiply(others, taus.dtype.type(lam), out=scaled)
        np.greater(own, scaled, out=keep)
        rows[...] = np.packbits(keep, axis=-1)


def add_masked(
    target: torch.Tensor, vector: torch.Tensor, packed: torch.Tensor, workspace: Workspace
) -> torch.Tensor:
    """target += m ⊙ v in place, for flat blocks of one dtype and the block's mask packed
    as by :func:`pack_tall_masks`: θ0 + mt ⊙ τMTL, the retrieved model, chunk by chunk.

    The bits are cast to v's dtype before the multiply (a float-by-bool multiply takes a
    slow, type-promoting loop); m·v is v or ±0 exactly, so the sum rounds once.
    """
    bits = np.unpackbits(packed.numpy(), count=target.numel())
    masked = workspace.get("masked", tuple(target.shape), target.dtype).numpy()
    np.copyto(masked, bits)
    np.multiply(masked, vector.numpy(), out=masked)
    np.add(target.numpy(), masked, out=target.numpy())
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
