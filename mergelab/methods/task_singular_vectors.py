"""Task Singular Vectors, TSV-M (Gargiulo et al., CVPR 2025): per weight matrix, each task's
top 1/T singular components, their singular vectors orthogonalised, recombined; θ = θ0 + α·δ."""

from __future__ import annotations

from pathlib import Path

from mergelab.engine.pool import ModelPool
from mergelab.engine.spectral import tsv_vector
from mergelab.engine.streaming import StateDict, as_factor_list
from mergelab.methods.base import MergeContext, ScaledMethod, save_task_vector


class TaskSingularVectors(ScaledMethod):
    """θ = θ0 + α·TSV-M(τ1, …, τT), one model per α.

    Args:
        scaling_factor: α (1.0 in the TSV paper; its authors pick it on validation); a
            list scores every value and picks on validation.
    """

    min_tasks = 2

    def __init__(self, scaling_factor: float | list[float] = 1.0):
        self.scaling_factor = as_factor_list(scaling_factor, "scaling_factor")

    def merged_task_vector(
        self, pool: ModelPool, context: MergeContext, output: Path | None
    ) -> StateDict:
        delta = tsv_vector(pool, context.device)
        save_task_vector(delta, pool, output, self.describe())
        return delta
