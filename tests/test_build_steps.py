"""The build's steps shared out among processes: each runs once, after the steps it
needs, whatever the number of workers; marked steps are kept; a failing step stops the
build with the failure named, not a worker left waiting for it."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest

from mergelab.embedded.build_steps import MARKERS, Step, build_workers, run_steps


def _recording(name: str, log: Path, seconds: float = 0.0):
    """A step that appends its start and end (and its process) to ``log``, one line each."""

    def run(staging: Path) -> None:
        with open(log, "a") as out:
            out.write(f"start {name} {time.monotonic()} {os.getpid()}\n")
        time.sleep(seconds)
        (staging / f"{name.replace('/', '-')}.out").write_text(name)
        with open(log, "a") as out:
            out.write(f"end {name} {time.monotonic()} {os.getpid()}\n")

    return run


def _steps(log: Path) -> list[Step]:
    """The build's shape: two independent steps, four that need both, one that needs those."""
    first = ("data", "model")
    steps = [Step("data", _recording("data", log, 0.3)), Step("model", _recording("model", log))]
    tuned = tuple(f"tuned/{n}" for n in range(4))
    steps += [Step(name, _recording(name, log, 0.1), first) for name in tuned]
    return [*steps, Step("report", _recording("report", log), tuned)]


def _events(log: Path) -> dict[tuple[str, str], tuple[float, int]]:
    events = {}
    for line in log.read_text().splitlines():
        kind, name, when, pid = line.split()
        assert (kind, name) not in events, f"{name} ran twice"
        events[kind, name] = (float(when), int(pid))
    return events


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_each_step_runs_once_after_the_steps_it_needs(tmp_path, workers):
    log = tmp_path / "log"
    steps = _steps(log)
    run_steps(steps, tmp_path, workers)
    events = _events(log)
    assert {name for _, name in events} == {step.name for step in steps}
    for step in steps:
        assert (tmp_path / f"{step.name.replace('/', '-')}.out").read_text() == step.name
        assert (tmp_path / MARKERS / step.name).is_file()
        for need in step.needs:
            assert events["start", step.name][0] >= events["end", need][0]
    processes = {pid for _, pid in events.values()}
    if workers == 1:
        assert processes == {os.getpid()}
    else:  # the model is made while the data is written, by another process
        assert events["start", "model"][0] < events["end", "data"][0]
        assert len(processes) == workers and os.getpid() not in processes


def test_marked_steps_are_kept_and_stale_claims_dropped(tmp_path, caplog):
    log = tmp_path / "log"
    steps = _steps(log)
    markers = tmp_path / MARKERS
    (markers / "tuned").mkdir(parents=True)
    for name in ("data", "model", "tuned/0"):
        (markers / name).touch()
    (markers / "tuned/1.claimed").touch()  # by a worker of a build that was stopped
    with caplog.at_level(logging.INFO, logger="mergelab"):
        run_steps(steps, tmp_path, 2)
    ran = {name for _, name in _events(log)}
    assert ran == {"tuned/1", "tuned/2", "tuned/3", "report"}
    assert "[3/7] tuned/0: done before, kept" in caplog.messages


def _failing(staging: Path) -> None:
    time.sleep(0.2)
    raise ValueError("the data step failed")


def test_a_failing_step_ends_the_build_and_names_the_failure(tmp_path):
    """The worker waiting for the failed step's output is stopped, not left to wait."""
    log = tmp_path / "log"
    steps = [Step("data", _failing), Step("model", _recording("model", log))]
    steps += [Step("tuned", _recording("tuned", log), ("data", "model"))]
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"a worker .* failed \(exit status 1\)"):
        run_steps(steps, tmp_path, 2)
    assert time.monotonic() - started < 30
    assert not (tmp_path / MARKERS / "data").exists()
    assert "tuned" not in {name for _, name in _events(log)}
    with pytest.raises(ValueError, match="the data step failed"):  # one process: as raised
        run_steps(steps, tmp_path, 1)


def test_a_failing_step_stops_the_others_when_the_shell_ignores_sigint(tmp_path):
    """As in a build started in the background (a shell ignores SIGINT in such jobs, and
    its children inherit that): the waiting worker is still stopped."""
    log = tmp_path / "log"
    steps = [Step("data", _failing), Step("model", _recording("model", log))]
    steps += [Step("tuned", _recording("tuned", log), ("data", "model"))]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"a worker .* failed \(exit status 1\)"):
            run_steps(steps, tmp_path, 2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 30


def test_workers_are_one_per_core_at_most_one_per_step_side_by_side(tmp_path, monkeypatch):
    steps = _steps(tmp_path / "log")  # four steps need the same two
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert build_workers(steps) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert build_workers(steps) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert build_workers(steps) == 1


def test_a_step_listed_before_what_it_needs_is_refused(tmp_path):
    log = tmp_path / "log"
    tuned = Step("tuned", _recording("tuned", log), ("data",))
    steps = [tuned, Step("data", _recording("data", log))]
    with pytest.raises(ValueError, match="'tuned' needs"):
        run_steps(steps, tmp_path, 2)
    assert not log.exists()
