"""Task Arithmetic over whole models: θ = θ0 + λ Σt τt, streamed block by block."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch

from mergelab.engine.model_writing import bfloat16_bits
from mergelab.engine.pool import CheckpointSource, ModelPool
from mergelab.engine.streaming import StateDict, streamed_models
from mergelab.engine.workspace import BlockWorkers, empty
from mergelab.merging.compiled import kernels
from mergelab.merging.task_arithmetic import task_vector_sum


def task_arithmetic_delta(pool: ModelPool, key: str, workers: BlockWorkers) -> torch.Tensor:
    """δ = Σt τt of one merged parameter (a new tensor), its blocks spread over ``workers``;
    bfloat16 models summed by a kernel that widens each entry as it reads it (the same
    float32 arithmetic, in the same order)."""
    delta = empty((pool.specs[key].numel,), pool.compute_dtype(key))

    def sum_block(part: slice) -> None:
        taus = pool.read_task_vectors(key, part, workers.workspace())
        pool.check_finite(key, taus, task_vector_sum(taus, out=delta[part]))

    def sum_bfloat16_block(part: slice) -> None:
        workspace = workers.workspace()
        models = pool.read_stored_models(key, part, workspace)
        bits = bfloat16_bits(models)
        kernels("task_arithmetic_kernels").sum_bfloat16_task_vectors(bits, delta[part].numpy())
        pool.check_finite_summary(key, part, delta[part], workspace)

    bfloat16 = pool.specs[key].dtype == torch.bfloat16
    workers.run(sum_bfloat16_block if bfloat16 else sum_block, pool.blocks(key))
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
