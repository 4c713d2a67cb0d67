"""Lightning callbacks: build the merge method's variants before evaluation, report after it."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from mergelab.lightning.evaluation import MergeEvaluator
from mergelab.lightning.gradient_stats import GradientStatistics
from mergelab.lightning.results import write_report
from mergelab.methods import MergeContext, MergeMethod, TrustRegion

log = logging.getLogger(__name__)


class MergeCallback(L.Callback):
    """Builds the merge method's variants before evaluation, and TATR with the statistics
    that GradientStatistics computed when its fit ends.

    Args:
        method: the merge method, a class of mergelab.methods (ZeroShot, Finetuned,
            TaskArithmetic, TrustRegion, TallMasks, Consensus) or a MergeMethod subclass
            of your own, by class path; its settings under init_args
            (``--merge.method=TrustRegion --merge.method.threshold_quantile=0.95``);
            the CLI's default is TaskArithmetic.
        save_artifact: write the merged task vector or the masks to the run's log folder.
    """

    def __init__(self, method: MergeMethod, save_artifact: bool = True):
        self.method = method
        self.save_artifact = save_artifact

    def _context(self, trainer: L.Trainer, module: MergeEvaluator, tasks, pool) -> MergeContext:
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # every rank: a broadcast

        def log_metrics(metrics: dict[str, float]) -> None:
            for logger in module.loggers:
                logger.log_metrics(metrics)
                logger.save()

        return MergeContext(
            tasks=list(tasks),
            pretrained=module.pretrained_state,
            pool=pool,
            artifact_dir=log_dir if self.save_artifact else None,
            log_metrics=log_metrics,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" or not isinstance(pl_module, MergeEvaluator):
            return  # FineTuner trains; GradientStatistics merges when fit ends
        if pl_module.variants is not None:
            return
        tasks = trainer.datamodule.task_names
        self.method.check_tasks(tasks)
        context = self._context(trainer, pl_module, tasks, lambda: pl_module.model_pool(tasks))
        variants = self.method.variants(context)
        variants.description = self.method.describe()
        pl_module.variants = variants

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After GradientStatistics: TATR with the statistics, saved to the run's folder."""
        if not isinstance(pl_module, GradientStatistics):
            return
        pool = pl_module.pool
        context = self._context(trainer, pl_module, pool.tasks, lambda: pool)
        if not trainer.is_global_zero:
            return
        if not isinstance(self.method, TrustRegion):
            log.info("merge.method is %s: no merge at the end of fit", self.method)
            return
        folder = str(pl_module.statistics_folder)
        method = type(self.method)(**self.method.init_args() | {"gradient_stats": folder})
        method.merged_task_vector(pool, context)


class ResultsReport(L.Callback):
    """Writes results.json, results.md and a per-task accuracy plot after each evaluation.

    Args:
        print_table: also print the results table to standard output.
    """

    def __init__(self, print_table: bool = True):
        self.print_table = print_table

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._report(trainer, pl_module)

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not getattr(pl_module, "results", None):
            return
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        paths = write_report(pl_module.results, log_dir)
        if self.print_table:
            print(paths["markdown"].read_text())
            print(f"results written to {log_dir}")
