"""The installed ``mergelab`` console script, run offline in a folder of local mirrors."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MERGELAB = shutil.which("mergelab")
needs_cli = pytest.mark.skipif(MERGELAB is None, reason="needs `pip install -e .`")


def run_mergelab(
    cwd: Path, *args: str, expect_ok: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """``mergelab *args`` in ``cwd`` without network (W&B offline unless ``env`` says
    otherwise); asserts success, showing the output's tail, unless ``expect_ok`` is False."""
    env = (
        os.environ
        | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
        | env
    )
    result = subprocess.run(
        [MERGELAB, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def run_console(monkeypatch, capsys, cwd: Path, *args: str) -> tuple[int, str, str]:
    """``mergelab *args`` through the console script's ``main()`` in this process (no
    interpreter start, no imports), in ``cwd``: its exit status, stdout and stderr. The
    console's set-up of the package's logger is undone afterwards."""
    from mergelab.console import main

    logger = logging.getLogger("mergelab")
    for attribute in ("propagate", "handlers", "level"):
        monkeypatch.setattr(logger, attribute, copy.copy(getattr(logger, attribute)))
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["mergelab", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
