"""A child process run to its end, Ctrl-C included.

Ctrl-C in a terminal reaches every process of the foreground group: the child gets it
too and stops in its own way (a run marks its folder INTERRUPTED, the build keeps its
finished steps). So on an interruption the parent waits for the child rather than
killing it at once, as ``subprocess.run`` would; a child that is still running after
:data:`GRACE_SECONDS` (or that the signal did not reach) is sent SIGINT, then killed.
"""

from __future__ import annotations

import signal
import subprocess

GRACE_SECONDS = 30


def run_child(command: list[str], **popen: object) -> int:
    """``command``'s exit status (negative: the signal that ended it); on KeyboardInterrupt
    or any other exception here, the child is stopped first and the exception re-raised."""
    child = subprocess.Popen(command, **popen)
    try:
        return child.wait()
    except BaseException:
        try:
            child.wait(timeout=1)  # Ctrl-C reached it too: it is stopping
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        raise
