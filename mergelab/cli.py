"""mergelab: merge fine-tuned CLIP image encoders and score every result on every task.

    mergelab test --config configs/vit_b32/task_arithmetic.yaml
    mergelab validate --config configs/vit_b32/trust_region.yaml --merge.method.scaling_factor=0.4
    mergelab test --config configs/vit_b32/task_arithmetic.yaml --merge.method=TrustRegion
    mergelab fit --config configs/finetune/mnist.yaml
    mergelab fit --config configs/vit_b32/trust_region_gradients.yaml
    mergelab test --config configs/vit_b32/trust_region.yaml \\
        --merge.method.gradient_stats=<folder>
    mergelab test --help          (every option of a subcommand)
    mergelab test --merge.method.help TallMasks   (the settings of one merge method)
    mergelab fit --model.help GradientStatistics  (the options of a fit model)
    mergelab embedded             (every method on the embedded miniature benchmark)
    mergelab sweep configs/sweeps/task_arithmetic.yaml   (a W&B sweep file, run locally)

--merge.method  the merge method, by class (test, validate; TrustRegion for fit's
                GradientStatistics): ZeroShot, Finetuned, TaskArithmetic, TrustRegion,
                TallMasks, Consensus from mergelab.methods, or your own MergeMethod
                subclass by class path; its settings as --merge.method.<setting>
--model.*  the CLIP model and fine-tuned encoders (test, validate); for fit, a model
           class (class_path) and its init_args: mergelab.lightning.finetune.FineTuner
           fine-tunes one task's encoder, mergelab.lightning.gradient_stats.
           GradientStatistics computes TATR's gradient statistics and merges when fit ends
--data.*   the tasks, batch size, splits, local dataset mirrors

Each run writes to lightning_logs/<method>/version_N (lightning_logs/finetune/... or
lightning_logs/gradient_stats/... for fit): metrics.csv, results.json, results.md,
accuracy.png, the merge artifact or the fine-tuned encoder, and a W&B run (offline unless
you are logged in; WANDB_MODE=disabled turns it off).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from argparse import RawDescriptionHelpFormatter

import lightning as L
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI

from mergelab.embedded import expand
from mergelab.lightning.callbacks import MergeCallback, ResultsReport
from mergelab.lightning.data import TaskDataModule
from mergelab.lightning.evaluation import MergeEvaluator
from mergelab.methods.base import snake_case


def wandb_logged_in() -> bool:
    """True if W&B has credentials (env or netrc), without contacting the server."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


class HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the description's own line breaks kept."""


def class_of(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class MergelabCLI(LightningCLI):
    """The options every subcommand shares (the merge method, the report), the run folder
    named after what runs, and ``embedded:`` references expanded before instantiation."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(MergeCallback, "merge")
        parser.add_lightning_class_args(ResultsReport, "report")
        parser.set_defaults({"merge.method": {"class_path": "mergelab.methods.TaskArithmetic"}})

    def run_name(self, config) -> str:
        raise NotImplementedError

    def before_instantiate_classes(self) -> None:
        """Name the run folder (lightning_logs/<name>/version_N) and replace every
        ``embedded:`` reference with its path (building the benchmark on first use)."""
        os.environ.setdefault("WANDB_SILENT", "true")
        config = self.config[self.subcommand]
        expand(config)
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and "name" in init_args and init_args.get("name") is None:
                init_args.name = self.run_name(config)


class EvaluateCLI(MergelabCLI):
    """``mergelab validate`` and ``mergelab test``: the model is a MergeEvaluator."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("validate", "test")}

    def run_name(self, config) -> str:
        return class_of(config.merge.method.class_path).name


class FitCLI(MergelabCLI):
    """``mergelab fit``: any LightningModule by class path (FineTuner, GradientStatistics)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": LightningCLI.subcommands()["fit"]}

    def run_name(self, config) -> str:
        model = class_of(config.model.class_path)
        return getattr(model, "run_name", snake_case(model.__name__))


CLIS = {"fit": FitCLI, "validate": EvaluateCLI, "test": EvaluateCLI}


def trainer_defaults() -> dict:
    return {
        "logger": [
            {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "lightning_logs", "name": None},
            },
            {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {
                    "project": "mergelab",
                    "save_dir": "lightning_logs",
                    "offline": not wandb_logged_in(),
                },
            },
        ],
        "enable_checkpointing": False,
    }


def run(args: list[str] | None = None) -> MergelabCLI:
    """Parse ``args`` (default: the command line) and run its subcommand: fit, validate or
    test; the finished CLI."""
    words = sys.argv[1:] if args is None else list(args)
    subcommand = next((word for word in words if not word.startswith("-")), None)
    if subcommand not in CLIS:
        print("usage: mergelab {fit,validate,test,embedded,sweep} [options]\n")
        print(__doc__)
        if words and words[0] not in ("-h", "--help"):
            print(f"mergelab: error: unknown command {words[0]!r}", file=sys.stderr)
            raise SystemExit(2)
        raise SystemExit(0)
    cli_class = CLIS[subcommand]
    fit = cli_class is FitCLI
    with warnings.catch_warnings():
        # LightningCLI warns when given args while sys.argv has others: a caller in Python
        # (mergelab embedded, mergelab sweep) passes its own on purpose
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        return cli_class(
            L.LightningModule if fit else MergeEvaluator,
            TaskDataModule,
            subclass_mode_model=fit,
            trainer_defaults=trainer_defaults(),
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": __doc__, "formatter_class": HelpFormatter},
        )
