"""DARE (Yu et al., ICML 2024, "Language Models are Super Mario"), per parameter: drop each
coordinate of each task vector with probability p and rescale what is left by 1/(1 − p),
so that each coordinate keeps its expected value; Task Arithmetic or TIES then merges the
sparse vectors.

The draw is reproducible: task t's keep mask of a parameter is a counter hash
(:mod:`mergelab.merging.dare_kernels`) of each coordinate's flat index under a seed made
of (seed, task name, parameter key) (:func:`drop_seed`), so it is the same whatever the
device, the order of the tasks, which parameters are merged or the torch version. A
coordinate is kept where its uniform draw u = (top 24 bits of the hash) / 2^24 in [0, 1)
satisfies u ≥ p.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch

from mergelab.errors import BadValue
from mergelab.merging.compiled import kernels
from mergelab.merging.finite import rows_finite

_DRAWS = 1 << 24  # a draw's values: 24-bit uniforms, like float32's mantissa


def check_drop_rate(drop_rate: float) -> None:
    if not 0 <= drop_rate < 1:
        raise BadValue(f"DARE drop_rate must be in [0, 1), got {drop_rate}")


def drop_seed(seed: int, task: str, key: str) -> int:
    """The key of one task's mask of one parameter: 32 bits of SHA-256."""
    digest = hashlib.sha256(f"{seed}\0{task}\0{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def drop_cutoff(drop_rate: float) -> int:
    """The smallest 24-bit draw that is kept: u = draw / 2^24 ≥ p ⟺ draw ≥ ⌈p · 2^24⌉
    (p · 2^24 is exact in float64)."""
    return math.ceil(drop_rate * _DRAWS)


def keep_mask(shape: Sequence[int], drop_rate: float, seeds: Sequence[int]) -> torch.Tensor:
    """1{u ≥ p} of every coordinate of a [T, *shape] stack, task t drawn with ``seeds[t]``
    (on the CPU)."""
    out = torch.empty(len(seeds), math.prod(shape), dtype=torch.bool)
    keys = np.asarray(seeds, dtype=np.uint32)
    kernels("dare_kernels").keep_masks(keys, drop_cutoff(drop_rate), out.numpy())
    return out.reshape(len(seeds), *shape)


def dare_drop(task_vectors: torch.Tensor, drop_rate: float, seeds: Sequence[int]) -> torch.Tensor:
    """τt ⊙ mt / (1 − p) for τ stacked as [T, *shape], mt the keep mask drawn with
    ``seeds[t]``: a new tensor on τ's device; p = 0 returns τ unchanged."""
    if drop_rate == 0:
        return task_vectors
    keep = keep_mask(task_vectors.shape[1:], drop_rate, seeds).to(task_vectors.device)
    return torch.where(keep, task_vectors / (1 - drop_rate), 0)


def dare_drop_(task_vectors: torch.Tensor, drop_rate: float, seeds: Sequence[int]) -> torch.Tensor:
    """:func:`dare_drop` in place, for a contiguous CPU tensor, in one compiled pass (the
    division by 1 − p in τ's dtype, as torch divides a tensor by a number)."""
    if drop_rate == 0:
        return task_vectors
    flat = task_vectors.view(len(seeds), -1).numpy()
    divisor = flat.dtype.type(1 - drop_rate)
    keys = np.asarray(seeds, dtype=np.uint32)
    kernels("dare_kernels").drop_and_rescale(flat, keys, drop_cutoff(drop_rate), divisor)
    return task_vectors


def dropped_sum(
    models: torch.Tensor, drop_rate: float, seeds: Sequence[int], offset: int, out: torch.Tensor
) -> bool:
    """Σt τt ⊙ mt / (1 − p) into ``out``, from the models' rows stacked as [T + 1, n] (θ0
    first; τt = θt − θ0) that hold a parameter's flat coordinates from ``offset`` on (a
    multiple of :data:`~mergelab.merging.dare_kernels.BLOCK`), each drawn as at its place
    in the whole parameter: the bits of :func:`dare_drop_` then the ordered sum, in one
    compiled pass that leaves the rows as they are. Returns whether every model's value
    was finite (a NaN that is dropped is not in the sum)."""
    compiled = kernels("dare_kernels")
    if offset % compiled.BLOCK:
        raise ValueError(f"offset {offset} is not a multiple of {compiled.BLOCK}")
    rows = models.numpy()
    divisor = rows.dtype.type(1 - drop_rate)
    keys = np.asarray(seeds, dtype=np.uint32)
    compiled.drop_and_sum(rows, keys, drop_cutoff(drop_rate), divisor, offset, out.numpy())
    return rows_finite(rows)
