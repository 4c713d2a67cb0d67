"""The measuring harness every benchmark script in this folder shares (standard library only).

- child processes: a script re-runs itself with the hidden sub-command ``_child`` to
  measure one thing in a fresh process, and hands back one JSON line on stdout
  (``child_command``, ``emit``, ``run_child``, ``run_measured_child``);
- peak RSS and CPU time of this process (``peak_rss_bytes``, ``proc_status_bytes``,
  ``usage``), and the timing of one piece of work with them (``time_work``, ``fastest``);
- memory and page-cache preparation before a measurement (``warm_free_memory``,
  ``warm_page_cache``);
- the machine's load from other processes (``busy_cpu_seconds``, ``own_cpu_seconds``,
  ``load_average``);
- the last line of every script's output: ``RESULT key=value ...`` (``print_result``).

Nothing here imports torch or numpy at module level: a parent that imports this module
stays small, and a child's ``ru_maxrss`` starts at its parent's RSS.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

CHILD = "_child"  # hidden sub-command: python SCRIPT _child ...
MB = 1e6


class BenchError(RuntimeError):
    """A child process failed or answered something unreadable."""


# --- this process: memory and CPU --------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak RSS; ``ru_maxrss`` is in KiB on Linux."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, ...), None where unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def usage() -> dict:
    """CPU seconds and filesystem reads of this process so far (getrusage)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu": r.ru_utime + r.ru_stime, "inblock": r.ru_inblock, "majflt": r.ru_majflt}


def time_work(work: Callable[[], object], profile: Path | None, name: str) -> tuple[object, dict]:
    """Run ``work()`` once and return its result and what it cost.

    The seconds are ``time.perf_counter`` around the call alone; CPU seconds, storage
    reads and major faults are getrusage differences over the same span; peak RSS
    (``ru_maxrss``) and VmHWM are read right after it. With ``profile``, the call runs
    under cProfile and ``profile/<name>.prof`` and ``profile/<name>.txt`` are written.
    """
    profiler = None
    if profile is not None:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    before = usage()
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    after = usage()
    if profiler is not None:
        profiler.disable()
    cost = {
        "seconds": seconds,
        "cpu_seconds": after["cpu"] - before["cpu"],
        # ru_inblock counts 512-byte blocks read from storage: 0 means a warm page cache
        "disk_read_bytes": 512 * (after["inblock"] - before["inblock"]),
        "major_faults": after["majflt"] - before["majflt"],
        "peak_rss": peak_rss_bytes(),
        "vm_hwm": proc_status_bytes("VmHWM"),
    }
    if profiler is not None:
        import pstats

        profile.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(profile / f"{name}.prof")
        with open(profile / f"{name}.txt", "w") as out:
            stats = pstats.Stats(profiler, stream=out).strip_dirs()
            stats.sort_stats("cumulative").print_stats(30)
            stats.sort_stats("tottime").print_stats(20)
    return result, cost


def fastest(repeat: int, run: Callable[[], object]) -> float:
    """The shortest wall time of ``repeat`` calls of ``run()``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


class LogCapture(logging.Handler):
    """Keeps the messages of one logger (INFO and up) for the child's report."""

    def __init__(self, logger: str):
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        logging.getLogger(logger).addHandler(self)
        logging.getLogger(logger).setLevel(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# --- preparing a measurement ---------------------------------------------------------------


def warm_free_memory(size: int) -> None:
    """Fill ``size`` bytes, free them, then reset this process's peak RSS.

    Some virtual machines hand memory freed in the guest back to their host a few seconds
    later (virtio-balloon free page reporting), and the next first touch of such a page
    costs a fault in the hypervisor. On the 2-core VM this was tuned on, writing a
    440 MB file took 0.6-1.0 s into such memory, 0.1 s into memory the writing process
    had just freed (and memory freed by another process that had just exited did not
    help as much: 0.6 s). Work that reads into buffers it keeps reusing never pays
    this; work that writes a file or builds a model would pay it at random, depending
    on what ran or idled before. So a child fills and frees ``size`` bytes right before
    its work, and resets its peak RSS (/proc/self/clear_refs, "5") so that the filling is
    not counted.
    """
    import numpy as np

    np.ones(size // 8)  # every page written, then freed at once
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError as err:
        raise BenchError(f"cannot reset the peak RSS ({err}); rerun with --cold-memory") from err


def warm_page_cache(paths: Iterable[Path]) -> float:
    """Read every file once more, through a small buffer; returns the seconds taken.

    A warm-up run fills the page cache, but a machine may page cold file pages out
    again after some idle seconds (e.g. a DAMON pageout scheme), so the parent re-reads
    the inputs right before each measured child. A fixed 8 MiB buffer keeps the
    parent's RSS, which the children inherit in ``ru_maxrss``, small.
    """
    buffer = bytearray(8 << 20)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - start


# --- the machine's load ------------------------------------------------------------------


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine have spent busy so far (/proc/stat)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (NaN where the system has none)."""
    return os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3


# --- child processes ---------------------------------------------------------------------


def child_command(script: Path, *args: str) -> list[str]:
    """The command line that runs ``script``'s hidden child sub-command."""
    return [sys.executable, str(script), CHILD, *args]


def emit(record: dict) -> None:
    """The one JSON line a child hands back to the parent, on stdout."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def parse_record(name: str, proc: subprocess.CompletedProcess) -> dict:
    """The last JSON line of a finished child's stdout; BenchError if it failed."""
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").splitlines()[-30:])
        raise BenchError(f"{name}: child exited with {proc.returncode}\n{tail}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"{name}: child printed no JSON line:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])


def run_child(name: str, command: Sequence[str], cwd: Path) -> dict:
    """Run a child with its stderr shown as it goes (e.g. progress); returns its record."""
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=cwd)
    return parse_record(name, proc)


def run_measured_child(name: str, command: Sequence[str], cwd: Path) -> dict:
    """Run a measuring child, its output captured; returns its record.

    The record gains ``other_load``: the CPU that other processes of the machine used
    while the child ran, in cores on average (None without /proc/stat).
    """
    busy, own, start = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - start
    record = parse_record(name, proc)
    busy_after = busy_cpu_seconds()
    record["other_load"] = (
        None
        if busy is None or busy_after is None
        else max(0.0, (busy_after - busy) - (own_cpu_seconds() - own)) / wall
    )
    return record


# --- the report --------------------------------------------------------------------------


def print_result(values: Iterable[tuple[str, float, str]]) -> None:
    """Print the last line of a script: ``RESULT`` and ``key=value`` pairs.

    ``values`` holds (key, value, format spec) triples, e.g. ``("ratio", 1.5, ".3f")``.
    """
    sys.stdout.flush()
    pairs = " ".join(f"{key}={format(value, spec)}" for key, value, spec in values)
    print(f"RESULT {pairs}", flush=True)
