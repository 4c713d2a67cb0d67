"""TALL masks (Wang et al., ICML 2024), the per-parameter tensor math.

Task t keeps a coordinate when its own update is larger than λ times what the other
tasks add there: mt = 1{|θ0 − θt| > λ·|θmt − θt|} = 1{|τt| > λ·|τMTL − τt|}, with θmt =
θ0 + τMTL. The retrieved model is θ0 + mt ⊙ τMTL, with no extra scaling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def tall_masks(
    task_vectors: torch.Tensor, multitask_vector: torch.Tensor, lambdas: Sequence[float]
) -> list[torch.Tensor]:
    """For each λ, the masks of all tasks of one parameter, [T, *shape] from τ stacked as
    [T, *shape]; strict '>' so a coordinate no task moves is dropped."""
    own = task_vectors.abs()
    others = torch.sub(multitask_vector, task_vectors).abs_()
    return [torch.gt(own, others * lam) for lam in lambdas]


def apply_mask(
    vector: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """m ⊙ v (into ``out`` if given); the retrieved model is θ0 + apply_mask(τMTL, mt).

    The mask is cast to v's dtype first: a float-by-bool multiply takes a slow,
    type-promoting loop (several times slower than the cast and a float multiply).
    """
    if out is None:
        return vector * mask.to(vector.dtype)
    return out.copy_(mask).mul_(vector)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor's last dimension as ⌈size/8⌉ uint8 bytes, in numpy.packbits' big-endian
    bit order (one row of bytes per row of the mask)."""
    return torch.from_numpy(np.packbits(mask.numpy(), axis=-1))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The mask of ``shape`` packed flat by :func:`pack_mask`."""
    count = int(np.prod(shape, dtype=np.int64))
    bits = np.unpackbits(packed.numpy(), count=count).view(bool)
    return torch.from_numpy(bits).reshape(shape)
