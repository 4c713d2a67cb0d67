"""DARE over whole models: every task vector's coordinates dropped at random and rescaled
(:mod:`mergelab.merging.dare`), then summed (Task Arithmetic) or TIES-merged.

On the CPU, the sum streams as Task Arithmetic does: each parameter's blocks, on
BlockWorkers threads, dropped and summed straight from the models' rows by one compiled
pass (:func:`~mergelab.merging.dare.dropped_sum`), and θ0 + λ·δ built parameter by
parameter, so δ of the whole model is never held. ViT-B/32, eight tasks
(scripts/bench_merge.py, 2026-12-06): 0.80-0.85 s, against 1.15-1.27 s through whole
parameters (a [T, n] stack subtracted, dropped in place, then summed). On another device,
or under TIES, whose thresholds are the whole model's, δ comes from whole parameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mergelab.engine.parameterwise import TaskVectors, resolve_device, summed_vector
from mergelab.engine.pool import CheckpointSource, ModelPool
from mergelab.engine.streaming import StateDict, scaled_models, streamed_models
from mergelab.engine.ties import ties_merged_vector
from mergelab.engine.workspace import BlockWorkers, empty
from mergelab.merging.dare import (
    check_drop_rate,
    dare_drop,
    dare_drop_,
    drop_seed,
    dropped_sum,
)
from mergelab.merging.ties import check_keep_fraction


class DareDrop:
    """The transform τt ↦ τt ⊙ mt / (1 − p) of one whole parameter, each task's mask seeded
    by (seed, task, key)."""

    def __init__(self, tasks: Sequence[str], drop_rate: float, seed: int = 0):
        check_drop_rate(drop_rate)
        self.tasks = list(tasks)
        self.drop_rate = drop_rate
        self.seed = seed

    def __call__(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        seeds = [drop_seed(self.seed, task, key) for task in self.tasks]
        if task_vectors.device.type == "cpu" and task_vectors.is_contiguous():
            # the stack is TaskVectors' own (a buffer or a transform's result): in place
            return dare_drop_(task_vectors, self.drop_rate, seeds)
        return dare_drop(task_vectors, self.drop_rate, seeds)


def summed_in_blocks(ties: float | None, device: str | torch.device | None) -> bool:
    """Whether DARE's δ streams block by block (:func:`dare_delta`): the sum on the CPU."""
    return ties is None and resolve_device(device).type == "cpu"


def dare_delta(
    pool: ModelPool, key: str, workers: BlockWorkers, drop_rate: float, seed: int = 0
) -> torch.Tensor:
    """δ = Σt τt ⊙ mt / (1 − p) of one merged parameter (a new tensor, on the CPU), its
    blocks dropped and summed on ``workers``."""
    seeds = [drop_seed(seed, task, key) for task in pool.tasks]
    delta = empty((pool.specs[key].numel,), pool.compute_dtype(key))

    def sum_block(part: slice) -> None:
        models = pool.read_models(key, part, workers.workspace())
        finite = dropped_sum(models, drop_rate, seeds, part.start, out=delta[part])
        pool.check_finite_from_models(key, models, delta[part], finite)

    workers.run(sum_block, pool.blocks(key))
    return delta.view(pool.specs[key].shape)


def dare_vector(
    pool: ModelPool,
    drop_rate: float = 0.5,
    seed: int = 0,
    ties: float | None = None,
    device: str | torch.device | None = None,
) -> StateDict:
    """δ of DARE: the dropped and rescaled task vectors summed, or TIES-merged keeping the
    share ``ties`` of each (its trimming thresholds taken over the dropped vectors)."""
    check_drop_rate(drop_rate)
    if ties is not None:
        check_keep_fraction(ties)
    if summed_in_blocks(ties, device):
        with BlockWorkers() as workers:
            return {
                key: dare_delta(pool, key, workers, drop_rate, seed) for key in pool.merged_keys
            }
    task_vectors = TaskVectors(pool, device, [DareDrop(pool.tasks, drop_rate, seed)])
    if ties is None:
        return summed_vector(task_vectors, desc="DARE")
    return ties_merged_vector(task_vectors, ties)


def dare(
    pretrained: CheckpointSource,
    finetuned: Mapping[str, CheckpointSource],
    scaling_factor: float | Sequence[float] = 0.3,
    drop_rate: float = 0.5,
    seed: int = 0,
    ties: float | None = None,
    device: str | torch.device | None = None,
    output=None,
    overwrite: bool = False,
):
    """DARE: θ = θ0 + λ·δ, δ = Σt τt ⊙ mt / (1 − p) (or their TIES merge with ``ties``).
    A list of λ gives a list of independent models; ``output`` as in task_arithmetic."""
    check_drop_rate(drop_rate)
    pool = ModelPool(pretrained, finetuned)
    if summed_in_blocks(ties, device):
        return streamed_models(
            pool,
            lambda key, workers: dare_delta(pool, key, workers, drop_rate, seed),
            scaling_factor,
            output,
            overwrite,
            desc="DARE: models",
        )
    return scaled_models(
        pool,
        lambda: dare_vector(pool, drop_rate, seed, ties, device),
        scaling_factor,
        output,
        overwrite,
        desc="DARE: models",
    )
