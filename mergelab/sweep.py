"""Run a W&B sweep file's grid or random search locally, without a W&B server.

    python -m mergelab.sweep configs/sweeps/task_arithmetic.yaml
    python -m mergelab.sweep configs/sweeps/trust_region.yaml --count 10 --seed 1
    python -m mergelab.sweep configs/sweeps/consensus.yaml --dry-run   (the commands only)

Each trial runs the command W&B's agent would run for the same parameters (built with
wandb's own create_sweep_command and create_sweep_command_args), plus one
``--trainer.logger`` override that keeps the run's loggers but writes them into the
trial's own folder; the sweep's metric is read from the run's metrics.csv.

Before the first trial every trial's command is parsed by the CLI (an unknown parameter or
a value the CLI refuses stops the sweep), and the metric is checked against the names the
run logs (mergelab.evaluation.flat_metrics: ``val/avg_acc``, ``val/<task>/acc``, ...).

Output, in lightning_logs/sweeps/<file name>/version_N/ (or --output): trial_NNN/ with
the run's folder and its output.log, and results.md / results.csv: one row per trial
(parameters, metric, status), the best marked.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fnmatch
import io
import itertools
import json
import logging
import math
import platform
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

log = logging.getLogger("mergelab.sweep")  # the same name under python -m mergelab.sweep

# the top-level keys of a W&B sweep file (https://docs.wandb.ai/guides/sweeps/sweep-config-keys)
SWEEP_KEYS = {
    "program", "method", "metric", "parameters", "command", "name", "description",
    "early_terminate", "run_cap", "project", "entity", "controller", "settings",
}  # fmt: skip
GOALS = ("maximize", "minimize")
# the subcommands whose runs log evaluation metrics, and the stage they log them under
STAGES = {"validate": "val", "test": "test"}

# W&B's parameter distributions that the local runner supports: the keys each needs, and
# how random search draws from it
DISTRIBUTIONS: dict[str, tuple[tuple[str, ...], Callable[[random.Random, Mapping], Any]]] = {
    "constant": (("value",), lambda rng, spec: spec["value"]),
    "categorical": (
        ("values",),
        lambda rng, spec: rng.choices(spec["values"], spec.get("probabilities"))[0],
    ),
    "int_uniform": (("min", "max"), lambda rng, spec: rng.randint(spec["min"], spec["max"])),
    "uniform": (("min", "max"), lambda rng, spec: rng.uniform(spec["min"], spec["max"])),
    "q_uniform": (
        ("min", "max"),
        lambda rng, spec: (
            round(rng.uniform(spec["min"], spec["max"]) / spec.get("q", 1)) * spec.get("q", 1)
        ),
    ),
    "log_uniform_values": (
        ("min", "max"),
        lambda rng, spec: math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"]))),
    ),
    "normal": ((), lambda rng, spec: rng.gauss(spec.get("mu", 0.0), spec.get("sigma", 1.0))),
}


class SweepError(ValueError):
    """A sweep that cannot run as written, found before its first trial."""


@dataclass(frozen=True)
class SweepFile:
    """The parts of a W&B sweep file that decide which commands run and how they compare."""

    path: Path
    name: str
    method: str
    metric: str
    goal: str
    parameters: dict[str, dict]
    command: list
    program: str | None
    run_cap: int | None

    def error(self, message: str) -> SweepError:
        return SweepError(f"{self.path}: {message}")


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


# --- the sweep file ---------------------------------------------------------------------


def load_sweep(path: str | Path) -> SweepFile:
    """Read and check a sweep file; every problem names the file and the key."""
    path = Path(path)

    def fail(message: str) -> SweepError:
        return SweepError(f"{path}: {message}")

    try:
        config = yaml.safe_load(path.read_text())
    except OSError as err:
        raise fail(f"cannot read the sweep file ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise fail(f"not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise fail("a sweep file is a mapping with method, metric, parameters and command")
    unknown = sorted(set(config) - SWEEP_KEYS)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r}; a W&B sweep file has {sorted(SWEEP_KEYS)}")
    method = config.get("method")
    if method not in ("grid", "random"):
        raise fail(f"method {method!r}: runs locally with grid or random (bayes needs W&B)")
    metric = config.get("metric")
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        raise fail("metric.name is missing: the logged metric that ranks trials (val/avg_acc)")
    if metric["name"].startswith("test/"):
        raise fail(
            f"metric.name {metric['name']!r} ranks trials on test data; rank them on "
            "validation (val/avg_acc of mergelab validate) and score the pick on test once"
        )
    goal = metric.get("goal", "minimize")  # W&B's default
    if goal not in GOALS:
        raise fail(f"metric.goal {goal!r}: maximize or minimize")
    parameters = config.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise fail("parameters is missing or empty")
    for name, spec in parameters.items():
        check_parameter(path, name, spec)
    command = config.get("command")
    if not isinstance(command, list) or not command:
        raise fail("command is missing: e.g. [mergelab, validate, --config, FILE, ${args}]")
    if "${program}" in command and not config.get("program"):
        raise fail("command uses ${program} but the file has no program")
    if "${args_json_file}" in command:
        raise fail("command: ${args_json_file} is written by W&B's agent only; use ${args}")
    run_cap = config.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or run_cap <= 0):
        raise fail(f"run_cap {run_cap!r}: a positive integer")
    return SweepFile(
        path=path,
        name=str(config.get("name") or path.stem),
        method=method,
        metric=metric["name"],
        goal=goal,
        parameters=parameters,
        command=command,
        program=config.get("program"),
        run_cap=run_cap,
    )


def distribution(spec: Mapping) -> str | None:
    """A parameter's distribution, inferred from its keys as W&B does."""
    if "distribution" in spec:
        return spec["distribution"]
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    if "min" in spec and "max" in spec:
        both_int = all(isinstance(spec[k], int) for k in ("min", "max"))
        return "int_uniform" if both_int else "uniform"
    return None


def check_parameter(path: Path, name: str, spec: Any) -> None:
    where = f"{path}: parameters.{name}"
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: a mapping such as {{values: [...]}}, got {spec!r}")
    if "parameters" in spec:
        raise SweepError(f"{where}: nested parameters; name each one with dots (merge.k)")
    kind = distribution(spec)
    if kind not in DISTRIBUTIONS:
        known = ", ".join(DISTRIBUTIONS)
        raise SweepError(f"{where}: distribution {kind!r}; the local runner draws from {known}")
    missing = [key for key in DISTRIBUTIONS[kind][0] if key not in spec]
    if missing:
        raise SweepError(f"{where}: a {kind} parameter needs {missing[0]!r}")
    if kind in ("constant", "categorical"):
        values = [spec["value"]] if kind == "constant" else spec["values"]
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: values must be a non-empty list, got {values!r}")
        if any(value is None for value in values):
            # the agent writes None as the string "None", which no option accepts
            raise SweepError(
                f"{where}: W&B passes null as None, which the CLI refuses; write it as the "
                f"string 'null' (--{name}=null)"
            )
        probabilities = spec.get("probabilities")
        if probabilities is not None and (
            len(probabilities) != len(values) or not math.isclose(sum(probabilities), 1)
        ):
            raise SweepError(f"{where}: probabilities must be one per value and sum to 1")
    if "min" in DISTRIBUTIONS[kind][0]:
        low, high = spec["min"], spec["max"]
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high))
        if not numbers or not low < high:
            raise SweepError(f"{where}: min < max, both numbers; got min={low!r}, max={high!r}")
        if kind == "int_uniform" and not all(isinstance(v, int) for v in (low, high)):
            raise SweepError(f"{where}: int_uniform needs integer min and max")
        if kind == "log_uniform_values" and low <= 0:
            raise SweepError(f"{where}: log_uniform_values needs min > 0, got {low!r}")


def grid_values(sweep: SweepFile, name: str) -> list:
    spec = sweep.parameters[name]
    kind = distribution(spec)
    if kind == "constant":
        return [spec["value"]]
    if kind == "categorical":
        return list(spec["values"])
    if kind == "int_uniform":
        return list(range(spec["min"], spec["max"] + 1))
    raise sweep.error(f"parameters.{name}: grid search needs values, not a {kind} distribution")


def settings(sweep: SweepFile, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The parameters of each trial: the grid in order, or ``count`` random draws."""
    caps = [c for c in (count, sweep.run_cap) if c is not None]
    cap = min(caps) if caps else None
    names = list(sweep.parameters)
    if sweep.method == "grid":
        grid = itertools.product(*(grid_values(sweep, name) for name in names))
        return [dict(zip(names, values, strict=True)) for values in itertools.islice(grid, cap)]
    if cap is None:
        raise sweep.error("random search runs until stopped: give --count N (or run_cap)")
    rng, params = random.Random(seed), sweep.parameters
    return [
        {name: DISTRIBUTIONS[distribution(spec)][1](rng, spec) for name, spec in params.items()}
        for _ in range(cap)
    ]


# --- commands -----------------------------------------------------------------------------


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
    from mergelab.cli import run

    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    # LightningCLI warns when given args while sys.argv has others (the sweep's own)
    with (
        mock.patch.object(sys, "argv", ["mergelab"]),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        try:
            run([*args, "--print_config"])
        except SystemExit as exit_:
            code = exit_.code
    if code not in (0, None):
        lines = stderr.getvalue().strip().splitlines()
        first = next((i for i, line in enumerate(lines) if line.startswith("error:")), 0)
        message = " ".join(line.strip() for line in lines[first:])
        raise sweep.error(f"the CLI refuses `mergelab {shlex.join(args)}`: {message}")
    return yaml.safe_load(stdout.getvalue())


def logged_metrics(stage: str, config: Mapping) -> list[str]:
    """The metric names a run of ``config`` logs; ``<method>*`` stands for its variants'
    names (task_arithmetic@0.3), which all start with the method's."""
    from mergelab.data import TaskDataModule
    from mergelab.evaluation import flat_metrics, summarize

    plan = TaskDataModule(**config["data"]).plan(stage)
    tasks = list(dict.fromkeys(task for task, _ in plan))
    splits = dict.fromkeys(split for _, split in plan)
    variant = f"{config['merge']['method']}*"
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


# --- running ------------------------------------------------------------------------------


def read_metric(folder: Path, metric: str) -> tuple[float | None, Path | None]:
    """The last value of ``metric`` in the metrics.csv under ``folder``, and the run folder."""
    files = sorted(folder.glob("*/version_*/metrics.csv"))
    if not files:
        return None, None
    value = None
    with open(files[-1], newline="") as f:
        for row in csv.DictReader(f):
            if row.get(metric):
                value = float(row[metric])
    return value, files[-1].parent


def run_trial(trial: Trial, metric: str) -> None:
    trial.folder.mkdir(parents=True, exist_ok=True)
    with open(trial.folder / "output.log", "w") as output:
        result = subprocess.run(
            [*trial.command, trial.logger_override], stdout=output, stderr=subprocess.STDOUT
        )
    trial.metric, trial.run_dir = read_metric(trial.folder, metric)
    if result.returncode != 0:
        trial.status = f"failed (exit {result.returncode}, see {trial.folder / 'output.log'})"
    elif trial.metric is None:
        trial.status = f"{metric} not in metrics.csv"
    else:
        trial.status = "ok"


def best_trial(trials: list[Trial], goal: str) -> Trial | None:
    scored = [t for t in trials if t.status == "ok"]
    sign = 1 if goal == "maximize" else -1
    return max(scored, key=lambda t: sign * t.metric, default=None)


def write_table(sweep: SweepFile, trials: list[Trial], output: Path) -> str:
    """results.csv (the metric in full) and results.md (to 4 decimals, the best row in
    bold) in ``output``, one row per trial; returns the markdown table."""
    best = best_trial(trials, sweep.goal)
    header = ["trial", *sweep.parameters, sweep.metric, "status", "run"]

    def row(trial: Trial, metric_format: str) -> list[str]:
        return [
            str(trial.number),
            *(str(trial.setting[name]) for name in sweep.parameters),
            "" if trial.metric is None else format(trial.metric, metric_format),
            "best" if trial is best else trial.status,
            str(trial.run_dir or trial.folder),
        ]

    with open(output / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *(row(t, "") for t in trials)])
    lines = [
        f"sweep {sweep.name} ({sweep.path}): {sweep.method} search, {sweep.goal} {sweep.metric}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for trial in trials:
        cells = row(trial, ".4f")
        lines.append("| " + " | ".join(f"**{c}**" if trial is best else c for c in cells) + " |")
    table = "\n".join(lines) + "\n"
    (output / "results.md").write_text(table)
    return table


def default_output(sweep: SweepFile) -> Path:
    """lightning_logs/sweeps/<file name>/version_N, N one past the highest there."""
    root = Path("lightning_logs") / "sweeps" / sweep.path.stem
    versions = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
    return root / f"version_{max(versions, default=-1) + 1}"


def run_sweep(sweep: SweepFile, trials: list[Trial]) -> None:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    # the bar and the log lines share the terminal: the handlers of the root logger and of
    # the package's (mergelab's console script gives it its own) write through tqdm
    handled = [lg for lg in (logging.root, logging.getLogger("mergelab")) if lg.handlers]
    with logging_redirect_tqdm(handled):
        for trial in tqdm(trials, desc=f"sweep {sweep.name}", unit="trial"):
            log.info("trial %d/%d: %s", trial.number, len(trials), trial.describe())
            start = time.monotonic()
            run_trial(trial, sweep.metric)
            value = "-" if trial.metric is None else f"{trial.metric:.4f}"
            seconds = time.monotonic() - start
            log.info(
                "trial %d: %s = %s, %s (%.0f s)",
                trial.number,
                sweep.metric,
                value,
                trial.status,
                seconds,
            )


def main(argv: list[str] | None = None) -> None:
    """``mergelab sweep FILE`` (or ``python -m mergelab.sweep FILE``); exits with status 1
    if a trial failed, 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="mergelab sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", type=Path, help="a W&B sweep file (configs/sweeps/*.yaml)")
    parser.add_argument(
        "--count", type=int, help="at most N trials; random search needs it (or run_cap)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random search seed (default 0)")
    parser.add_argument(
        "--output", type=Path, help="default: lightning_logs/sweeps/<file name>/version_N"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check the file, print each trial's command"
    )
    args = parser.parse_args(argv)
    log.setLevel(logging.INFO)
    if not log.hasHandlers():  # python -m; the console script `mergelab` sets up its own
        logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.count is not None and args.count <= 0:
        parser.error(f"--count must be positive, got {args.count}")
    try:
        sweep = load_sweep(args.file)
        output = args.output or default_output(sweep)
        trial_settings = settings(sweep, args.count, args.seed)
        log.info("checking the commands of %d trials with the CLI", len(trial_settings))
        trials = prepare(sweep, trial_settings, output)
    except SweepError as err:
        parser.exit(2, f"mergelab sweep: error: {err}\n")
    if args.dry_run:
        for trial in trials:
            print(shlex.join(trial.command))
        return
    output.mkdir(parents=True, exist_ok=True)
    log.info("%d trials of %s, each in %s/trial_NNN", len(trials), sweep.path, output)
    run_sweep(sweep, trials)
    print(write_table(sweep, trials, output))
    print(f"table written to {output / 'results.md'} and {output / 'results.csv'}")
    best = best_trial(trials, sweep.goal)
    if best is not None and "validate" in best.command:
        # settings are chosen on validation; test data scores the choice, once
        test = [("test" if c == "validate" else c) for c in best.command]
        print(f"best: trial {best.number} ({best.describe()}); score it on test once with:")
        print(f"  {shlex.join(test)}")
    if any(t.status != "ok" for t in trials):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
