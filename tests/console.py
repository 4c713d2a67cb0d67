"""The installed ``mergelab`` console script, run offline in a folder of local mirrors."""

from __future__ import annotations

import os
import shutil
import subprocess
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
