"""Scores already computed: how many samples of a task split a set of encoder weights
classifies right, kept so that a run that scores the same weights on the same samples
again (a later ``mergelab embedded``, a sweep's trials that share a setting, a rerun after
an interruption) reads the count instead of running the encoder.

An entry is ``<root>/<digest[:2]>/<digest>.json``, holding its :class:`ScoreKey` and the
counts; the digest is the key's, so any other weights, head, samples or computation get an
entry of their own. Entries are written to a temporary and renamed into place; one whose
key is not the one asked for (copied or edited) is refused by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from mergelab.engine.atomic import write_atomically
from mergelab.errors import BadValue
from mergelab.io.cache import CacheKey, check_cache_folder

FORMAT = 1


@dataclasses.dataclass(frozen=True)
class ScoreKey(CacheKey):
    """Everything a count of right answers is computed from.

    ``weights``: the encoder's weights (:func:`tensors_digest`); ``head``: the task's
    zero-shot head and logit scale; ``samples``: the decoded images of the split and which
    of them this process scores (its shard of a distributed run); ``computation``: the
    architecture, the transform, the precision, the device, the batch size and the
    versions of the libraries that compute it."""

    weights: str
    head: str
    samples: str
    computation: str
    format: int = FORMAT

    DIGEST_LENGTH = 32


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A digest of named tensors: their names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return digest.hexdigest()


class ScoreCache:
    """The folder of the entries; refused up front if it is a file or cannot be written."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        check_cache_folder(self.root, "the score cache", "--model.score_cache")

    def path(self, key: ScoreKey) -> Path:
        digest = key.digest()
        return self.root / digest[:2] / f"{digest}.json"

    def read(self, key: ScoreKey) -> tuple[int, int] | None:
        """(right, total) of ``key``, checked against it; None if there is none yet."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise BadValue(f"{path}: not a score entry ({error}); delete it") from None
        if entry.get("key") != dataclasses.asdict(key):
            raise BadValue(
                f"{path}: the scores of another key (a copied or edited entry); delete it"
            )
        right, total = entry.get("right"), entry.get("total")
        if not (isinstance(right, int) and isinstance(total, int) and 0 <= right <= total):
            raise BadValue(f"{path}: counts {right!r} of {total!r} are not a score; delete it")
        return right, total

    def write(self, key: ScoreKey, right: int, total: int) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"key": dataclasses.asdict(key), "right": right, "total": total}
        write_atomically(path, json.dumps(entry, indent=1))
