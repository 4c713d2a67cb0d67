"""LightningCLI for mergelab: ``mergelab fit``, ``validate`` and ``test`` (the text of
``mergelab --help`` is :data:`mergelab.usage.USAGE`)."""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from argparse import Namespace, RawDescriptionHelpFormatter

import lightning as L
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry

from mergelab.embedded import expand
from mergelab.errors import BadValue
from mergelab.io.cache import check_folder_path
from mergelab.lightning.callbacks import MergeCallback, ResultsReport
from mergelab.lightning.data import TaskDataModule
from mergelab.lightning.evaluation import MergeEvaluator
from mergelab.lightning.failures import RunFolderMarks, mark_complete
from mergelab.lightning.loggers import check_wandb_mode
from mergelab.methods.base import snake_case
from mergelab.quiet import quiet_console
from mergelab.usage import COMMANDS, USAGE

VERBOSE = "--verbose"  # a quiet console unless given


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

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self.command_line = list(sys.argv[1:] if args is None else args)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Lightning's, with :class:`RunFolderMarks`: the run folder marked as running,
        then removed (bad input, nothing produced) or marked when the run fails."""
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(RunFolderMarks())
        return trainer

    # the folder is complete once the loggers have written their last file, after the
    # Trainer's own teardown: LightningCLI's hooks after each subcommand
    def after_fit(self) -> None:
        mark_complete(self.trainer)

    def after_validate(self) -> None:
        mark_complete(self.trainer)

    def after_test(self) -> None:
        mark_complete(self.trainer)

    def run_name(self, config) -> str:
        raise NotImplementedError

    def check(self, config) -> None:
        """Bad input found before any model is loaded."""
        check_wandb_mode()

    def before_instantiate_classes(self) -> None:
        """Check the settings, replace every ``embedded:`` reference with its path
        (building the benchmark on first use) and name the run: its folder
        lightning_logs/<name>/version_N, its W&B run <name> and the settings given on
        the command line."""
        os.environ.setdefault("WANDB_SILENT", "true")
        config = self.config[self.subcommand]
        self.check(config)
        expand(config)
        name = self.run_name(config)
        given = changed_settings(self.command_line, config.merge.method)
        loggers = config.trainer.logger
        if config.trainer.default_root_dir is not None:
            check_folder_path(config.trainer.default_root_dir, "trainer.default_root_dir")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and init_args.get("save_dir"):
                check_folder_path(init_args.save_dir, "the run folder of trainer.logger")
            if init_args is None or "name" not in init_args or init_args.get("name") is not None:
                continue
            wandb = class_of(logger.class_path).__name__ == "WandbLogger"
            init_args.name = " ".join([name, *given]) if wandb else name


class LoggedConfig(SaveConfigCallback):
    """Lightning's config.yaml in the run folder, and the merge settings and the data
    handed to the run's loggers as hyper-parameters (W&B's run config); Lightning adds the
    model's own (the CLIP model and the fine-tuned models' sources)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.config.as_dict()
        sections = {key: config[key] for key in ("merge", "data") if key in config}
        for logger in trainer.loggers:
            logger.log_hyperparams(sections)


def changed_settings(command_line: list[str], method) -> list[str]:
    """``<setting>=<value>`` for each setting of the merge method that the command line
    sets over the config (a sweep trial's parameters, say), with its parsed value."""
    prefix = "--merge.method."
    keys = []
    for word in command_line:
        if word.startswith(prefix):
            key = word[len(prefix) :].split("=", 1)[0].removeprefix("init_args.")
            if key != "help" and key not in keys:
                keys.append(key)
    values = getattr(method, "init_args", None) or {}
    return [f"{key}={values[key]}" for key in keys if key in values]


class EvaluateCLI(MergelabCLI):
    """``mergelab validate`` and ``mergelab test``: the model is a MergeEvaluator."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("validate", "test")}

    def run_name(self, config) -> str:
        return class_of(config.merge.method.class_path).name

    def check(self, config) -> None:
        """Also the merge settings and the strategy, before the models are loaded."""
        super().check(config)
        check_evaluation(self.subcommand, config)


def check_evaluation(subcommand: str, config) -> None:
    """The bad input of a ``validate`` or ``test`` config (a Namespace, or the dict that
    --print_config writes) that needs no model: the strategy, and the merge settings (the
    method is constructed, checking each, and the callback checks them with the splits)."""
    check_strategy(config["trainer"]["strategy"])
    callback = MergeCallback(
        constructed(config["merge"]["method"]),
        report_without_pick=config["merge"]["report_without_pick"],
    )
    callback.check(subcommand, config["data"]["test_splits"])


def constructed(spec):
    """The object a parsed ``{class_path, init_args}`` describes, with nested ones (a TALL
    masks method's ``multitask``) constructed too; any other value as it is."""
    if isinstance(spec, Namespace):
        spec = vars(spec)
    if not (isinstance(spec, dict) and "class_path" in spec):
        return spec
    settings = spec.get("init_args") or {}
    settings = vars(settings) if isinstance(settings, Namespace) else dict(settings)
    return class_of(spec["class_path"])(**{k: constructed(v) for k, v in settings.items()})


class FitCLI(MergelabCLI):
    """``mergelab fit``: any LightningModule by class path (FineTuner, GradientStatistics)."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        # validate and test have Lightning's own (Trainer.test's verbose); see verbosity
        parser.add_argument(
            VERBOSE,
            type=bool,
            default=False,
            help="show Lightning's banners, mergelab's per-run notes and the known harmless "
            "warnings (default: a quiet console: the progress bar, the results, warnings)",
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": LightningCLI.subcommands()["fit"]}

    def run_name(self, config) -> str:
        model = class_of(config.model.class_path)
        return getattr(model, "run_name", snake_case(model.__name__))

    def check(self, config) -> None:
        super().check(config)
        if issubclass(class_of(config.model.class_path), MergeEvaluator):
            check_strategy(config.trainer.strategy)  # statistics over samples: exact sums


# strategies under which every rank holds whole models and scores a disjoint share of the
# samples (DDP, in all its launchers, or one device): the sums over ranks are exact
EXACT_STRATEGIES = (DDPStrategy, SingleDeviceStrategy)


def check_strategy(strategy) -> None:
    """Refuse a strategy under which the scores could not be exact (sharded models)."""
    if isinstance(strategy, str):
        if strategy == "auto" or (
            strategy in StrategyRegistry
            and issubclass(StrategyRegistry[strategy]["strategy"], EXACT_STRATEGIES)
        ):
            return
        found = strategy
    else:
        # a strategy object, or its class_path in a parsed config (a Namespace or a dict)
        path = strategy.get("class_path") if isinstance(strategy, dict | Namespace) else None
        cls = class_of(path) if path else type(strategy)
        if issubclass(cls, EXACT_STRATEGIES):
            return
        found = cls.__name__
    raise BadValue(
        f"trainer.strategy {found!r}: mergelab scores merged models exactly under auto, ddp "
        "(ddp_spawn, ddp_fork) or one device, where each rank holds whole models and a "
        "disjoint share of the samples"
    )


CLIS = {"fit": FitCLI, "validate": EvaluateCLI, "test": EvaluateCLI}


def trainer_defaults() -> dict:
    return {
        "logger": [
            {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "lightning_logs", "name": None},
            },
            {
                "class_path": "mergelab.lightning.loggers.WandbLogger",
                "init_args": {"save_dir": "lightning_logs", "name": None},
            },
        ],
        "enable_checkpointing": False,
    }


def verbosity(words: list[str]) -> tuple[bool, list[str]]:
    """Whether the command line asks for a verbose console (``--verbose``, or
    ``--verbose=true``), and the words for the parser. The option is Lightning's own for
    validate and test (Trainer.test's ``verbose``: its box of metrics, which mergelab's
    table repeats) and mergelab's for fit; a bare ``--verbose`` is spelled as jsonargparse
    takes a flag, and without one the option is false."""
    given = [i for i, word in enumerate(words) if word.split("=")[0] == VERBOSE]
    if not given:  # right after the subcommand: an option's help parses all that follows it
        at = next(i for i, word in enumerate(words) if not word.startswith("-")) + 1
        return False, [*words[:at], f"{VERBOSE}=false", *words[at:]]
    words, last = list(words), given[-1]
    if words[last] == VERBOSE:
        following = words[last + 1] if last + 1 < len(words) else ""
        if following.lower() in ("true", "false"):
            return following.lower() == "true", words
        words[last] = f"{VERBOSE}=true"
    return words[last].split("=", 1)[1].lower() == "true", words


def run(args: list[str] | None = None) -> MergelabCLI:
    """Parse ``args`` (default: the command line) and run its subcommand: fit, validate or
    test; the finished CLI."""
    words = sys.argv[1:] if args is None else list(args)
    subcommand = next((word for word in words if not word.startswith("-")), None)
    if subcommand not in CLIS:
        print(f"usage: mergelab {{{','.join(COMMANDS)}}} [options]\n")
        print(USAGE)
        if words and words[0] not in ("-h", "--help"):
            print(f"mergelab: error: unknown command {words[0]!r}", file=sys.stderr)
            raise SystemExit(2)
        raise SystemExit(0)
    cli_class = CLIS[subcommand]
    fit = cli_class is FitCLI
    verbose, words = verbosity(words)
    # the console is quiet from the start: Lightning's banners come when the Trainer is made
    with warnings.catch_warnings(), quiet_console(verbose):
        # LightningCLI warns when given args while sys.argv has others: a caller in Python
        # (mergelab embedded, mergelab sweep) passes its own on purpose
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        return cli_class(
            L.LightningModule if fit else MergeEvaluator,
            TaskDataModule,
            subclass_mode_model=fit,
            trainer_defaults=trainer_defaults(),
            args=words,
            save_config_callback=LoggedConfig,
            save_config_kwargs={"overwrite": True},
            # a bad option raises (the console prints it in one line) instead of printing
            # the whole usage and exiting
            parser_kwargs={
                "description": USAGE,
                "formatter_class": HelpFormatter,
                "exit_on_error": False,
            },
        )
