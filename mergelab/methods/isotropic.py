"""Isotropic merging (Marczak et al., ICML 2025, arXiv 2502.04959): Iso-C flattens the
spectrum of Σt τt per weight matrix; Iso-CTS adds task-specific subspaces orthogonal to a
common one. θ = θ0 + α·δ."""

from __future__ import annotations

from pathlib import Path

from mergelab.engine.pool import ModelPool
from mergelab.engine.spectral import isotropic_vector
from mergelab.engine.streaming import StateDict, as_factor_list
from mergelab.merging.isotropic import check_common_fraction
from mergelab.methods.base import MergeContext, ScaledMethod, save_task_vector


class Isotropic(ScaledMethod):
    """Iso-C, or Iso-CTS with a common subspace: θ = θ0 + α·δ, one model per α.

    Args:
        scaling_factor: α, picked on validation by the paper's authors; a list scores
            every value and picks on validation.
        common_subspace: null for Iso-C; for Iso-CTS, the share of each matrix's rank
            spanned by the common subspace of Σt τt (0.8 in the paper), the rest shared
            equally among the tasks' own subspaces.
    """

    min_tasks = 2

    def __init__(
        self, scaling_factor: float | list[float] = 1.0, common_subspace: float | None = None
    ):
        if common_subspace is not None:
            check_common_fraction(common_subspace)
        self.scaling_factor = as_factor_list(scaling_factor, "scaling_factor")
        self.common_subspace = common_subspace

    def merged_task_vector(
        self, pool: ModelPool, context: MergeContext, output: Path | None
    ) -> StateDict:
        delta = isotropic_vector(pool, self.common_subspace, context.device)
        save_task_vector(delta, pool, output, self.describe())
        return delta
