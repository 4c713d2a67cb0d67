"""Decoded images on disk: the preprocessed images of one task split, uint8 at the model's
resolution, memory-mapped, with their labels.

An entry is a folder ``<root>/<task>/<split>-<digest>`` holding ``images.npy`` (N × H × W
× C), ``labels.npy`` (N) and ``meta.json`` (what the images were computed from: the
:class:`DecodedKey`). The digest is the key's, so other data, other rows or another
preprocessing get an entry of their own. An entry is written in a hidden folder beside it
and renamed into place when complete; one whose ``meta.json`` does not describe what it
is read for (copied, edited, or truncated) is refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mergelab.engine.atomic import temporary_path
from mergelab.errors import BadValue
from mergelab.io.cache import CacheKey, check_cache_folder

log = logging.getLogger(__name__)

FORMAT = 1
IMAGES, LABELS, META = "images.npy", "labels.npy", "meta.json"


@dataclasses.dataclass(frozen=True)
class DecodedKey(CacheKey):
    """Everything a split's decoded images are computed from.

    ``dataset`` is the dataset's content fingerprint, ``rows`` a digest of the rows taken,
    ``preprocessing`` the preprocessing steps up to the tensor conversion, with the
    versions of the libraries that run them."""

    task: str
    split: str
    dataset: str
    rows: str
    preprocessing: str
    format: int = FORMAT


class DecodedImages:
    """One entry, read-only: ``images`` (a memory map, opened in each process that reads
    it, so that dataloader workers share the page cache instead of copies) and ``labels``."""

    def __init__(self, folder: Path, count: int, shape: tuple[int, ...]):
        self.folder = folder
        self.count = count
        self.shape = shape
        self.labels = np.load(folder / LABELS)
        self._images: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.folder / IMAGES, mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}  # a worker maps the file itself


class DecodedImageCache:
    """The folder that holds the entries; refused up front if it is a file or cannot be
    written, so that a run does not decode for minutes and then fail."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        check_cache_folder(self.root, "the decoded-image cache", "--data.decoded_cache")

    def folder(self, key: DecodedKey) -> Path:
        task = re.sub(r"[^A-Za-z0-9_.-]", "_", key.task)
        return self.root / task / f"{key.split}-{key.digest()}"

    def read(self, key: DecodedKey) -> DecodedImages | None:
        """The entry of ``key``, checked against it; None if there is none yet."""
        folder = self.folder(key)
        if not (folder / META).is_file():
            return None
        meta_path = folder / META
        meta = json.loads(meta_path.read_text())
        saved = meta.get("key", {})
        for field, expected in dataclasses.asdict(key).items():
            if saved.get(field) != expected:
                raise BadValue(
                    f"{meta_path}: decoded images of {field} {saved.get(field)!r}, but task "
                    f"{key.task!r} {key.split} now has {field} {expected!r} (a copied or "
                    f"edited entry); delete {folder}"
                )
        count, shape = int(meta["count"]), tuple(meta["shape"])
        _check_array(folder / IMAGES, (count, *shape), np.uint8)
        _check_array(folder / LABELS, (count,), np.int64)
        return DecodedImages(folder, count, shape)

    def write(
        self,
        key: DecodedKey,
        count: int,
        batches: Iterable[tuple[Sequence[np.ndarray], Sequence[int]]],
    ) -> None:
        """Write ``count`` images from ``batches`` of (uint8 images H × W × C, labels);
        every image must have the first one's shape."""
        folder = self.folder(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(folder)
        tmp.mkdir()
        try:
            images, labels, filled = None, np.empty(count, dtype=np.int64), 0
            for pixels, targets in batches:
                for image, label in zip(pixels, targets, strict=True):
                    if images is None:
                        shape = image.shape
                        images = np.lib.format.open_memmap(
                            tmp / IMAGES, mode="w+", dtype=np.uint8, shape=(count, *shape)
                        )
                    if image.shape != shape or image.dtype != np.uint8:
                        raise BadValue(
                            f"task {key.task!r} {key.split}: image {filled} preprocesses to "
                            f"{image.dtype} {image.shape}, the first to uint8 {shape}; the "
                            "decoded-image cache needs one size (end the preprocessing with "
                            "a crop), or run with --data.decoded_cache=false"
                        )
                    images[filled], labels[filled] = image, label
                    filled += 1
            if filled != count or images is None:
                raise RuntimeError(f"{filled} images decoded for {count} rows")
            images.flush()
            del images
            np.save(tmp / LABELS, labels)
            meta = {"key": dataclasses.asdict(key), "count": count, "shape": list(shape)}
            (tmp / META).write_text(json.dumps(meta, indent=1))
            _publish(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _publish(tmp: Path, folder: Path) -> None:
    """Rename a complete entry into place; another process (a node sharing the cache)
    may have put the same entry there first, and then that one stays."""
    try:
        os.replace(tmp, folder)
    except OSError:
        if not (folder / META).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _check_array(path: Path, shape: tuple[int, ...], dtype) -> None:
    """An ``.npy`` file holds ``shape`` of ``dtype``, all of its bytes present."""
    if not path.is_file():
        raise BadValue(f"{path}: missing from its decoded-image entry; delete {path.parent}")
    with path.open("rb") as file:
        version = np.lib.format.read_magic(file)
        header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        saved_shape, _, saved_dtype = header(file)
        offset = file.tell()
    size = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if saved_shape != shape or saved_dtype != np.dtype(dtype) or path.stat().st_size != size:
        raise BadValue(
            f"{path}: holds {saved_dtype} {saved_shape} in {path.stat().st_size} bytes, its "
            f"entry says {np.dtype(dtype)} {shape} in {size}; delete {path.parent}"
        )


def describe_size(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.1f} {unit}"
    return f"{nbytes / 1024:.0f} KiB"
