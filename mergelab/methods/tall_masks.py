"""TALL masks (Wang et al., ICML 2024): for each task, the coordinates of τMTL it needs,
retrieved as θ̂t = θ0 + mt ⊙ τMTL; each task's λ picked on its own validation data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mergelab.engine import tall_masks as masks_file
from mergelab.engine.pool import ModelPool
from mergelab.engine.tall_layout import DEFAULT_LAMBDAS, checked_lambdas
from mergelab.errors import BadValue
from mergelab.methods.base import MergeContext, MergeMethod, ScaledMethod, Variants

MASKS_FILE = "tall_masks.safetensors"


def built_masks(
    context: MergeContext, lambdas: Sequence[float], multitask: ScaledMethod | None
) -> masks_file.TallMasks:
    """Every task's masks over ``lambdas`` of τMTL (Σ τt, or the merged task vector of
    ``multitask``), built once (streamed into the artifact folder's tall_masks.safetensors
    when there is one, else kept in memory)."""

    def build(path: Path | None) -> masks_file.TallMasks:
        pool: ModelPool = context.pool()
        vector = None if multitask is None else multitask.merged_task_vector(pool, context, None)
        return masks_file.TallMasks.build(
            pool.pretrained,
            pool.finetuned,
            lambdas,
            output=path,
            overwrite=True,
            multitask=vector,
            multitask_settings=None if multitask is None else multitask.describe(),
            selection=pool.selection,
        )

    return context.build_once(MASKS_FILE, build, masks_file.TallMasks.load)


def check_multitask(multitask: object) -> None:
    """τMTL comes from one merged task vector: a single-model method with one setting."""
    if multitask is None:
        return
    if not isinstance(multitask, ScaledMethod):
        raise BadValue(
            f"multitask: {type(multitask).__name__} does not merge into one task vector "
            "(TALL masks and consensus take τMTL from a single-model method such as "
            "TaskArithmetic, Ties, TaskSingularVectors or Isotropic)"
        )
    if len(multitask.grid()) != 1:
        raise BadValue(
            f"multitask: {multitask.name} is given {len(multitask.grid())} settings "
            f"({multitask.grid()}); τMTL is one merged task vector: give one"
        )


class TallMasks(MergeMethod):
    """One model per task, θ̂t = θ0 + mt ⊙ τMTL, with λ picked per task on validation.

    Args:
        lambdas: the λ grid; each task's λ is picked on its validation data.
        multitask: null for τMTL = Σ τt; else the single-model method whose merged task
            vector (unscaled: its scaling_factor is not used) is τMTL, by class, e.g.
            ``{class_path: mergelab.methods.Ties, init_args: {keep: 0.2}}`` for the TALL
            paper's "TALL mask + TIES", or TaskSingularVectors, Isotropic.
    """

    min_tasks = 2

    def __init__(
        self,
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        multitask: ScaledMethod | None = None,
    ):
        self.lambdas = checked_lambdas(list(lambdas))
        check_multitask(multitask)
        self.multitask = multitask

    def settings_scored(self) -> int:
        return len(self.lambdas)

    def variants(self, context: MergeContext) -> Variants:
        masks = built_masks(context, self.lambdas, self.multitask)
        pretrained = context.pretrained()
        names = [f"{self.name}@{lam!r}" for lam in self.lambdas]
        models: dict[str, dict[str, torch.Tensor]] = {}

        def retrieved(task: str, wanted: list[str]) -> dict[str, dict[str, torch.Tensor]]:
            # into the previous task's tensors: the evaluator is done with that task's
            # models before it asks for the next task's
            for name, lam in zip(names, self.lambdas, strict=True):
                if name in wanted:
                    models[name] = masks.retrieve(pretrained, task, lam, reuse=models.get(name))
            return {name: models[name] for name in wanted}

        settings = {n: {"lambda": lam} for n, lam in zip(names, self.lambdas, strict=True)}
        return Variants(names, per_task=retrieved, settings=settings)
