"""The build's steps, run in order by one process or shared out among several.

Each step writes its outputs atomically into the staging folder and is then marked done
(``.steps/<name>``), so an interrupted build resumes at the first step not marked. With
several workers (forked from the build's process, which holds the cache folder's lock),
each takes the first step that no other has claimed (``.steps/<name>.claimed``, created
exclusively) and waits until the steps it needs are done: the datasets are written while
the model is pretrained, and the task models are fine-tuned side by side. Every step
seeds itself and runs at the build's fixed thread count, so its files are the same
whichever worker runs it, and with how many beside it.

Workers are forked before the build computes anything (a fork after OpenMP's threads
have started is unsafe); they share the modules the build's process already imported.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

MARKERS = ".steps"
CLAIMED = ".claimed"
POLL_SECONDS = 0.2  # how often a worker looks whether the steps it needs are done
INTERRUPTED = 130  # a worker's exit status after Ctrl-C, as a shell's


class Step(NamedTuple):
    """One step of the build: ``run(staging folder)`` after the steps named in ``needs``."""

    name: str
    run: Callable[[Path], None]
    needs: tuple[str, ...] = ()


def build_workers(steps: Sequence[Step]) -> int:
    """How many processes the build runs: one per core this process may use, at most as
    many as the steps that need the same ones (the fine-tunes). Two workers of two threads
    each on two cores fine-tuned two tasks of the default preset in 32 s, against 49 s one
    after the other (with OpenMP's threads waiting passively,
    :data:`mergelab.embedded.build.BUILD_DEFAULTS`)."""
    side_by_side = max(Counter(step.needs for step in steps).values(), default=1)
    return max(1, min(len(os.sched_getaffinity(0)), side_by_side))


def run_steps(steps: Sequence[Step], staging: Path, workers: int) -> None:
    """Every step not marked done, by ``workers`` processes (1: this one, in order); each
    step comes after the steps it needs. Raises KeyboardInterrupt when a worker was
    interrupted, RuntimeError when one failed (its traceback printed by it)."""
    for number, step in enumerate(steps):
        earlier = {s.name for s in steps[:number]}
        if not set(step.needs) <= earlier:  # a worker would wait for it forever
            raise ValueError(f"step {step.name!r} needs {step.needs}, not all before it")
    markers = staging / MARKERS
    markers.mkdir(parents=True, exist_ok=True)
    for claim in markers.rglob(f"*{CLAIMED}"):  # of a build stopped before; the lock is ours
        claim.unlink()
    for number, step in enumerate(steps, 1):
        if (markers / step.name).exists():
            log.info("[%d/%d] %s: done before, kept", number, len(steps), step.name)
    if workers == 1:
        _take_steps(steps, markers, staging)
        return
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_worker, args=(steps, markers, staging), name=f"build-{n}")
        for n in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        status = _first_failure(processes)
    except BaseException:
        for process in processes:  # Ctrl-C reached them too, unless sent to this one only
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        for process in processes:
            process.join()
        raise
    if status in (INTERRUPTED, -signal.SIGINT):
        raise KeyboardInterrupt
    if status != 0:
        raise RuntimeError(
            f"a worker of the embedded benchmark's build failed (exit status {status}); "
            "its traceback is printed above"
        )


def _first_failure(processes) -> int:
    """The exit status of the first worker to fail (0: none did), once every worker has
    ended; when one fails, the others are stopped (they may be waiting for its step)."""
    running = {process.sentinel: process for process in processes}
    while running:
        for sentinel in wait(list(running)):
            process = running.pop(sentinel)
            process.join()
            if process.exitcode != 0:
                for other in running.values():
                    os.kill(other.pid, signal.SIGINT)
                for other in running.values():
                    other.join()
                return process.exitcode
    return 0


def _worker(steps: Sequence[Step], markers: Path, staging: Path) -> None:
    # the build process stops a waiting worker with SIGINT, which a shell ignores in the
    # jobs it starts in the background (``nohup mergelab embedded &``): the worker would
    # wait for a failed step forever
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _take_steps(steps, markers, staging)
    except KeyboardInterrupt:
        # a second Ctrl-C may follow (the build process passes one on to the workers the
        # terminal's reached too): it must not interrupt the exit with a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.exit(INTERRUPTED)


def _take_steps(steps: Sequence[Step], markers: Path, staging: Path) -> None:
    """Claims and runs, one after another, the first step no one has claimed, until every
    step is claimed."""
    for number, step in enumerate(steps, 1):
        label = f"[{number}/{len(steps)}] {step.name}"
        marker = markers / step.name
        if marker.exists() or not _claim(markers / (step.name + CLAIMED)):
            continue
        while not all((markers / need).exists() for need in step.needs):
            time.sleep(POLL_SECONDS)
        log.info("%s", label)
        started = time.perf_counter()
        step.run(staging)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        log.info("%s: %.0f s", label, time.perf_counter() - started)


def _claim(path: Path) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
