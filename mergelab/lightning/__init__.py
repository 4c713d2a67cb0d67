"""The Lightning adapters: thin modules between the merge code and Lightning's Trainer.

``data`` (TaskDataModule), ``evaluation`` (MergeEvaluator, the test loop), ``finetune``
(FineTuner), ``gradient_stats`` (TATR's statistics under fit), ``callbacks`` (the merge
and report callbacks) and ``results`` (results.json, results.md, the plots).
"""
