"""The pretrained model θ0 on every task: the floor every merge is compared with."""

from __future__ import annotations

from mergelab.methods.base import MergeContext, MergeMethod, Variants


class ZeroShot(MergeMethod):
    """θ0 with each task's zero-shot head; no fine-tuned model is loaded."""

    def __init__(self):
        pass

    def variants(self, context: MergeContext) -> Variants:
        return Variants([self.name], shared={self.name: context.pretrained()})
