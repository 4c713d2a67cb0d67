"""mergekit's merge methods (github arcee-ai/mergekit): ``linear``, ``task_arithmetic``,
``ties``, ``dare_linear`` and ``dare_ties``, with per-model weights and densities and
every trim done per tensor, as mergekit does them (:mod:`mergelab.merging.mergekit_rules`).

Here the merged model θ is written as θ0 + 1·δ with δ = θ − θ0, one parameter at a time,
so the method runs wherever a single-model method does: ``mergelab merge`` (which also
reads mergekit's own YAML into this class), and the CLIP test loop.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import torch

from mergelab.engine.checkpoints import read_into
from mergelab.engine.parameterwise import check_merged_finite
from mergelab.engine.pool import ModelPool
from mergelab.engine.streaming import StateDict, progress
from mergelab.engine.workspace import Workspace
from mergelab.errors import BadValue, MissingKey
from mergelab.merging import mergekit_rules
from mergelab.merging.finite import all_finite
from mergelab.methods.base import MergeContext, ScaledMethod, save_task_vector

MergekitMethod = Literal["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
# each method's defaults (mergekit/merge_methods/registry.py)
NORMALIZE = {"linear": True, "task_arithmetic": False, "ties": True}
RESCALE = {"dare_linear": True, "dare_ties": True}


class Mergekit(ScaledMethod):
    """One of mergekit's methods, per tensor, with per-model weights.

    Args:
        merge_method: linear, task_arithmetic, ties, dare_linear or dare_ties.
        weights: each model's weight, by task name (mergekit's ``weight``).
        densities: each model's density (ties: the share of its largest |δ| kept per
            tensor; dare: the chance an entry is kept); null or a missing task: 1.
        normalize: divide by the (agreeing) weights' sum; null: the method's default
            (linear and ties true, the others false).
        rescale: DARE's L1 rescaling of the kept entries (mergekit ≥ 0.1); null: the
            method's default (true for dare, false for ties).
        lambda_: mergekit's ``lambda``, the merged task vector's scale.
        seed: the seed of DARE's draws (one generator, the parameters in order).
    """

    min_tasks = 1

    def __init__(
        self,
        merge_method: MergekitMethod = "task_arithmetic",
        weights: dict[str, float] | None = None,
        densities: dict[str, float] | None = None,
        normalize: bool | None = None,
        rescale: bool | None = None,
        lambda_: float = 1.0,
        seed: int = 0,
    ):
        if merge_method not in (*NORMALIZE, *RESCALE):
            raise BadValue(
                f"merge_method {merge_method!r}: mergelab reads {[*NORMALIZE, *RESCALE]}"
            )
        for task, density in (densities or {}).items():
            if not 0 < density <= 1:
                raise BadValue(f"density of {task!r} must be in (0, 1], got {density}")
        self.merge_method = merge_method
        self.weights = weights
        self.densities = densities
        self.normalize = normalize
        self.rescale = rescale
        self.lambda_ = lambda_
        self.seed = seed
        self.scaling_factor = [1.0]  # θ = θ0 + 1·(θmerged − θ0)

    def check_tasks(self, tasks) -> None:
        super().check_tasks(tasks)
        missing = [task for task in tasks if task not in (self.weights or {})]
        if missing:
            raise MissingKey(f"{self.merge_method}: no weight for model {missing[0]!r}")
        unknown = [t for t in [*(self.weights or {}), *(self.densities or {})] if t not in tasks]
        if unknown:
            raise MissingKey(
                f"{self.merge_method}: a weight or density for {unknown[0]!r}, "
                f"which is not among the models {list(tasks)}"
            )

    def rule(
        self, generator: torch.Generator
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """(θ0 of a parameter, θt stacked [T, *shape]) ↦ the merged parameter, float32."""
        tasks = list(self.weights)
        weights = [self.weights[task] for task in tasks]
        densities = [(self.densities or {}).get(task, 1.0) for task in tasks]
        normalize = (
            NORMALIZE.get(self.merge_method, False) if self.normalize is None else self.normalize
        )
        rescale = RESCALE.get(self.merge_method, False) if self.rescale is None else self.rescale
        method, lam = self.merge_method, self.lambda_
        if method == "linear":
            return lambda base, models: mergekit_rules.linear(models, weights, normalize)
        if method == "task_arithmetic":
            return functools.partial(
                mergekit_rules.task_arithmetic, weights=weights, normalize=normalize, lambda_=lam
            )
        if method == "ties":
            return functools.partial(
                mergekit_rules.ties,
                weights=weights,
                densities=densities,
                normalize=normalize,
                rescale=rescale,
                lambda_=lam,
            )
        return functools.partial(
            mergekit_rules.dare,
            weights=weights,
            densities=densities,
            generator=generator,
            sign_consensus=method == "dare_ties",
            normalize=normalize,
            rescale=rescale,
            lambda_=lam,
        )

    @contextlib.contextmanager
    def parameter_deltas(
        self, pool: ModelPool, context: MergeContext
    ) -> Iterator[Callable[[str], torch.Tensor]]:
        self.check_tasks(pool.tasks)
        rule = self.rule(torch.Generator().manual_seed(self.seed))
        workspace = Workspace()

        def delta_of(key: str) -> torch.Tensor:
            spec = pool.specs[key]
            base = read_into(pool.pretrained, key, workspace.get("base", spec.shape, torch.float32))
            models = workspace.get("models", (len(self.weights), *spec.shape), torch.float32)
            for row, task in zip(models, self.weights, strict=True):
                read_into(pool.finetuned[task], key, row)
                if not all_finite(row):
                    raise BadValue(f"model {task!r} has NaN or Inf values at {key!r}")
            delta = rule(base, models) - base
            check_merged_finite(key, delta)
            return delta.to(pool.compute_dtype(key))

        yield delta_of

    def merged_task_vector(
        self, pool: ModelPool, context: MergeContext, output: Path | None
    ) -> StateDict:
        with self.parameter_deltas(pool, context) as delta_of:
            delta = {key: delta_of(key) for key in progress(pool.merged_keys, self.merge_method)}
        save_task_vector(delta, pool, output, self.describe())
        return delta
