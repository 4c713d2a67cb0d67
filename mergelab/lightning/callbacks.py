"""Lightning callbacks: build the merge method's variants before evaluation, report after it."""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L

from mergelab.errors import BadValue
from mergelab.lightning.evaluation import MergeEvaluator
from mergelab.lightning.gradient_stats import GradientStatistics
from mergelab.lightning.results import check_reference, write_report
from mergelab.methods import MergeContext, MergeMethod, TrustRegion

log = logging.getLogger(__name__)


class MergeCallback(L.Callback):
    """Builds the merge method's variants before evaluation, and TATR with the statistics
    that GradientStatistics computed when its fit ends.

    On several processes (DDP, any number of devices and nodes) rank 0 loads the models,
    builds the merge and writes its artifact; the other ranks wait and read the artifact,
    so the merge is built once and every rank scores the same weights.

    Args:
        method: the merge method, a class of mergelab.methods (ZeroShot, Finetuned,
            TaskArithmetic, TrustRegion, TallMasks, Consensus) or a MergeMethod subclass
            of your own, by class path; its settings under init_args
            (``--merge.method=TrustRegion --merge.method.threshold_quantile=0.95``);
            the CLI's default is TaskArithmetic.
        save_artifact: write the merged task vector or the masks to the run's log folder.
        report_without_pick: a test run that scores several settings (scaling factors, a
            λ grid) picks one on validation and so needs ``val`` in data.test_splits;
            true reports every setting without a pick instead (the first is the headline).
    """

    def __init__(
        self, method: MergeMethod, save_artifact: bool = True, report_without_pick: bool = False
    ):
        self.method = method
        self.save_artifact = save_artifact
        self.report_without_pick = report_without_pick
        self._shared_dir: Path | None = None

    def check(self, stage: str, test_splits: Sequence[str]) -> None:
        """Refuse, before any model is loaded, a test run without a test split, and one
        that scores several settings and could pick none on validation."""
        if stage == "test" and "test" not in test_splits:
            raise BadValue(
                f"data.test_splits {list(test_splits)} has no test split for a test run to "
                "score: add test (--data.test_splits=[val, test]), or score validation "
                "alone with `mergelab validate`"
            )
        count = self.method.settings_scored()
        several = stage == "test" and count > 1 and "val" not in test_splits
        if several and not self.report_without_pick:
            raise BadValue(
                f"{self.method.name} scores {count} settings but data.test_splits "
                f"{list(test_splits)} has no val to pick one on: add val "
                "(--data.test_splits=[val, test]), give one setting, or report every "
                "setting without a pick (--merge.report_without_pick=true)"
            )

    def _context(
        self, trainer: L.Trainer, module: MergeEvaluator, tasks, pool, shared: bool = True
    ) -> MergeContext:
        """``shared``: the other ranks read what rank 0 builds (not so at the end of fit,
        where rank 0 alone merges)."""
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # every rank: a broadcast
        artifact_dir = log_dir if self.save_artifact else None
        if artifact_dir is None and shared and trainer.world_size > 1:
            # the ranks share the merge through a file: one in the run folder, removed at
            # the end (the run folder is where every node already writes)
            self._shared_dir = artifact_dir = log_dir / ".merge"

        def log_metrics(metrics: dict[str, float]) -> None:
            for logger in module.loggers:
                logger.log_metrics(metrics)
                logger.save()

        pretrained = functools.cache(module.pretrained_state)
        return MergeContext(
            tasks=list(tasks),
            pretrained=pretrained,
            pool=functools.cache(lambda: pool(pretrained())),
            artifact_dir=artifact_dir,
            log_metrics=log_metrics,
            sharing=functools.partial(rank_zero_builds, trainer),
            device=trainer.strategy.root_device,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" or not isinstance(pl_module, MergeEvaluator):
            return  # FineTuner trains; GradientStatistics merges when fit ends
        if pl_module.variants is not None:
            return
        datamodule = trainer.datamodule
        self.check(stage, datamodule.test_splits)
        datamodule.check_data("val" if stage == "validate" else stage)
        tasks = datamodule.task_names
        # before the merge, not after
        check_reference(pl_module.finetuned_accuracy, tasks, pl_module.finetuned_accuracy_source)
        self.method.check_tasks(tasks)
        pool = functools.partial(pl_module.model_pool, tasks)
        variants = self.method.variants(self._context(trainer, pl_module, tasks, pool))
        variants.description = self.method.describe()
        pl_module.variants = variants

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._shared_dir is not None:
            trainer.strategy.barrier()  # every rank has read what it needs
            if trainer.is_global_zero:
                shutil.rmtree(self._shared_dir, ignore_errors=True)
            self._shared_dir = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After GradientStatistics: TATR with the statistics, saved to the run's folder."""
        if not isinstance(pl_module, GradientStatistics):
            return
        pool = pl_module.pool
        context = self._context(trainer, pl_module, pool.tasks, lambda _: pool, shared=False)
        if not trainer.is_global_zero:
            return
        if not isinstance(self.method, TrustRegion):
            log.info("merge.method is %s: no merge at the end of fit", self.method.name)
            return
        folder = str(pl_module.statistics_folder)
        method = type(self.method)(**self.method.init_args() | {"gradient_stats": folder})
        method.save_task_vectors(pool, context)


def rank_zero_builds(trainer: L.Trainer, path: Path | None, build: Callable, load) -> object:
    """``build(path)`` on rank 0; on the other ranks, once rank 0 is done, ``load(path)``
    (or ``build(path)`` again with ``load`` None: e.g. loading models that rank 0 has
    converted into the cache). A failure on rank 0 stops every rank, naming it."""
    if trainer.world_size == 1:
        return build(path)
    result, failure = None, None
    if trainer.is_global_zero:
        try:
            result = build(path)
        except Exception as error:
            failure = error
    message = trainer.strategy.broadcast(None if failure is None else repr(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise RuntimeError(f"rank 0 could not build the merge: {message}")
    if trainer.is_global_zero:
        return result
    return build(path) if load is None else load(path)


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
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # every rank: a broadcast
        if not trainer.is_global_zero or not getattr(pl_module, "results", None):
            return
        paths = write_report(pl_module.results, log_dir)
        if self.print_table:
            print(paths["markdown"].read_text())
            print(f"results written to {log_dir}")
