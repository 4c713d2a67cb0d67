"""Splits read with the evaluation transform, served from the decoded-image cache
(:mod:`mergelab.io.decoded_images`): the first run that reads a split with a given
preprocessing decodes it once, in the dataloader's worker processes, while the other
processes of the node wait; every later run, sweep trial and process reads the uint8
images and only converts them to tensors.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mergelab.io.decoded_images import (
    DecodedImageCache,
    DecodedImages,
    DecodedKey,
    describe_size,
)
from mergelab.tasks.preprocessing import CachedPreprocessing

log = logging.getLogger("mergelab.io.decoded_images")  # shown on a quiet console too

DECODE_BATCH = 64


class DecodedSplit(Dataset):
    """(image tensor, label) pairs of a split, read from its decoded images. A loader
    reads a batch at a time (``__getitems__``, which the DataLoader calls with a batch's
    indices), already stacked: give it ``collate_fn=as_served``."""

    def __init__(self, images: DecodedImages, preprocessing: CachedPreprocessing):
        self.images = images
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return self.images.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__([i])
        return images[0], int(labels[0])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.asarray(indices)
        # one read of the rows (a copy: the steps work in place, the map is read-only)
        images = self.preprocessing.tensors(self.images.images[rows])
        return images, torch.from_numpy(self.images.labels[rows])


def as_served(batch):
    """The collate function of a DecodedSplit's loader: its batches come stacked."""
    return batch


@dataclass(frozen=True)
class DecodeRequest:
    """A split to serve from the cache: its rows (a dataset of (uint8 H × W × C image,
    label): the split read through the preprocessing's pixel steps), its key and its
    preprocessing."""

    rows: Dataset
    key: DecodedKey
    preprocessing: CachedPreprocessing


def rows_digest(indices: torch.Tensor) -> str:
    return hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def serve_decoded(
    cache: DecodedImageCache,
    requests: Sequence[DecodeRequest],
    num_workers: int,
    writes: bool,
    wait: Callable[[], None] | None,
) -> list[DecodedSplit]:
    """Each request's split read from the cache. Missing entries are written first by
    the process for which ``writes`` is true (one per node); ``wait`` holds every process
    until they are (a barrier, in a distributed run). If the writing fails, the writer
    still reaches the barrier before raising, so that the other processes stop too
    instead of waiting for it until the strategy's timeout."""
    found = [cache.read(r.key) for r in requests]
    missing = [r for r, images in zip(requests, found, strict=True) if images is None]
    failure = None
    if writes and missing:
        try:
            _write(cache, missing, num_workers)
        except BaseException as error:  # re-raised below, its traceback kept
            failure = error
    if wait is not None:  # every process, whatever it found: each calls the barrier
        wait()
    if failure is not None:
        raise failure
    served = []
    for request, images in zip(requests, found, strict=True):
        if images is None:  # missing before: written since, by this process or another
            images = cache.read(request.key)
        if images is None:
            raise RuntimeError(
                f"{cache.folder(request.key)} was not written: the process that decodes for "
                "this node failed (its error says why)"
            )
        served.append(DecodedSplit(images, request.preprocessing))
    return served


def _write(cache: DecodedImageCache, missing: Sequence[DecodeRequest], num_workers: int) -> None:
    # the size from each split's first image: every image has its size (checked on write)
    first = [np.asarray(r.rows[0][0]) for r in missing]
    total = sum(len(r.rows) for r in missing)
    nbytes = sum(len(r.rows) * image.size for r, image in zip(missing, first, strict=True))
    count = len({r.key.task for r in missing})
    tasks = f"{count} task" + "s" * (count != 1)
    splits = "/".join(sorted({r.key.split for r in missing}))
    log.info(
        "decoding %d images (%s of %s) once, into %s (%s)",
        total, splits, tasks, cache.root, describe_size(nbytes),
    )  # fmt: skip
    with tqdm(total=total, desc="decoding images", unit="img", disable=None) as bar:
        for request in missing:
            loader = DataLoader(
                request.rows,
                batch_size=DECODE_BATCH,
                num_workers=num_workers,
                collate_fn=_columns,
            )
            cache.write(request.key, len(request.rows), _counted(loader, bar))


def _columns(samples: list[tuple[np.ndarray, int]]) -> tuple[tuple, tuple]:
    """A batch as (images, labels), unstacked: the cache checks each image's size."""
    return tuple(zip(*samples, strict=True))


def _counted(batches, bar):
    for batch in batches:
        yield batch
        bar.update(len(batch[1]))
