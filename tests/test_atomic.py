"""Temporaries of atomic writes: a killed writer's are removed by the next write of the
same file on the same host; a running process's and another host's are kept."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import torch

from mergelab.engine.atomic import temporary_path
from mergelab.engine.checkpoints import save_state_dict


def _dead_pid() -> int:
    """The id of a process that ran and is gone (reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_writers_temporary_goes_with_the_next_write(tmp_path):
    host = socket.gethostname()
    target = tmp_path / "model.safetensors"
    stale = tmp_path / f".model.safetensors.{host}.{_dead_pid()}.tmp"
    stale.write_bytes(b"half a file")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".model.safetensors.{host}.{sleeper.pid}.tmp"
        running.write_bytes(b"being written")
        elsewhere = tmp_path / f".model.safetensors.other-node.{_dead_pid()}.tmp"
        elsewhere.write_bytes(b"another host's")
        other_file = tmp_path / f".other.safetensors.{host}.{_dead_pid()}.tmp"
        other_file.write_bytes(b"another file's")
        save_state_dict({"w": torch.ones(3)}, target)
        assert target.is_file()
        assert not stale.exists()
        assert running.exists() and elsewhere.exists() and other_file.exists()
    finally:
        os.kill(sleeper.pid, signal.SIGKILL)
        sleeper.wait()


def test_the_temporary_is_named_after_file_host_and_process(tmp_path):
    path = temporary_path(tmp_path / "summary.png", ".png")
    assert path.parent == tmp_path
    assert path.name == f".summary.png.{socket.gethostname()}.{os.getpid()}.tmp.png"
