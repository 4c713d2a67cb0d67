"""Where mergelab caches what it converts or computes (checkpoints, heads, statistics)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from mergelab.errors import NotAFolder, NotPermitted


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


def check_cache_folder(folder: str | os.PathLike, what: str, option: str) -> None:
    """Refuse a cache folder where a file stands, or one that cannot be written, before the
    work whose results it would keep (``option``: the setting that chooses another)."""
    check_folder_path(folder, what)
    existing = next(p for p in [Path(folder), *Path(folder).parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NotPermitted(
            f"{what} {folder} cannot be written ({existing} is not writable): choose another "
            f"{option} folder, or false"
        )


def text_digest(value: object) -> str:
    """The SHA-256 of a JSON-able description (keys sorted, anything else by ``str``): how
    a cache entry's key names its entry."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class CacheKey:
    """What a cache entry is computed from (a frozen dataclass): its digest names the
    entry, so that anything else computed gets an entry of its own."""

    DIGEST_LENGTH = 16

    def digest(self) -> str:
        return text_digest(dataclasses.asdict(self))[: self.DIGEST_LENGTH]
