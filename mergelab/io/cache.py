"""Where mergelab caches what it converts or computes (checkpoints, heads, statistics)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else $MERGELAB_CACHE, else ~/.cache/mergelab."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("MERGELAB_CACHE", Path.home() / ".cache" / "mergelab"))
