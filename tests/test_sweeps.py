"""Hyper-parameter search: picking on validation within one run (evaluation.summarize), the
W&B sweep files in configs/sweeps expanded into the exact commands W&B's agent runs, and the
local sweep runner (mergelab/sweep/) end to end and on bad input."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from mergelab.lightning.results import flat_metrics, summarize
from mergelab.sweep.runner import main, run_sweep, write_table
from mergelab.sweep.sweep_file import SweepError, load_sweep, settings
from mergelab.sweep.trials import Trial, agent_command, parsed_config, prepare

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILES = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
# a config that parses without network or downloads (--print_config loads nothing)
OFFLINE_CONFIG = "configs/vit_b32/base.yaml"
OFFLINE_METHOD = "configs/methods/task_arithmetic.yaml"


@pytest.fixture
def embedded(embedded_cache, monkeypatch) -> None:
    """The sweeps' setting: run from the repository, on the embedded test preset
    (conftest's embedded_cache), in this process and the trials it starts."""
    monkeypatch.setenv("MERGELAB_CACHE", str(embedded_cache))
    monkeypatch.setenv("MERGELAB_EMBEDDED_PRESET", "test")
    monkeypatch.chdir(ROOT)


# --- one run, several settings: picked on validation, reported on test ------------------

# validation prefers 0.3, test would prefer 0.6: the headline must follow validation
ACCURACY = {
    "task_arithmetic@0.3": {"val": {"a": 0.9, "b": 0.5}, "test": {"a": 0.6, "b": 0.5}},
    "task_arithmetic@0.6": {"val": {"a": 0.4, "b": 0.6}, "test": {"a": 0.9, "b": 0.9}},
}


def test_shared_setting_is_the_best_average_on_validation_scored_on_test():
    results = summarize(ACCURACY, ["a", "b"], "test", choose_per_task=False, reference=None)
    assert results["picked_on"] == "val"
    assert results["picked"] == {"a": "task_arithmetic@0.3", "b": "task_arithmetic@0.3"}
    assert results["headline"]["accuracy"] == {"a": 0.6, "b": 0.5}
    metrics = flat_metrics(results, "test")
    assert metrics["test/avg_acc"] == pytest.approx(0.55)
    assert metrics["val/task_arithmetic@0.3/avg_acc"] == pytest.approx(0.7)


def test_per_task_setting_is_each_tasks_best_on_validation_scored_on_test():
    results = summarize(ACCURACY, ["a", "b"], "test", choose_per_task=True, reference=None)
    assert results["picked"] == {"a": "task_arithmetic@0.3", "b": "task_arithmetic@0.6"}
    assert results["headline"]["accuracy"] == {"a": 0.6, "b": 0.9}


def test_without_validation_scores_nothing_is_picked():
    test_only = {name: {"test": by_split["test"]} for name, by_split in ACCURACY.items()}
    results = summarize(test_only, ["a", "b"], "test", choose_per_task=False, reference=None)
    assert results["picked_on"] is None
    assert results["picked"] == {"a": "task_arithmetic@0.3", "b": "task_arithmetic@0.3"}


# --- the shipped sweep files --------------------------------------------------------------


def dotted(config: dict, name: str):
    """A dotted option's value in a printed config (a class's settings under init_args)."""
    for part in name.split("."):
        config = config[part] if part in config else config["init_args"][part]
    return config


def covering(trial_settings: list[dict]) -> list[dict]:
    """Trials that together give every parameter each of its values at least once."""
    seen, chosen = set(), []
    for setting in trial_settings:
        values = {(name, repr(value)) for name, value in setting.items()}
        if values - seen:
            chosen.append(setting)
            seen |= values
    return chosen


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_file_expands_into_agent_commands_the_cli_accepts(
    path, embedded, tmp_path, monkeypatch
):
    sweep = load_sweep(path)
    assert sweep.metric.startswith("val/") and sweep.goal == "maximize"
    trial_settings = settings(sweep, count=3 if sweep.method == "random" else None)
    if sweep.method == "grid":
        sizes = [len(spec["values"]) for spec in sweep.parameters.values()]
        assert len(trial_settings) == math.prod(sizes)
    fixed = [c for c in sweep.command if c != "${args}"]
    for setting in trial_settings:
        # W&B's ${args}: --<name>=<value> for every parameter, in the file's order
        expected = [*fixed, *(f"--{k}={v}" for k, v in setting.items())]
        assert agent_command(sweep, setting) == expected
    # the runner's checks (each command parsed by the CLI, the metric logged), on trials
    # that use every value of every parameter: the grids' products would take long
    covered = covering(trial_settings)
    folders = sweep.parameters.get("merge.method.gradient_stats", {}).get("values", [])
    folders = [f for f in folders if f != "null"]
    if folders:  # computed before the sweep, as its file says: checked before any trial
        with pytest.raises(SweepError, match=r"trial \d+ \(.*\): gradient_stats: no folder"):
            prepare(sweep, covered, tmp_path / "sweep")
        monkeypatch.chdir(tmp_path)
        (tmp_path / "configs").symlink_to(ROOT / "configs")
        for folder in folders:
            (tmp_path / folder).mkdir(parents=True)
    trials = prepare(sweep, covered, tmp_path / "sweep")
    config = parsed_config(sweep, trials[-1].command[1:])
    for name, value in trials[-1].setting.items():
        assert dotted(config, name) == (None if value == "null" else value)


# --- the local runner ---------------------------------------------------------------------


def write_sweep(folder: Path, **overrides) -> Path:
    sweep = {
        "method": "grid",
        "metric": {"name": "val/avg_acc", "goal": "maximize"},
        "parameters": {"merge.method.scaling_factor": {"values": [0.3, 0.6]}},
        "command": [
            "mergelab",
            "validate",
            "--config",
            OFFLINE_CONFIG,
            "--config",
            OFFLINE_METHOD,
            "${args}",
        ],
    } | overrides
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_random_search_is_seeded_and_draws_inside_each_distribution(tmp_path):
    parameters = {
        "merge.method.scaling_factor": {"distribution": "uniform", "min": 0.1, "max": 1.0},
        "merge.method.k": {"min": 1, "max": 4},
        "merge.method.tall_lambda": {"distribution": "log_uniform_values", "min": 0.2, "max": 0.8},
        "merge.method.threshold_quantile": {"values": [0.9, 0.99], "probabilities": [0.5, 0.5]},
        "merge.method": {"value": "Consensus"},
    }
    sweep = load_sweep(write_sweep(tmp_path, method="random", parameters=parameters))
    drawn = settings(sweep, count=20, seed=1)
    assert drawn == settings(sweep, count=20, seed=1) != settings(sweep, count=20, seed=2)
    for setting in drawn:
        assert 0.1 <= setting["merge.method.scaling_factor"] <= 1.0
        assert setting["merge.method.k"] in {1, 2, 3, 4}
        assert 0.2 <= setting["merge.method.tall_lambda"] <= 0.8
        assert setting["merge.method.threshold_quantile"] in {0.9, 0.99}
        assert setting["merge.method"] == "Consensus"


def test_grid_is_every_combination_and_count_or_run_cap_cut_it(tmp_path):
    parameters = {
        "merge.method.k": {"min": 1, "max": 3},
        "merge.method.scaling_factor": {"values": [0.3, 1]},
    }
    sweep = load_sweep(write_sweep(tmp_path, parameters=parameters, run_cap=5))
    grid = [
        {"merge.method.k": k, "merge.method.scaling_factor": f} for k in (1, 2, 3) for f in (0.3, 1)
    ]
    assert settings(sweep) == grid[:5]
    assert len(settings(sweep, count=2)) == 2


def test_agent_command_fills_wandb_macros(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_SWEEP_TEST_CONFIG", OFFLINE_CONFIG)
    command = ["${env}", "mergelab", "validate", "-c", "${envvar:MERGELAB_SWEEP_TEST_CONFIG}"]
    sweep = load_sweep(write_sweep(tmp_path, command=[*command, "${args}"]))
    assert agent_command(sweep, {"merge.method.k": 3, "merge.method.ties": 0.2}) == [
        "/usr/bin/env", "mergelab", "validate", "-c", OFFLINE_CONFIG,
        "--merge.method.k=3", "--merge.method.ties=0.2",
    ]  # fmt: skip


def test_sweep_file_runs_locally_each_trial_in_its_own_folder(embedded, tmp_path):
    output = tmp_path / "out"
    main(["configs/sweeps/task_arithmetic.yaml", "--count", "2", "--output", str(output)])

    with open(output / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["merge.method.scaling_factor"] for row in rows] == ["0.1", "0.2"]
    for row in rows:
        trial = output / f"trial_{int(row['trial']):03d}"
        run = Path(row["run"])
        assert run.is_relative_to(trial)
        results = json.loads((run / "results_val.json").read_text())
        assert results["settings"]["scaling_factor"] == [float(row["merge.method.scaling_factor"])]
        assert float(row["val/avg_acc"]) == pytest.approx(results["headline"]["avg_acc"], 1e-4)
        assert list(trial.glob("wandb/offline-run-*"))  # W&B's run is in the trial too
    best = max(rows, key=lambda row: float(row["val/avg_acc"]))
    assert [row["trial"] for row in rows if row["status"] == "best"] == [best["trial"]]
    assert f"| **{best['trial']}** |" in (output / "results.md").read_text()


def test_failed_trial_is_reported_and_the_next_still_runs(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path))
    run = tmp_path / "trial_002" / "task_arithmetic" / "version_0"
    writes_metrics = (
        f"import pathlib; run = pathlib.Path({str(run)!r}); run.mkdir(parents=True); "
        "(run / 'metrics.csv').write_text('val/avg_acc,step\\n0.25,0\\n')"
    )
    trials = [
        Trial(1, {"merge.method.scaling_factor": 0.3}, [sys.executable, "-c", "exit(3)"],
              tmp_path / "trial_001", ""),
        Trial(2, {"merge.method.scaling_factor": 0.6}, [sys.executable, "-c", writes_metrics],
              tmp_path / "trial_002", ""),
    ]  # fmt: skip
    run_sweep(sweep, trials)
    assert trials[0].status.startswith("failed (exit 3") and trials[0].metric is None
    assert (trials[1].status, trials[1].metric, trials[1].run_dir) == ("ok", 0.25, run)


@pytest.mark.parametrize("goal, best", [("maximize", 2), ("minimize", 1)])
def test_table_marks_the_best_finished_trial_for_the_goal(goal, best, tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, metric={"name": "val/avg_acc", "goal": goal}))
    trials = [
        Trial(1, {"merge.method.scaling_factor": 0.3}, [], tmp_path, "", 0.5, "ok"),
        Trial(2, {"merge.method.scaling_factor": 0.6}, [], tmp_path, "", 0.7, "ok"),
        Trial(3, {"merge.method.scaling_factor": 0.9}, [], tmp_path, "", 0.9, "failed (exit 1)"),
    ]
    table = write_table(sweep, trials, tmp_path)
    with open(tmp_path / "results.csv", newline="") as f:
        status = [row["status"] for row in csv.DictReader(f)]
    expected = [t.status for t in trials]
    expected[best - 1] = "best"
    assert status == expected
    assert f"| **{best}** |" in table


BAD_SWEEPS = {
    "unknown parameter": (
        {"parameters": {"merge.method.scaling_factr": {"values": [0.3]}}},
        "merge.method.scaling_factr",
    ),
    "value the CLI refuses": (
        {"parameters": {"merge.method.scaling_factor": {"values": ["two"]}}},
        "merge.method.scaling_factor",
    ),
    "metric never logged": ({"metric": {"name": "val/avg_accuracy"}}, "val/avg_accuracy"),
    "metric of another stage": ({"metric": {"name": "train/avg_acc"}}, "train/avg_acc"),
    "test metric": ({"metric": {"name": "test/avg_acc"}}, "ranks trials on test data"),
    "unknown key": ({"paramters": {}}, "unknown key 'paramters'"),
    "bayes": ({"method": "bayes"}, "method 'bayes'"),
    "no metric": ({"metric": None}, "metric.name is missing"),
    "bad goal": ({"metric": {"name": "val/avg_acc", "goal": "max"}}, "metric.goal 'max'"),
    "empty values": (
        {"parameters": {"merge.method.k": {"values": []}}},
        "parameters.merge.method.k",
    ),
    "min above max": (
        {"parameters": {"merge.method.k": {"min": 4, "max": 1}}},
        "parameters.merge.method.k: min < max",
    ),
    "null value": ({"parameters": {"merge.method.ties": {"values": [None, 0.2]}}}, "'null'"),
    "unknown distribution": (
        {"parameters": {"merge.method.k": {"distribution": "zipf", "min": 1, "max": 4}}},
        "distribution 'zipf'",
    ),
    "nested parameters": (
        {"parameters": {"merge": {"parameters": {"k": {"values": [1]}}}}},
        "nested parameters",
    ),
    "grid over a continuous range": (
        {"parameters": {"merge.method.scaling_factor": {"min": 0.1, "max": 1.0}}},
        "grid search needs values",
    ),
    "random without count": ({"method": "random"}, "--count"),
    "not a mergelab command": ({"command": ["python", "train.py", "${args}"]}, "train.py"),
    "not an evaluation": ({"command": ["mergelab", "fit", "${args}"]}, "mergelab fit"),
    # values the options' types accept and the methods refuse, in the last trial only
    "quantile out of range": (
        {
            "parameters": {
                "merge.method": {"values": ["TrustRegion"]},
                "merge.method.threshold_quantile": {"values": [0.9, 1.5]},
            }
        },
        "trial 2 (merge.method=TrustRegion merge.method.threshold_quantile=1.5): "
        "threshold_quantile",
    ),
    "negative TALL λ": (
        {
            "parameters": {
                "merge.method": {"values": ["Consensus"]},
                "merge.method.tall_lambda": {"values": [0.4, -0.5]},
            }
        },
        "trial 2 (merge.method=Consensus merge.method.tall_lambda=-0.5): ",
    ),
    "consensus k of zero": (
        {
            "parameters": {
                "merge.method": {"values": ["Consensus"]},
                "merge.method.tall_lambda": {"values": [0.5]},
                "merge.method.k": {"values": [2, -1]},
            }
        },
        "trial 2 (merge.method=Consensus merge.method.k=-1 merge.method.tall_lambda=0.5): "
        "consensus k",
    ),
}


@pytest.mark.parametrize("overrides, message", BAD_SWEEPS.values(), ids=list(BAD_SWEEPS))
def test_bad_sweep_is_refused_before_the_first_trial(
    overrides, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(ROOT)
    path = write_sweep(tmp_path, **overrides)
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main([str(path), "--output", str(output)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert str(path) in error and message in error
    assert not output.exists()


def test_unreadable_and_malformed_files_are_named(tmp_path):
    with pytest.raises(SweepError, match=r"missing\.yaml"):
        load_sweep(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: grid\nparameters: [unclosed\n")
    with pytest.raises(SweepError, match=r"broken\.yaml: not valid YAML"):
        load_sweep(broken)
