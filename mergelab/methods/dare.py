"""DARE (Yu et al., ICML 2024): each task vector's coordinates dropped with probability p
and the rest rescaled by 1/(1 − p), then summed (Task Arithmetic) or TIES-merged."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mergelab.engine.dare import dare_delta, dare_vector, summed_in_blocks
from mergelab.engine.pool import ModelPool
from mergelab.engine.streaming import StateDict, as_factor_list
from mergelab.engine.workspace import BlockWorkers
from mergelab.merging.dare import check_drop_rate
from mergelab.merging.ties import check_keep_fraction
from mergelab.methods.base import MergeContext, ScaledMethod, save_task_vector


class Dare(ScaledMethod):
    """θ = θ0 + λ Σt τt ⊙ mt / (1 − p) (or the TIES merge of the dropped vectors).

    Args:
        scaling_factor: λ; a list scores every value and picks on validation.
        drop_rate: p, the probability that a coordinate of a task vector is dropped; a
            list scores every p (with every λ) and picks on validation.
        seed: the seed of the drop masks (each task's mask of each parameter is a counter
            hash under the seed, the task and the parameter's key, so a run is
            reproducible on any device, in any task order and with any torch version).
        ties: null merges the dropped vectors as Task Arithmetic; a share keeps that share
            of each dropped vector's largest magnitudes and TIES-merges them (DARE + TIES;
            1.0 elects signs without trimming, as mergekit's dare_ties).
    """

    min_tasks = 2

    def __init__(
        self,
        scaling_factor: float | list[float] = 0.3,
        drop_rate: float | list[float] = 0.5,
        seed: int = 0,
        ties: float | None = None,
    ):
        self.drop_rates = as_factor_list(drop_rate, "drop_rate")
        for rate in self.drop_rates:
            check_drop_rate(rate)
        if ties is not None:
            check_keep_fraction(ties)
        self.scaling_factor = as_factor_list(scaling_factor, "scaling_factor")
        self.drop_rate = drop_rate
        self.seed = seed
        self.ties = ties

    def grid(self) -> list[dict]:
        if len(self.drop_rates) == 1:
            return [{}]
        return [{"drop_rate": rate} for rate in self.drop_rates]

    def merged_task_vector(
        self,
        pool: ModelPool,
        context: MergeContext,
        output: Path | None,
        drop_rate: float | None = None,
    ) -> StateDict:
        [rate] = self.drop_rates if drop_rate is None else [drop_rate]
        delta = dare_vector(pool, rate, self.seed, self.ties, context.device)
        save_task_vector(delta, pool, output, self.describe() | {"drop_rate": rate})
        return delta

    @contextlib.contextmanager
    def parameter_deltas(
        self, pool: ModelPool, context: MergeContext, drop_rate: float | None = None
    ) -> Iterator[Callable[[str], torch.Tensor]]:
        """The sum on the CPU: each parameter's δ as it is asked for (memory: one
        parameter); under TIES or on another device, δ whole first."""
        [rate] = self.drop_rates if drop_rate is None else [drop_rate]
        if not summed_in_blocks(self.ties, context.device):
            with super().parameter_deltas(pool, context, drop_rate=rate) as delta_of:
                yield delta_of
            return
        with BlockWorkers() as workers:
            yield lambda key: dare_delta(pool, key, workers, rate, self.seed)
