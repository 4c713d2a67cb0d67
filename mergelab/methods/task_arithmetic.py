"""Task Arithmetic (Ilharco et al., ICLR 2023): θ = θ0 + λ Σt τt, one model per λ."""

from __future__ import annotations

from mergelab.engine.streaming import as_factor_list
from mergelab.engine.task_arithmetic import task_arithmetic_vector
from mergelab.methods.base import (
    MergeContext,
    MergeMethod,
    Variants,
    save_task_vector,
    scaled_variants,
)


class TaskArithmetic(MergeMethod):
    """θ = θ0 + λ Σt τt, one model per λ.

    Args:
        scaling_factor: λ; a list scores every value and picks on validation when the data
            module's test_splits has ``val``.
    """

    min_tasks = 2

    def __init__(self, scaling_factor: float | list[float] = 0.3):
        self.scaling_factor = as_factor_list(scaling_factor, "scaling_factor")

    def variants(self, context: MergeContext) -> Variants:
        pool = context.pool()
        delta = task_arithmetic_vector(pool)
        save_task_vector(delta, pool, context, self.describe())
        return scaled_variants(
            self.name, pool.pretrained, pool.merged_keys, delta.__getitem__, self.scaling_factor
        )
