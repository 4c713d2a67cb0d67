"""The state of a run folder, in marker files: a folder is finished only when its last
file is written.

A run writes ``RUNNING`` (its host and process) into its folder when it starts, and
``COMPLETE`` after its last file (the results, the metrics, the plot, the loggers'
own), removing ``RUNNING``. A run that fails writes ``FAILED`` (the error), one stopped
by Ctrl-C ``INTERRUPTED``. A process killed outright (SIGKILL, a node lost) leaves
``RUNNING``: the next run under the same folder finds that its process no longer runs on
this host and renames the marker ``INTERRUPTED``. Results are read from another run's
folder (TALL's λ for consensus, the fine-tuned accuracies) only if it finished: a folder
with a marker and no ``COMPLETE`` is refused by name; one without markers (a copied
results file) is read.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from mergelab.engine.atomic import process_running, write_atomically
from mergelab.errors import BadValue

RUNNING, COMPLETE, FAILED, INTERRUPTED = "RUNNING", "COMPLETE", "FAILED", "INTERRUPTED"
UNFINISHED = (RUNNING, INTERRUPTED, FAILED)


def mark_running(folder: Path) -> None:
    """``RUNNING`` in ``folder``, after marking the runs beside it that were killed."""
    mark_killed_runs(folder.parent)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    write_atomically(folder / RUNNING, json.dumps(record) + "\n")


def mark_finished(folder: Path, marker: str, text: str = "") -> None:
    """``marker`` (COMPLETE, FAILED or INTERRUPTED) in ``folder``, then ``RUNNING`` gone."""
    write_atomically(folder / marker, text)
    (folder / RUNNING).unlink(missing_ok=True)


def mark_killed_runs(parent: Path) -> None:
    """Mark ``INTERRUPTED`` the run folders in ``parent`` whose ``RUNNING`` names a
    process of this host that no longer runs."""
    host = socket.gethostname()
    for marker in parent.glob(f"*/{RUNNING}"):
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):  # being written this instant, or not ours
            continue
        if not isinstance(record, dict) or record.get("host") != host:
            continue
        pid = record.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and not process_running(pid):
            note = f"process {pid} on {host} stopped before the run finished (killed)\n"
            mark_finished(marker.parent, INTERRUPTED, note)


def check_finished(folder: Path, what: str) -> None:
    """Refuse to read results from a run folder that did not finish, naming it."""
    if (folder / COMPLETE).exists():
        return
    for marker in UNFINISHED:
        if (folder / marker).exists():
            state = {RUNNING: "is still running or was killed"}.get(marker, f"is {marker}")
            raise BadValue(
                f"{what}: the run in {folder} {state} ({folder / marker}): its results "
                "are not complete; rerun it"
            )
