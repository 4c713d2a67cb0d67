"""Where mergelab caches what it converts or computes (checkpoints, heads, statistics)."""

from __future__ import annotations

import os
from pathlib import Path

from mergelab.errors import NotAFolder


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else $MERGELAB_CACHE, else ~/.cache/mergelab; refused if it is a
    file (found when the run starts, not when its first cache entry is written)."""
    if cache_dir is not None:
        root, origin = Path(cache_dir), "cache_dir"
    else:
        root = Path(os.environ.get("MERGELAB_CACHE", Path.home() / ".cache" / "mergelab"))
        origin = "$MERGELAB_CACHE" if "MERGELAB_CACHE" in os.environ else "the default"
    if root.exists() and not root.is_dir():
        raise NotAFolder(f"the cache folder {root} ({origin}) is a file, not a folder")
    return root


def check_folder_path(folder: str | os.PathLike, what: str) -> None:
    """Refuse a folder to be made where a file stands at it or at one of its parents."""
    for path in [Path(folder), *Path(folder).parents]:
        if path.exists():
            if not path.is_dir():
                raise NotAFolder(f"{what} {folder}: {path} is a file, not a folder")
            return
