"""Each task's own fine-tuned model on every task: the ceiling of the normalised accuracy."""

from __future__ import annotations

from typing import ClassVar

import torch

from mergelab.errors import BadValue
from mergelab.methods.base import MergeContext, MergeMethod, Variants


class Finetuned(MergeMethod):
    """Task t scored with θt; one model per task, read when its task is scored."""

    name: ClassVar[str] = "finetuned"

    def __init__(self):
        pass

    def variants(self, context: MergeContext) -> Variants:
        pool = context.rank_zero_first(context.pool)

        def model_of(task: str, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
            model = dict(pool.finetuned[task].items())
            for key, tensor in model.items():
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise BadValue(f"fine-tuned model of {task!r} has NaN or Inf at {key!r}")
            return {self.name: model}

        return Variants([self.name], per_task=model_of)
