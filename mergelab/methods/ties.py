"""TIES merging (Yadav et al., NeurIPS 2023): trim each task vector to its top share of
magnitudes, elect a sign per coordinate, merge the entries that agree; θ = θ0 + λ·δ."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mergelab.engine.parameterwise import TaskVectors
from mergelab.engine.pool import ModelPool
from mergelab.engine.streaming import StateDict, as_factor_list
from mergelab.engine.ties import ties_merged_vector
from mergelab.engine.ties_streamed import StreamedTies
from mergelab.merging.ties import check_keep_fraction
from mergelab.methods.base import MergeContext, ScaledMethod, save_task_vector


class Ties(ScaledMethod):
    """θ = θ0 + λ·TIES(τ1, …, τT), one model per λ.

    Args:
        scaling_factor: λ; a list scores every value and picks on validation when the data
            module's test_splits has ``val``.
        keep: the share of each task vector's largest magnitudes kept (over the whole
            model; 0.2 in the TIES and TALL papers).
        disjoint_mean: divide each coordinate's agreeing sum by how many tasks agree (the
            TIES paper's "dis-mean", used with λ ≈ 1); false sums them, as the TALL code
            and FusionBench do (λ ≈ 0.3).
    """

    min_tasks = 2

    def __init__(
        self,
        scaling_factor: float | list[float] = 0.3,
        keep: float = 0.2,
        disjoint_mean: bool = False,
    ):
        check_keep_fraction(keep)
        self.scaling_factor = as_factor_list(scaling_factor, "scaling_factor")
        self.keep = keep
        self.disjoint_mean = disjoint_mean

    def merged_task_vector(
        self, pool: ModelPool, context: MergeContext, output: Path | None
    ) -> StateDict:
        task_vectors = TaskVectors(pool, context.device)
        delta = ties_merged_vector(task_vectors, self.keep, self.disjoint_mean)
        save_task_vector(delta, pool, output, self.describe())
        return delta

    @contextlib.contextmanager
    def parameter_deltas(
        self, pool: ModelPool, context: MergeContext
    ) -> Iterator[Callable[[str], torch.Tensor]]:
        streamed = StreamedTies(pool, self.keep, self.disjoint_mean)
        try:
            yield streamed
        finally:
            streamed.close()
