"""Each task's own fine-tuned model on every task: the ceiling of the normalised accuracy."""

from __future__ import annotations

from typing import ClassVar

from mergelab.methods.base import MergeContext, MergeMethod, Variants


class Finetuned(MergeMethod):
    """Task t scored with θt; one model per task, read when its task is scored."""

    name: ClassVar[str] = "finetuned"

    def __init__(self):
        pass

    def variants(self, context: MergeContext) -> Variants:
        pool = context.rank_zero_first(context.pool)
        return Variants(
            [self.name], per_task=lambda task: {self.name: dict(pool.finetuned[task].items())}
        )
