"""``mergelab``: the LightningCLI in front of the evaluator, the task data and the merge.

    mergelab test --config configs/vit_b32/task_arithmetic.yaml
    mergelab validate --config ... --merge.scaling_factor=0.4
    mergelab test --help

``--merge.*`` configures :class:`~mergelab.callbacks.MergeCallback`; ``--model.*`` the
model (:class:`~mergelab.evaluation.MergeEvaluator`); ``--data.*`` the tasks
(:class:`~mergelab.data.TaskDataModule`). Each run writes to
``lightning_logs/<method>/version_N``: CSV metrics, results.json, results.md, a plot,
the merge artifact, and a W&B run (offline unless you are logged in;
``WANDB_MODE=disabled`` turns it off).
"""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

from mergelab.callbacks import MergeCallback, ResultsReport
from mergelab.data import TaskDataModule
from mergelab.evaluation import MergeEvaluator


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


class MergelabCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(MergeCallback, "merge")
        parser.add_lightning_class_args(ResultsReport, "report")

    def before_instantiate_classes(self) -> None:
        """Name the run folder after the method: lightning_logs/<method>/version_N."""
        os.environ.setdefault("WANDB_SILENT", "true")
        config = self.config[self.subcommand] if self.subcommand else self.config
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and "name" in init_args and init_args.get("name") is None:
                init_args.name = config.merge.method


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
        MergeEvaluator,
        TaskDataModule,
        trainer_defaults=trainer_defaults(),
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": __doc__},
    )


def main() -> None:
    """The ``mergelab`` console script."""
    run()
