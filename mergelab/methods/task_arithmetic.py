"""Task Arithmetic (Ilharco et al., ICLR 2023): θ = θ0 + λ Σt τt, one model per λ."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mergelab.engine.pool import ModelPool
from mergelab.engine.streaming import StateDict, as_factor_list
from mergelab.engine.task_arithmetic import task_arithmetic_delta, task_arithmetic_vector
from mergelab.engine.workspace import BlockWorkers
from mergelab.methods.base import MergeContext, ScaledMethod, save_task_vector


class TaskArithmetic(ScaledMethod):
    """θ = θ0 + λ Σt τt, one model per λ.

    Args:
        scaling_factor: λ; a list scores every value and picks on validation when the data
            module's test_splits has ``val``.
    """

    min_tasks = 2

    def __init__(self, scaling_factor: float | list[float] = 0.3):
        self.scaling_factor = as_factor_list(scaling_factor, "scaling_factor")

    def merged_task_vector(
        self, pool: ModelPool, context: MergeContext, output: Path | None
    ) -> StateDict:
        delta = task_arithmetic_vector(pool)
        save_task_vector(delta, pool, output, self.describe())
        return delta

    @contextlib.contextmanager
    def parameter_deltas(
        self, pool: ModelPool, context: MergeContext
    ) -> Iterator[Callable[[str], torch.Tensor]]:
        with BlockWorkers() as workers:
            yield functools.partial(task_arithmetic_delta, pool, workers=workers)
