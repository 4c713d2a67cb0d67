"""Interruptions lose nothing: ``mergelab test``, ``fit``, ``sweep`` and ``embedded``
stopped by Ctrl-C (SIGINT to the process group, as a terminal sends it) or killed
outright (SIGKILL) at a few points leave no folder that looks finished, say so in one
line, and the next run gives what an uninterrupted run gives.

Runs are held at a known point by plugins (a user's own classes, by class path) that wait
while a hold file exists, so that a signal lands mid-merge or mid-fit on any machine."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import embedded_env
from console import MERGELAB, needs_cli

from mergelab.embedded.build import MANIFEST, EmbeddedBenchmark
from mergelab.io.run_folder import COMPLETE, INTERRUPTED, RUNNING
from mergelab.registry import CONFIGS

pytestmark = needs_cli

HELD = '''
import time
from pathlib import Path

from mergelab.lightning.gradient_stats import GradientStatistics
from mergelab.methods import TaskArithmetic


def hold_while(path):
    print("held", flush=True)
    while path and Path(path).exists():
        time.sleep(0.05)


class HeldMerge(TaskArithmetic):
    """Task Arithmetic whose merge waits while the file ``hold`` exists."""

    def __init__(self, hold: str = "", scaling_factor: float | list[float] = 0.3):
        super().__init__(scaling_factor)
        self.hold = hold

    def variants(self, context):
        hold_while(self.hold)
        return super().variants(context)


class HeldStatistics(GradientStatistics):
    """Gradient statistics whose first step waits while the file ``hold`` exists."""

    def __init__(self, hold: str = "", **kwargs):
        super().__init__(**kwargs)
        self.hold = hold

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            hold_while(self.hold)
        return super().training_step(batch, batch_idx)
'''
BASE = ["-c", str(CONFIGS / "embedded" / "base.yaml"), "--trainer.enable_progress_bar=false"]
FIT = ["-c", str(CONFIGS / "embedded" / "trust_region_gradients.yaml")]
HELD_MERGE = ["--merge.method=held.HeldMerge", "--merge.method.scaling_factor=[0.3]"]


def start(cache: Path, cwd: Path, *args: str) -> subprocess.Popen:
    """``mergelab *args`` on the test preset, in a session of its own (so that a signal
    reaches it and its children, as Ctrl-C in a terminal does), output into files."""
    (cwd / "held.py").write_text(HELD)
    env = embedded_env(cache) | {"WANDB_MODE": "offline", "PYTHONPATH": str(cwd)}
    out, err = open(cwd / "stdout", "w"), open(cwd / "stderr", "w")  # noqa: SIM115
    return subprocess.Popen(
        [MERGELAB, *args],
        cwd=cwd,
        env=env,
        stdout=out,
        stderr=err,
        start_new_session=True,
        preexec_fn=interruptible,
    )


def interruptible() -> None:
    """Ctrl-C's default disposition in the child, as a terminal's process has it: a test
    run started as a shell's background job passes SIGINT down ignored, and Python then
    never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish(cache: Path, cwd: Path, *args: str) -> None:
    process = start(cache, cwd, *args)
    assert process.wait(timeout=600) == 0, (cwd / "stderr").read_text()[-3000:]


def stop_when(process: subprocess.Popen, ready, sig: int, timeout: float = 300) -> int:
    """Send ``sig`` to the process's group once ``ready()`` is true; its exit status."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "finished before it could be stopped"
        assert time.monotonic() < deadline, "never got ready"
        time.sleep(0.05)
    os.killpg(process.pid, sig)
    return process.wait(timeout=120)


def printed(path: Path, text: str):
    return lambda: path.is_file() and text in path.read_text()


def console(cwd: Path) -> str:
    return (cwd / "stdout").read_text() + (cwd / "stderr").read_text()


def assert_one_line_and_marked(cwd: Path, folder: Path) -> None:
    """Ctrl-C mid-run: one line says so, no traceback; the folder is INTERRUPTED, with no
    RUNNING, no COMPLETE."""
    stderr = (cwd / "stderr").read_text()
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if "interrupted" in line.lower()]
    assert lines == [f"[mergelab] interrupted: {folder} is marked {INTERRUPTED}"]
    assert (folder / INTERRUPTED).is_file() and not (folder / RUNNING).exists()
    assert not (folder / COMPLETE).exists()


def test_ctrl_c_mid_merge_marks_the_run_interrupted_in_one_line(embedded_cache, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    process = start(embedded_cache, tmp_path, "test", *BASE, *HELD_MERGE,
                    f"--merge.method.hold={hold}")  # fmt: skip
    assert stop_when(process, printed(tmp_path / "stdout", "held"), signal.SIGINT) != 0
    folder = tmp_path / "lightning_logs" / "held_merge" / "version_0"
    assert_one_line_and_marked(tmp_path, folder)
    assert not (folder / "results.json").exists()


def test_a_run_killed_after_its_results_is_not_taken_for_a_finished_one(embedded_cache, tmp_path):
    """SIGKILL right after results.json is written (before the metrics, the plot and the
    loggers' files): the folder says RUNNING, a reader refuses it, the next run marks it
    INTERRUPTED and gives the same results."""
    runs = tmp_path / "lightning_logs" / "held_merge"
    killed, finished = runs / "version_0", runs / "version_1"
    process = start(embedded_cache, tmp_path, "test", *BASE, *HELD_MERGE)
    stop_when(process, (killed / "results.json").exists, signal.SIGKILL)
    assert (killed / RUNNING).is_file() and not (killed / COMPLETE).exists()

    reference = ["--model.finetuned_accuracy", str(killed / "results.json")]
    refused = subprocess.run(
        [MERGELAB, "test", *BASE, *reference], cwd=tmp_path, env=embedded_env(embedded_cache),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert refused.returncode == 2
    assert f"the run in {killed} is still running or was killed" in refused.stderr

    finish(embedded_cache, tmp_path, "test", *BASE, *HELD_MERGE)
    assert (killed / INTERRUPTED).is_file() and not (killed / RUNNING).exists()
    assert (finished / COMPLETE).is_file() and not (finished / RUNNING).exists()
    headlines = [json.loads((f / "results.json").read_text())["headline"] for f in runs.iterdir()]
    assert headlines[0] == headlines[1]


def test_ctrl_c_mid_fit_then_the_next_fit_computes_the_same_statistics(embedded_cache, tmp_path):
    """Gradient statistics stopped at their first step: the fit's folder INTERRUPTED, no
    statistics file; the next fit writes the same files as an uninterrupted one."""
    hold = tmp_path / "hold"
    hold.touch()
    held = ["--model.class_path=held.HeldStatistics", f"--model.init_args.hold={hold}"]

    def fit(statistics: str, *extra: str) -> subprocess.Popen:
        folder = f"--model.init_args.statistics={tmp_path / statistics}"
        return start(embedded_cache, tmp_path, "fit", *FIT, *held, folder, *extra)

    assert stop_when(fit("stats"), printed(tmp_path / "stdout", "held"), signal.SIGINT) != 0
    assert_one_line_and_marked(tmp_path, tmp_path / "lightning_logs/gradient_stats/version_0")
    assert not list((tmp_path / "stats").glob("*.safetensors"))

    hold.unlink()
    for statistics in ("stats", "uninterrupted"):
        assert fit(statistics).wait(timeout=600) == 0, (tmp_path / "stderr").read_text()[-3000:]
    files = sorted(p.name for p in (tmp_path / "stats").glob("*.safetensors"))
    assert len(files) == 8
    for name in files:
        again = (tmp_path / "stats" / name).read_bytes()
        assert again == (tmp_path / "uninterrupted" / name).read_bytes(), name


def test_ctrl_c_mid_sweep_then_the_rerun_finishes_it(embedded_cache, tmp_path):
    """``mergelab sweep`` stopped during its first trial's merge: one line, no table, the
    trial's folder INTERRUPTED; the rerun into the same folder scores what an
    uninterrupted sweep scores."""
    hold = tmp_path / "hold"
    hold.touch()
    command = ["mergelab", "validate", *BASE, "--merge.method=held.HeldMerge"]
    sweep = {
        "name": "held", "method": "grid", "program": "mergelab",
        "metric": {"name": "val/avg_acc", "goal": "maximize"},
        "parameters": {"merge.method.hold": {"values": [str(hold)]}},
        "command": [*command, "${args}"],
    }  # fmt: skip
    (tmp_path / "held.yaml").write_text(yaml.safe_dump(sweep))
    out, trial_log = tmp_path / "out", tmp_path / "out" / "trial_001" / "output.log"

    def run_sweep(output: Path) -> subprocess.Popen:
        return start(embedded_cache, tmp_path, "sweep", "held.yaml", "--output", str(output))

    assert stop_when(run_sweep(out), printed(trial_log, "held"), signal.SIGINT) == 130
    assert (tmp_path / "stderr").read_text().splitlines()[-1] == "mergelab: interrupted"
    assert not (out / "results.csv").exists() and not (out / "results.md").exists()
    [trial_run] = (out / "trial_001").glob("*/version_0")
    assert (trial_run / INTERRUPTED).is_file() and not (trial_run / RUNNING).exists()

    hold.unlink()
    assert run_sweep(out).wait(timeout=600) == 0, console(tmp_path)[-3000:]
    with open(out / "results.csv", newline="") as table:
        [row] = list(csv.DictReader(table))
    # the rerun's own run, scored as any uninterrupted run is, not the interrupted one
    finished = trial_run.with_name("version_1")
    assert Path(row["run"]) == finished and row["status"] == "best"
    scored = json.loads((finished / "results_val.json").read_text())["headline"]["avg_acc"]
    assert float(row["val/avg_acc"]) == pytest.approx(scored, rel=1e-6)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_build_stopped_midway_resumes_to_the_same_files(embedded_cache, tmp_path, sig):
    """``mergelab embedded`` stopped during the pretraining step of the build: Ctrl-C
    ends in one line; after SIGKILL (the harder case: no clean-up at all) the next use
    finishes the build, file for file as the session's."""
    cache, cwd = tmp_path / "cache", tmp_path / "run"
    cwd.mkdir()
    process = start(cache, cwd, "embedded", "--methods", "zero_shot")
    status = stop_when(process, printed(cwd / "stderr", "[2/11] pretrained"), sig)
    benchmark = EmbeddedBenchmark("test", str(cache))
    assert not benchmark.root.exists() and benchmark.staging.is_dir()
    if sig == signal.SIGINT:
        stderr = (cwd / "stderr").read_text()
        assert status == 130 and "Traceback" not in stderr
        assert stderr.splitlines()[-1] == "mergelab: interrupted"
        return  # the resumed build: the same, after either signal (below)

    benchmark.ensure()  # the next use resumes the build
    built = EmbeddedBenchmark("test", str(embedded_cache)).root
    assert (benchmark.root / MANIFEST).read_bytes() == (built / MANIFEST).read_bytes()
    assert not list(cache.rglob(".*.tmp*"))  # no temporary outlives the next run
