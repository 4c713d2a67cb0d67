"""mergelab: merge fine-tuned CLIP image encoders and score every result on every task.

    mergelab test --config configs/vit_b32/task_arithmetic.yaml
    mergelab validate --config configs/vit_b32/trust_region.yaml --merge.scaling_factor=0.4
    mergelab fit --config configs/finetune/mnist.yaml
    mergelab fit --config configs/vit_b32/trust_region_gradients.yaml
    mergelab test --config configs/vit_b32/trust_region.yaml --merge.gradient_stats=<folder>
    mergelab test --help          (every option of a subcommand)
    mergelab embedded             (every method on the embedded miniature benchmark)
    mergelab sweep configs/sweeps/task_arithmetic.yaml   (a W&B sweep file, run locally)
    mergelab fit --model.help GradientStatistics   (the options of a fit model)

--merge.*  the merge method and its settings (test and validate)
--model.*  the CLIP model and fine-tuned encoders (test, validate); for fit, a model
           class (class_path) and its init_args: mergelab.finetune.FineTuner fine-tunes one
           task's encoder, mergelab.gradient_stats.GradientStatistics computes TATR's
           gradient statistics and merges with them when fit ends
--data.*   the tasks, batch size, splits, local dataset mirrors

Each run writes to lightning_logs/<method>/version_N (lightning_logs/finetune/... or
lightning_logs/gradient_stats/... for fit): metrics.csv, results.json, results.md,
accuracy.png, the merge artifact or the fine-tuned encoder, and a W&B run (offline unless
you are logged in; WANDB_MODE=disabled turns it off).
"""

from __future__ import annotations

import os
from argparse import RawDescriptionHelpFormatter

import lightning as L
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI

from mergelab.callbacks import MergeCallback, ResultsReport
from mergelab.data import TaskDataModule
from mergelab.evaluation import MergeEvaluator

# The model class of each subcommand; LightningCLI itself has one for all of them. fit
# takes any LightningModule by class_path (FineTuner or GradientStatistics).
MODEL_CLASSES = {"fit": L.LightningModule}
DEFAULT_MODEL_CLASS = MergeEvaluator
# the run folder of fit's model classes: lightning_logs/<name>/version_N
FIT_RUN_NAMES = {"FineTuner": "finetune", "GradientStatistics": "gradient_stats"}


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


class MergelabCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(MergeCallback, "merge")
        parser.add_lightning_class_args(ResultsReport, "report")

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        """Each subcommand's parser with its own model class: test and validate keep a
        plain ``model: {...}`` section (MergeEvaluator), fit names its class
        (``model: {class_path: ..., init_args: {...}}``)."""
        self._model_class = MODEL_CLASSES.get(subcommand, DEFAULT_MODEL_CLASS)
        self.subclass_mode_model = subcommand in MODEL_CLASSES
        try:
            return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        finally:
            self._model_class = DEFAULT_MODEL_CLASS
            self.subclass_mode_model = False

    def before_instantiate_classes(self) -> None:
        """Name the run folder after the method: lightning_logs/<method>/version_N."""
        os.environ.setdefault("WANDB_SILENT", "true")
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "fit":
            model_class = config.model.class_path.rsplit(".", 1)[-1]
            name = FIT_RUN_NAMES.get(model_class, model_class.lower())
        else:
            name = config.merge.method
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and "name" in init_args and init_args.get("name") is None:
                init_args.name = name


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
    """Parse ``args`` (default: the command line) and run the subcommand."""
    return MergelabCLI(
        DEFAULT_MODEL_CLASS,  # per subcommand: see MergelabCLI._prepare_subcommand_parser
        TaskDataModule,
        trainer_defaults=trainer_defaults(),
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": __doc__, "formatter_class": HelpFormatter},
    )


# commands beside LightningCLI's subcommands: name → module with main(argv)
COMMANDS = {"embedded": "mergelab.embedded.benchmark", "sweep": "mergelab.sweep"}


def main() -> None:
    """The ``mergelab`` console script."""
    import importlib
    import logging
    import sys

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[mergelab] %(message)s"))
    logger = logging.getLogger("mergelab")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a library's root handler would print every line twice
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        importlib.import_module(COMMANDS[sys.argv[1]]).main(sys.argv[2:])
    else:
        run()
