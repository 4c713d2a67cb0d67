"""Top-1 counts of the evaluation loop, and the ones it reads from the score cache instead
of running the encoder (:mod:`mergelab.io.scores`).

:class:`Top1` counts right answers and samples, summed over the ranks of a distributed run.
:class:`CachedScores` finds a (setting, task, split)'s counts in the cache on its first
batch; every rank keeps its own shard's counts, so ranks that read and ranks that compute
add up as ranks that all compute would.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import open_clip
import torch
from torchmetrics import Metric

from mergelab.io.cache import cache_root, text_digest
from mergelab.io.scores import ScoreCache, ScoreKey, tensors_digest

log = logging.getLogger(__name__)

Entry = tuple[str, str, str]  # (setting, task, split)


class Top1(Metric):
    """Top-1 accuracy over samples: right answers ÷ samples, each summed over ranks (the
    value of torchmetrics' ``MulticlassAccuracy(average="micro")``); counts made before
    (read from the score cache) are added as they are."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("right", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(
        self,
        logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        counts: tuple[int, int] | None = None,
    ) -> None:
        """A batch's logits and labels, or its (right, total) as counted before."""
        if counts is not None:
            self.right += counts[0]
            self.total += counts[1]
        else:
            self.right += (logits.argmax(dim=-1) == labels).sum()
            self.total += labels.numel()

    def compute(self) -> torch.Tensor:
        if int(self.total) == 0:
            return torch.tensor(0.0)
        return self.right.float() / self.total.float()

    def counts(self) -> tuple[int, int]:
        """This rank's (right, total), before any sum over ranks."""
        return int(self.right), int(self.total)


def open_score_cache(setting: bool | str) -> ScoreCache | None:
    """``--model.score_cache``: true ($MERGELAB_CACHE/scores), a folder, or false."""
    if setting is False:
        return None
    return ScoreCache(cache_root() / "scores" if setting is True else Path(setting))


class CachedScores:
    """The score cache as one evaluation loop uses it: which entries it read, and the keys
    of those it computes, written when the loop ends.

    ``computation`` describes what turns weights and images into logits (architecture,
    transform, precision, device, batch size); library versions are added here."""

    def __init__(self, cache: ScoreCache, computation: dict):
        versions = {lib: importlib.metadata.version(lib) for lib in ("torch", "mergelab")}
        versions["open_clip"] = open_clip.__version__
        self.cache = cache
        self.computation = text_digest({**computation, "versions": versions})
        self.read: set[Entry] = set()
        self.keys: dict[Entry, ScoreKey | None] = {}
        self._digests: dict[object, str] = {}

    def digest(self, owner: object, tensors) -> str:
        """The digest of ``tensors``, computed once per ``owner``."""
        if owner not in self._digests:
            self._digests[owner] = tensors_digest(tensors)
        return self._digests[owner]

    def looked_up(self, entry: Entry) -> bool:
        return entry in self.keys

    def look_up(self, entry: Entry, key: ScoreKey | None, metric: Top1) -> None:
        """Find ``entry`` (None: its samples are not cacheable); add what was read."""
        self.keys[entry] = key
        counts = None if key is None else self.cache.read(key)
        if counts is not None:
            metric.update(counts=counts)
            self.read.add(entry)

    def key(self, weights: str, head: str, samples: str) -> ScoreKey:
        return ScoreKey(weights=weights, head=head, samples=samples, computation=self.computation)

    def write(self, metrics: dict[Entry, Top1]) -> None:
        """Every computed entry's counts of this rank, at the end of its loop."""
        for entry, key in self.keys.items():
            if key is not None and entry not in self.read:
                self.cache.write(key, *metrics[entry].counts())
        if self.read:
            log.info(
                "%d of %d scores read from the score cache %s (--model.score_cache=false "
                "computes them anew)",
                len(self.read),
                len(self.keys),
                self.cache.root,
            )
