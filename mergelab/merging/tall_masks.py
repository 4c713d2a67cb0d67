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
    task_vector: torch.Tensor, multitask_vector: torch.Tensor, lambdas: Sequence[float]
) -> list[torch.Tensor]:
    """mt of one parameter for each λ; strict '>' so a coordinate no task moves is dropped."""
    own = task_vector.abs()
    others = (multitask_vector - task_vector).abs()
    return [own > lam * others for lam in lambdas]


def apply_mask(vector: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """m ⊙ v; the retrieved model is θ0 + apply_mask(τMTL, mt)."""
    return torch.where(mask, vector, 0)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as ⌈numel/8⌉ uint8 bytes, big-endian bit order as numpy.packbits."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`pack_mask`."""
    count = int(np.prod(shape, dtype=np.int64))
    bits = np.unpackbits(packed.numpy(), count=count).astype(bool)
    return torch.from_numpy(bits).reshape(shape)
