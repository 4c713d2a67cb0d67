"""TALL masks (Wang et al., ICML 2024): for each task, the coordinates of τMTL it needs,
retrieved as θ̂t = θ0 + mt ⊙ τMTL; each task's λ picked on its own validation data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mergelab.engine import tall_masks as masks_file
from mergelab.engine.pool import ModelPool
from mergelab.methods.base import MergeContext, MergeMethod, Variants

MASKS_FILE = "tall_masks.safetensors"


def built_masks(
    context: MergeContext, lambdas: Sequence[float], ties: float | None
) -> masks_file.TallMasks:
    """Every task's masks over ``lambdas``, built once (streamed into the artifact folder's
    tall_masks.safetensors when there is one, else kept in memory)."""

    def build(path: Path | None) -> masks_file.TallMasks:
        pool: ModelPool = context.pool()
        return masks_file.TallMasks.build(
            pool.pretrained, pool.finetuned, lambdas, ties, output=path, overwrite=True
        )

    return context.build_once(MASKS_FILE, build, masks_file.TallMasks.load)


class TallMasks(MergeMethod):
    """One model per task, θ̂t = θ0 + mt ⊙ τMTL, with λ picked per task on validation.

    Args:
        lambdas: the λ grid; each task's λ is picked on its validation data.
        ties: the share each task keeps in a TIES-merged τMTL (0.2 in the TALL paper); null
            for τMTL = Σ τt.
    """

    min_tasks = 2

    def __init__(
        self, lambdas: Sequence[float] = masks_file.DEFAULT_LAMBDAS, ties: float | None = None
    ):
        self.lambdas = masks_file.checked_lambdas(list(lambdas))
        masks_file.check_ties(ties)
        self.ties = ties

    def settings_scored(self) -> int:
        return len(self.lambdas)

    def variants(self, context: MergeContext) -> Variants:
        masks = built_masks(context, self.lambdas, self.ties)
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
