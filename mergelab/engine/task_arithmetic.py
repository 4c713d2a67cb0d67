"""Task Arithmetic over whole models: θ = θ0 + λ Σt τt, streamed block by block."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch

from mergelab.engine.pool import CheckpointSource, ModelPool
from mergelab.engine.streaming import StateDict, streamed_models
from mergelab.engine.workspace import BlockWorkers, empty
from mergelab.merging.task_arithmetic import task_vector_sum


def task_arithmetic_delta(pool: ModelPool, key: str, workers: BlockWorkers) -> torch.Tensor:
    """δ = Σt τt of one merged parameter (a new tensor), its blocks spread over ``workers``."""
    delta = empty((pool.specs[key].numel,), pool.compute_dtype(key))

    def sum_block(part: slice) -> None:
        taus = pool.read_task_vectors(key, part, workers.workspace())
        pool.check_finite(key, taus, task_vector_sum(taus, out=delta[part]))

    workers.run(sum_block, pool.blocks(key))
    return delta.view(pool.specs[key].shape)


def task_arithmetic_vector(pool: ModelPool) -> StateDict:
    """δ = Σt τt for every merged parameter (the merged model is θ0 + λ·δ)."""
    with BlockWorkers() as workers:
        return {key: task_arithmetic_delta(pool, key, workers) for key in pool.merged_keys}


def task_arithmetic(
    pretrained: CheckpointSource,
    finetuned: Mapping[str, CheckpointSource],
    scaling_factor: float | Sequence[float] = 0.3,
    output=None,
    overwrite: bool = False,
):
    """θ = θ0 + λ Σt τt. A list of λ gives a list of independent models.

    ``output``: None to return state dicts, or one path (a list of paths for a list of
    λ) to write safetensors files and return their paths.
    """
    pool = ModelPool(pretrained, finetuned)
    return streamed_models(
        pool,
        functools.partial(task_arithmetic_delta, pool),
        scaling_factor,
        output,
        overwrite,
        desc="task arithmetic",
    )
