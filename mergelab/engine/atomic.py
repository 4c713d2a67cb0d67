"""Where a file is written before it is renamed into place, and the clean-up of those a
killed process left.

A temporary is hidden and named after the file, this host and this process
(``.<name>.<host>.<pid>.tmp<suffix>``). A process killed mid-write (SIGKILL, a node
lost) leaves one behind; the next write of the same file on the same host removes the
temporaries of processes that no longer run there. Those of other hosts (a run folder on
a shared filesystem, written by several nodes) are left to their own host.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
from pathlib import Path


def temporary_path(path: Path, suffix: str = "") -> Path:
    """The temporary that ``path`` is written to before ``os.replace``, after removing the
    stale ones of this host."""
    path = Path(path)
    host = socket.gethostname()
    remove_stale_temporaries(path, host)
    return path.with_name(f".{path.name}.{host}.{os.getpid()}.tmp{suffix}")


def write_atomically(path: Path, text: str | bytes) -> Path:
    """``path`` holding ``text``: written to its temporary, then renamed into place."""
    tmp = temporary_path(path)
    tmp.write_bytes(text if isinstance(text, bytes) else text.encode())
    os.replace(tmp, path)
    return path


def remove_stale_temporaries(path: Path, host: str) -> None:
    prefix = f".{path.name}.{host}."
    for candidate in path.parent.glob(glob.escape(prefix) + "*.tmp*"):
        pid = candidate.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_running(int(pid)):
            if candidate.is_dir() and not candidate.is_symlink():  # a folder being written
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                candidate.unlink(missing_ok=True)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)  # signal 0: checks only that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
