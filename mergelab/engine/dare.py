"""DARE over whole models: every task vector's coordinates dropped at random and rescaled
(:mod:`mergelab.merging.dare`), then summed (Task Arithmetic) or TIES-merged."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mergelab.engine.parameterwise import TaskVectors, summed_vector
from mergelab.engine.pool import CheckpointSource, ModelPool
from mergelab.engine.streaming import StateDict, scaled_models
from mergelab.engine.ties import ties_merged_vector
from mergelab.merging.dare import check_drop_rate, dare_drop, dare_drop_, drop_seed
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
    return scaled_models(
        pool,
        lambda: dare_vector(pool, drop_rate, seed, ties, device),
        scaling_factor,
        output,
        overwrite,
        desc="DARE: models",
    )
