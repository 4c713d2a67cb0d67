"""Each trial's command, exactly as W&B's agent would run it, checked with the CLI before
the first trial runs: the options parse, the metric is one the runs log."""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import platform
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergelab.errors import bad_input_in, message_of
from mergelab.sweep.sweep_file import SweepFile

# the subcommands whose runs log evaluation metrics, and the stage they log them under
STAGES = {"validate": "val", "test": "test"}


@dataclass
class Trial:
    number: int
    setting: dict[str, Any]
    command: list[str]  # exactly what W&B's agent runs for ``setting``
    folder: Path
    logger_override: str  # appended to ``command``: the run's loggers, writing into ``folder``
    metric: float | None = None
    status: str = "not run"
    run_dir: Path | None = None

    def describe(self) -> str:
        return " ".join(f"{name}={value}" for name, value in self.setting.items())


def agent_command(sweep: SweepFile, setting: Mapping[str, Any]) -> list[str]:
    """The command line W&B's agent runs for one trial.

    wandb's own builders fill the macros; they are put together as in
    ``wandb.wandb_agent.Agent._command_run``, which has no function of its own for it.
    """
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    template = create_sweep_command(list(sweep.command))  # fills ${envvar:NAME}
    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in setting.items()}})
    macros |= {
        "interpreter": ["python"],
        "program": [sweep.program],
        "env": [] if platform.system() == "Windows" else ["/usr/bin/env"],
    }
    command: list[str] = []
    for token in map(str, template):
        if token.startswith("${") and token.endswith("}"):
            command += macros.get(token[2:-1]) or []
        else:
            command.append(token)
    return command


def mergelab_args(sweep: SweepFile, command: list[str]) -> list[str]:
    """The arguments of the ``mergelab`` call that ``command`` makes."""
    program = command[1:] if command[:1] == ["/usr/bin/env"] else command
    if not program or Path(program[0]).name != "mergelab":
        raise sweep.error(
            f"command: runs locally when it calls mergelab, not {shlex.join(command)}"
        )
    return program[1:]


def parsed_config(sweep: SweepFile, args: list[str]) -> dict:
    """The whole config the CLI builds from ``args`` (its --print_config), or a SweepError
    with the CLI's own message (an unknown option, a value of the wrong type)."""
    from jsonargparse import ArgumentError

    from mergelab.cli import run

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        try:
            run([*args, "--print_config"])
        except ArgumentError as error:
            message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
            raise sweep.error(f"the CLI refuses `mergelab {shlex.join(args)}`: {message}") from None
        except SystemExit as exit_:  # --print_config exits once it has printed
            if exit_.code not in (0, None):
                raise
    return yaml.safe_load(stdout.getvalue())


def logged_metrics(stage: str, config: Mapping) -> list[str]:
    """The metric names a run of ``config`` logs; ``<method>*`` stands for its variants'
    names (task_arithmetic@0.3), which all start with the method's."""
    from mergelab.cli import class_of
    from mergelab.embedded import expand
    from mergelab.lightning.data import TaskDataModule
    from mergelab.lightning.results import flat_metrics, summarize

    plan = TaskDataModule(**expand(dict(config["data"]))).plan(stage)
    tasks = list(dict.fromkeys(task for task, _ in plan))
    splits = dict.fromkeys(split for _, split in plan)
    variant = f"{class_of(config['merge']['method']['class_path']).name}*"
    accuracy = {variant: {split: dict.fromkeys(tasks, 0.0) for split in splits}}
    reference = dict.fromkeys(tasks, 1.0) if config["model"].get("finetuned_accuracy") else None
    return list(flat_metrics(summarize(accuracy, tasks, stage, False, reference), stage))


def logger_override(sweep: SweepFile, config: Mapping, folder: Path) -> str:
    """``--trainer.logger`` with the run's own loggers, each writing under ``folder``."""
    loggers = config["trainer"]["logger"]
    loggers = loggers if isinstance(loggers, list) else [loggers]
    if not any(isinstance(lg, dict) and lg["class_path"].endswith("CSVLogger") for lg in loggers):
        raise sweep.error("the runs log no metrics.csv: trainer.logger needs a CSVLogger")
    for logger in loggers:
        if "save_dir" in logger.get("init_args", {}):
            logger["init_args"]["save_dir"] = str(folder)
    return "--trainer.logger=" + json.dumps(loggers)


def check_settings(
    sweep: SweepFile, subcommand: str, config: dict, number: int, setting: Mapping[str, Any]
) -> None:
    """What the run itself checks before loading a model (the merge settings' values, the
    folders they name), for one trial: a SweepError that names the trial."""
    from mergelab.cli import check_evaluation

    try:
        check_evaluation(subcommand, config)
    except Exception as err:
        bad = bad_input_in(err)
        if bad is None:
            raise
        described = " ".join(f"{name}={value}" for name, value in setting.items())
        raise sweep.error(f"trial {number} ({described}): {message_of(bad)}") from err


def prepare(sweep: SweepFile, trial_settings: list[dict], output: Path) -> list[Trial]:
    """Every trial's command, each parsed by the CLI and its metric checked: all bad input
    is found here, before anything runs."""
    trials = []
    for number, setting in enumerate(trial_settings, start=1):
        command = agent_command(sweep, setting)
        args = mergelab_args(sweep, command)
        subcommand = next((a for a in args if not a.startswith("-")), None)
        if subcommand not in STAGES:
            raise sweep.error(
                f"command runs `mergelab {subcommand}`; trials are scored by "
                f"`mergelab validate` (or test, which never picks on test data)"
            )
        config = parsed_config(sweep, args)
        check_settings(sweep, subcommand, config, number, setting)
        names = logged_metrics(STAGES[subcommand], config)
        if not any(fnmatch.fnmatchcase(sweep.metric, name) for name in names):
            raise sweep.error(
                f"metric {sweep.metric!r} is never logged by `mergelab {subcommand}` with "
                f"these settings; it logs {', '.join(names)} (<method>* stands for each "
                f"setting's name, such as task_arithmetic@0.3)"
            )
        folder = output / f"trial_{number:03d}"
        override = logger_override(sweep, config, folder)
        trials.append(Trial(number, setting, command, folder, override))
    return trials
