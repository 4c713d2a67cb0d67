"""DARE (Yu et al., ICML 2024, "Language Models are Super Mario"), per parameter: drop each
coordinate of each task vector with probability p and rescale what is left by 1/(1 − p),
so that each coordinate keeps its expected value; Task Arithmetic or TIES then merges the
sparse vectors.

The draw is reproducible: task t's keep mask of a parameter comes from a generator seeded
with a hash of (seed, task name, parameter key) (:func:`drop_seed`), drawn on the CPU, so
it is the same whatever the device, the order of the tasks or which parameters are merged.
A coordinate is kept where its uniform draw u ∈ [0, 1) satisfies u ≥ p.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def check_drop_rate(drop_rate: float) -> None:
    if not 0 <= drop_rate < 1:
        raise ValueError(f"DARE drop_rate must be in [0, 1), got {drop_rate}")


def drop_seed(seed: int, task: str, key: str) -> int:
    """The generator seed of one task's mask of one parameter: 63 bits of SHA-256."""
    digest = hashlib.sha256(f"{seed}\0{task}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def keep_mask(shape: Sequence[int], drop_rate: float, seed: int) -> torch.Tensor:
    """1{u ≥ p} for u uniform in [0, 1) from a CPU generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(tuple(shape), generator=generator) >= drop_rate


def dare_drop(task_vectors: torch.Tensor, drop_rate: float, seeds: Sequence[int]) -> torch.Tensor:
    """τt ⊙ mt / (1 − p) for τ stacked as [T, *shape], mt = :func:`keep_mask` with
    ``seeds[t]`` (a new tensor, on τ's device); p = 0 returns τ unchanged."""
    if drop_rate == 0:
        return task_vectors
    shape = task_vectors.shape[1:]
    keep = torch.stack([keep_mask(shape, drop_rate, seed) for seed in seeds])
    rescaled = task_vectors / (1 - drop_rate)
    return torch.where(keep.to(task_vectors.device), rescaled, 0)
