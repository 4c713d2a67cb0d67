"""TALL masks (Wang et al., ICML 2024): for each task, the coordinates of τMTL it needs,
retrieved as θ̂t = θ0 + mt ⊙ τMTL; each task's λ picked on its own validation data."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.engine import tall_masks as masks_file
from mergelab.engine.pool import ModelPool
from mergelab.methods.base import MergeContext, MergeMethod, Variants


def build_masks(
    pool: ModelPool, lambdas: Sequence[float], ties: float | None, context: MergeContext
) -> masks_file.TallMasks:
    """Every task's masks over ``lambdas``, streamed into the artifact folder's
    ``tall_masks.safetensors`` when there is one, else kept in memory."""
    output = (
        None if context.artifact_dir is None else context.artifact_dir / "tall_masks.safetensors"
    )
    return masks_file.TallMasks.build(
        pool.pretrained, pool.finetuned, lambdas, ties, output=output, overwrite=True
    )


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

    def variants(self, context: MergeContext) -> Variants:
        pool = context.pool()
        masks = build_masks(pool, self.lambdas, self.ties, context)
        names = [f"{self.name}@{lam!r}" for lam in self.lambdas]
        models: dict[str, dict[str, torch.Tensor]] = {}

        def retrieved(task: str) -> dict[str, dict[str, torch.Tensor]]:
            # into the previous task's tensors: the evaluator is done with that task's
            # models before it asks for the next task's
            for name, lam in zip(names, self.lambdas, strict=True):
                models[name] = masks.retrieve(pool.pretrained, task, lam, reuse=models.get(name))
            return dict(models)

        return Variants(names, per_task=retrieved)
