"""Lightning callbacks: build the merged weights before evaluation, report after it."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from mergelab.evaluation import MergeEvaluator, Variants
from mergelab.gradient_stats import GradientStatistics, load_task_statistics
from mergelab.io.checkpoints import save_state_dict
from mergelab.merge import as_factor_list, build_models, task_arithmetic_vector, trust_region_vector
from mergelab.pool import ModelPool
from mergelab.results import write_report
from mergelab.tall import DEFAULT_LAMBDAS, TallMasks

log = logging.getLogger(__name__)

Method = Literal[
    "zero_shot", "finetuned", "task_arithmetic", "trust_region", "tall_masks", "consensus"
]
NEEDS_TWO_TASKS = ("task_arithmetic", "trust_region", "tall_masks", "consensus")


class MergeCallback(L.Callback):
    """Holds a merge method and its settings; builds the variants before evaluation.

    Args:
        method: ``zero_shot`` (θ0), ``finetuned`` (each task's own model), ``task_arithmetic``,
            ``trust_region`` (TATR; zero-shot conflicts from |τ|, or from gradient
            statistics), ``tall_masks`` (one retrieved model per task), or ``consensus``.
        scaling_factor: λ of Task Arithmetic and TATR, α of consensus; a list scores every
            value and picks on validation when the data module's test_splits has ``val``.
        threshold_quantile: TATR's quantile q of the conflict Ω; the top 1 − q is dropped.
        lambdas: the TALL λ grid; each task's λ is picked on validation.
        ties: for TALL and consensus, the share each task keeps in a TIES-merged τMTL
            (0.2 in the TALL paper); null for τMTL = Σ τt.
        k: consensus: keep coordinates that at least k tasks' masks keep.
        tall_lambda: consensus: the TALL λ of every task's mask.
        save_artifact: write the merged task vector or the masks to the run's log folder.
        gradient_stats: TATR with gradients: the folder of per-task gradient statistics
            that ``mergelab fit`` with mergelab.gradient_stats.GradientStatistics wrote
            (checked against the pretrained model). Under that fit, TATR is built with the
            statistics just computed when fit ends, and saved to the run's folder.
    """

    def __init__(
        self,
        method: Method = "task_arithmetic",
        scaling_factor: float | list[float] = 0.3,
        threshold_quantile: float = 0.99,
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        ties: float | None = None,
        k: int = 2,
        tall_lambda: float = 0.6,
        save_artifact: bool = True,
        gradient_stats: str | None = None,
    ):
        if method not in Method.__args__:
            raise ValueError(f"unknown merge method {method!r}; choose from {Method.__args__}")
        if gradient_stats is not None and method != "trust_region":
            raise ValueError(f"gradient_stats is for method trust_region, not {method!r}")
        if not 0 < threshold_quantile <= 1:
            raise ValueError(f"threshold_quantile must be in (0, 1], got {threshold_quantile}")
        if k < 0:
            raise ValueError(f"consensus k must be ≥ 0, got {k}")
        for lam in [*lambdas, tall_lambda]:
            if lam <= 0:
                raise ValueError(f"TALL λ must be > 0, got {lam}")
        self.method = method
        self.scaling_factors = as_factor_list(scaling_factor, "scaling_factor")
        self.threshold_quantile = threshold_quantile
        self.lambdas = [float(v) for v in lambdas]
        self.ties = ties
        self.k = k
        self.tall_lambda = tall_lambda
        self.save_artifact = save_artifact
        self.gradient_stats = gradient_stats

    def settings(self) -> dict:
        common = {"method": self.method}
        specific = {
            "task_arithmetic": {"scaling_factor": self.scaling_factors},
            "trust_region": {
                "scaling_factor": self.scaling_factors,
                "threshold_quantile": self.threshold_quantile,
                "gradient_stats": self.gradient_stats,
            },
            "tall_masks": {"lambdas": self.lambdas, "ties": self.ties},
            "consensus": {
                "scaling_factor": self.scaling_factors,
                "k": self.k,
                "tall_lambda": self.tall_lambda,
                "ties": self.ties,
            },
        }
        return common | specific.get(self.method, {})

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" or not isinstance(pl_module, MergeEvaluator):
            return  # FineTuner trains; GradientStatistics merges when fit ends
        if pl_module.variants is not None:
            return
        tasks = trainer.datamodule.task_names
        if self.method in NEEDS_TWO_TASKS and len(tasks) < 2:
            raise ValueError(f"{self.method} needs at least two tasks, got {tasks}")
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        pl_module.variants = self.build(pl_module, tasks, log_dir)
        pl_module.variants.description = self.settings()

    def build(self, module: MergeEvaluator, tasks: list[str], log_dir: Path) -> Variants:
        """The variants of this method; long steps (loading, merging) happen here."""
        if self.method == "zero_shot":
            return Variants(["zero_shot"], shared={"zero_shot": module.pretrained_state()})
        pool = module.model_pool(tasks)
        if self.method == "finetuned":
            return Variants(
                ["finetuned"], per_task=lambda t: {"finetuned": dict(pool.finetuned[t].items())}
            )
        if self.method in ("tall_masks", "consensus"):
            return self._tall_variants(pool, log_dir)
        if self.method == "task_arithmetic":
            delta = task_arithmetic_vector(pool)
            extra = {}
        else:
            gradients = None
            if self.gradient_stats is not None:
                gradients = load_task_statistics(
                    self.gradient_stats, pool.tasks, pool.fingerprint()
                )
            delta, extra = self._trust_region(pool, gradients, module.loggers)
        self._save_delta(delta, pool, log_dir, extra)
        return self._scaled(pool.pretrained, pool.merged_keys, delta.__getitem__)

    def _trust_region(self, pool: ModelPool, gradients, loggers) -> tuple[dict, dict]:
        """TATR's δ and what to note in its artifact; threshold and densities logged."""
        merged = trust_region_vector(pool, self.threshold_quantile, gradients)
        log.info("TATR kept %.4f%% of coordinates", 100 * merged.kept_fraction)
        metrics = {"trust_region/threshold": merged.threshold}
        metrics |= {f"trust_region/density/{k}": v for k, v in merged.density().items()}
        for logger in loggers:
            logger.log_metrics(metrics)
            logger.save()
        return merged.delta, {"threshold": merged.threshold}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After GradientStatistics: TATR with the statistics, saved to the run's folder."""
        if not isinstance(pl_module, GradientStatistics):
            return
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # every rank: a broadcast
        if not trainer.is_global_zero:
            return
        if self.method != "trust_region":
            log.info("merge.method is %s: no merge at the end of fit", self.method)
            return
        self.gradient_stats = str(pl_module.statistics_folder)
        delta, extra = self._trust_region(
            pl_module.pool, pl_module.statistics_files, pl_module.loggers
        )
        self._save_delta(delta, pl_module.pool, log_dir, extra)

    def _scaled(self, pretrained, merged_keys, delta_of) -> Variants:
        outputs = [None] * len(self.scaling_factors)
        models = build_models(pretrained, merged_keys, delta_of, self.scaling_factors, outputs)
        names = [f"{self.method}@{factor!r}" for factor in self.scaling_factors]
        return Variants(names, shared=dict(zip(names, models, strict=True)))

    def _tall_variants(self, pool: ModelPool, log_dir: Path) -> Variants:
        lambdas = self.lambdas if self.method == "tall_masks" else [self.tall_lambda]
        output = log_dir / "tall_masks.safetensors" if self.save_artifact else None
        masks = TallMasks.build(
            pool.pretrained, pool.finetuned, lambdas, self.ties, output=output, overwrite=True
        )
        if self.method == "consensus":
            fixed = dict.fromkeys(masks.tasks, self.tall_lambda)
            return self._scaled(
                pool.pretrained, masks.shapes, masks.consensus_delta_fn(self.k, fixed)
            )
        names = [f"tall_masks@{lam!r}" for lam in lambdas]
        models: dict[str, dict[str, torch.Tensor]] = {}

        def retrieved(task: str) -> dict[str, dict[str, torch.Tensor]]:
            # into the previous task's tensors: the evaluator is done with that task's
            # models before it asks for the next task's
            for name, lam in zip(names, lambdas, strict=True):
                models[name] = masks.retrieve(pool.pretrained, task, lam, reuse=models.get(name))
            return dict(models)

        return Variants(names, per_task=retrieved)

    def _save_delta(self, delta, pool: ModelPool, log_dir: Path, extra: dict) -> None:
        if not self.save_artifact:
            return
        meta = {"mergelab": json.dumps(self.settings() | extra | {"model": pool.fingerprint()})}
        path = save_state_dict(delta, log_dir / "merged_task_vector.safetensors", meta, True)
        log.info("merged task vector (θ = θ0 + λ·δ) saved to %s", path)


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
