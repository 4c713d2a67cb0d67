"""A W&B sweep file: read, checked key by key (naming the file and the key), and its
trials' settings drawn as W&B draws them (grid in order, or random)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergelab.errors import BadValue

# the top-level keys of a W&B sweep file (https://docs.wandb.ai/guides/sweeps/sweep-config-keys)
SWEEP_KEYS = {
    "program", "method", "metric", "parameters", "command", "name", "description",
    "early_terminate", "run_cap", "project", "entity", "controller", "settings",
}  # fmt: skip
GOALS = ("maximize", "minimize")

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


class SweepError(BadValue):
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
        raise SweepError(f"{where}: nested parameters; name each one with dots (merge.method.k)")
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
