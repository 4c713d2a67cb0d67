"""One dataloader per task for train, validation and test, from hub datasets or local
mirrors (read by :mod:`mergelab.tasks.splits`, which also holds the protocol's
validation split); the splits read with the evaluation transform come from the
decoded-image cache (:mod:`mergelab.lightning.decoded`), decoded once per machine."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mergelab.errors import BadValue, MissingKey
from mergelab.io.cache import cache_root
from mergelab.io.decoded_images import DecodedImageCache, DecodedKey
from mergelab.lightning.decoded import (
    DecodedSplit,
    DecodeRequest,
    as_served,
    rows_digest,
    serve_decoded,
)
from mergelab.tasks import EIGHT_TASKS, TaskSpec, load_task
from mergelab.tasks.preprocessing import CachedPreprocessing
from mergelab.tasks.splits import SPLIT_SEED, dataset_fingerprint, load_split, protocol_split

log = logging.getLogger(__name__)


class TaskSplit(Dataset):
    """(image tensor, label) pairs of some rows of a hub dataset, preprocessed on access."""

    def __init__(self, data, task: TaskSpec, indices: Sequence[int], transform: Callable):
        self.data = data
        self.task = task
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        row = self.data[self.indices[i]]
        image = row[self.task.image_column].convert("RGB")
        return self.transform(image), int(row[self.task.label_column])


class ShardSampler(DistributedSampler):
    """Rank r of n takes samples r, r + n, r + 2n, ... in order: disjoint and unpadded.

    DistributedSampler pads the last round so that every rank gets as many samples, which
    counts some samples twice; statistics over samples need each exactly once. Being a
    DistributedSampler, Lightning keeps it instead of substituting its own."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.total_size = len(dataset)
        self.num_samples = len(range(rank, self.total_size, num_replicas))

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))


class TaskDataModule(L.LightningDataModule):
    """Train, validation and test dataloaders for each task, in the order of ``tasks``.

    Args:
        tasks: built-in task names or paths of task YAML files.
        batch_size: images per batch.
        num_workers: dataloader worker processes per loader.
        max_samples: keep at most this many samples per task and split (a seeded random
            subset), for quick runs; None keeps all.
        dataset_root: a folder of local dataset mirrors in the hub layout
            (``<root>/<org>/<name>/data/*.parquet``) used instead of the hub.
        test_splits: the splits a test run scores (validation first, whatever the order
            given); with ``[val, test]`` every setting is scored on validation and the
            one picked there on test.
        decoded_cache: keep the preprocessed images of every split read with the
            evaluation transform (uint8 at the model's resolution) on disk, decoded once
            per machine and read by every later run, sweep trial and process: true (the
            ``decoded_images`` folder of $MERGELAB_CACHE, else ~/.cache/mergelab), a
            folder, or false (decode on every read).
    """

    def __init__(
        self,
        tasks: Sequence[str] = EIGHT_TASKS,
        batch_size: int = 128,
        num_workers: int = 2,
        max_samples: int | None = None,
        dataset_root: str | None = None,
        test_splits: Sequence[str] = ("test",),
        decoded_cache: bool | str = True,
    ):
        super().__init__()
        unknown = [s for s in test_splits if s not in ("val", "test")]
        if unknown or not test_splits:
            raise BadValue(f"test_splits takes 'val' and 'test', got {test_splits}")
        if max_samples is not None and max_samples <= 0:
            raise BadValue(f"max_samples must be positive, got {max_samples}")
        self.specs = [load_task(t) for t in tasks]
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise BadValue(f"a task is listed twice: {names}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_samples = max_samples
        self.dataset_root = dataset_root
        self.test_splits = [s for s in ("val", "test") if s in test_splits]
        self.decoded = _decoded_cache(decoded_cache)
        self.transform_train: Callable | None = None
        self.transform_eval: Callable | None = None
        self._splits: dict[tuple[str, str], TaskSplit] = {}
        self._datasets: dict[tuple[str, str], object] = {}
        self._once: list[str] | None = None
        self._cut_transform: tuple[Callable, CachedPreprocessing | None] | None = None
        self._decoded_keys: dict[tuple[str, str], DecodedKey] = {}

    @property
    def task_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def set_transforms(self, train: Callable, evaluation: Callable) -> None:
        self.transform_train, self.transform_eval = train, evaluation

    def _cap(self, indices: torch.Tensor) -> torch.Tensor:
        if self.max_samples is None or len(indices) <= self.max_samples:
            return indices
        keep = torch.randperm(len(indices), generator=torch.Generator().manual_seed(SPLIT_SEED))
        return indices[keep[: self.max_samples].sort().values]

    def split(self, task: TaskSpec, name: str) -> TaskSplit:
        """The ``train``, ``val`` or ``test`` split of a task, loaded once."""
        if (task.name, name) not in self._splits:
            if self.transform_eval is None:
                raise RuntimeError("TaskDataModule needs set_transforms() before loading data")
            data, indices = self._rows(task, name)
            transform = self.transform_train if name == "train" else self.transform_eval
            self._splits[task.name, name] = TaskSplit(data, task, indices, transform)
        return self._splits[task.name, name]

    def _rows(self, task: TaskSpec, name: str) -> tuple[object, torch.Tensor]:
        """The hub split that a task's ``train``, ``val`` or ``test`` split reads, and
        which of its rows it takes."""
        if name == "test":
            data = self._dataset(task, task.test_split)
            indices = torch.arange(len(data))
        else:
            data = self._dataset(task, task.train_split)
            train, val = protocol_split(len(data))
            indices = train if name == "train" else val
        return data, self._cap(indices)

    def samples_fingerprint(self, task: TaskSpec, name: str) -> str:
        """What determines the samples of a task's split: the task's definition, where its
        data is read from, and which rows are taken (a digest). Results computed from
        them, such as cached gradient statistics, are keyed by it."""
        split = self.split(task, name)
        identity = [dataclasses.asdict(task), self.dataset_root, name, split.indices]
        return hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:16]

    def served_samples(self, task: str, split: str) -> str | None:
        """What this process's loader of a task's split serves, once served from the
        decoded-image cache: the entry's digest and this rank's shard of it (scores of
        those samples can be kept, :mod:`mergelab.io.scores`); None when the split is
        decoded on every read."""
        key = self._decoded_keys.get((task, split))
        if key is None:
            return None
        world, rank = self._world()
        return f"{key.digest()} shard {rank} of {world}"

    def _dataset(self, task: TaskSpec, split: str):
        """A hub split, loaded and checked once (train and val share the train split)."""
        if (task.name, split) not in self._datasets:
            self._datasets[task.name, split] = load_split(task, split, self.dataset_root)
        return self._datasets[task.name, split]

    def check_data(self, stage: str) -> None:
        """Load and check (columns, label range, class names) every hub split that
        ``stage`` scores, and that each holds a sample for every process, so that bad
        task data is named before any long work."""
        by_name = {task.name: task for task in self.specs}
        world, _ = self._world()
        for task, split in self.plan(stage):
            _, indices = self._rows(by_name[task], split)
            if not len(indices):  # it would score 0 % and, on val, decide the pick
                source = by_name[task].test_split if split == "test" else by_name[task].train_split
                raise BadValue(
                    f"task {task!r}: its {split} split has no samples (hub split {source!r} "
                    f"of {by_name[task].dataset}); give it data or leave {split!r} out of "
                    "--data.test_splits"
                )
            classes = by_name[task].num_classes
            if split != "train" and len(indices) < classes:  # a split that scores
                raise BadValue(
                    f"task {task!r}: its {split} split has {len(indices)} samples, fewer than "
                    f"its {classes} classes, so it cannot hold one of each and its accuracy "
                    "measures little; give it more data (or raise --data.max_samples)"
                )
            # a process with no sample would leave the loop while the others wait for it
            # at the metrics' synchronisation
            if world > 1 and len(indices) < world:
                count = f"{len(indices)} {split} sample" + "s" * (len(indices) != 1)
                raise BadValue(
                    f"task {task!r}: {count}, fewer than the {world} processes of this run, "
                    "which each score at least one (run on fewer devices, or raise "
                    "--data.max_samples)"
                )

    def plan(self, stage: str) -> list[tuple[str, str]]:
        """(task, split) of each dataloader of a stage (``train``, ``val`` or ``test``):
        split by split, so that a test run's validation data all comes before its test
        data (its settings are picked on validation, then the pick is scored on test)."""
        splits = self.test_splits if stage == "test" else [stage]
        return [(task.name, split) for split in splits for task in self.specs]

    def _loader(self, dataset: Dataset, **sampling) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            collate_fn=as_served if isinstance(dataset, DecodedSplit) else None,
            **sampling,
        )

    def _world(self) -> tuple[int, int]:
        """(number of processes, this one's rank)."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _served(self, plan: Sequence[tuple[str, str]]) -> list[Dataset]:
        """The datasets of ``plan``'s (task, split): read from the decoded-image cache
        where the split's transform is deterministic (the evaluation transform) and can
        be cut there (:class:`CachedPreprocessing`), else decoded on every read."""
        by_name = {task.name: task for task in self.specs}
        served: list[Dataset] = [self.split(by_name[task], split) for task, split in plan]
        requests = {}
        for i, (task, split) in enumerate(plan):
            request = self._decode_request(by_name[task], split, served[i])
            if request is not None:
                requests[i] = request
                self._decoded_keys[task, split] = request.key
        if not requests:
            return served
        trainer = self.trainer
        distributed = trainer is not None and trainer.world_size > 1
        decoded = serve_decoded(
            self.decoded,
            list(requests.values()),
            self.num_workers,
            writes=trainer is None or trainer.local_rank == 0,  # one process per node
            wait=trainer.strategy.barrier if distributed else None,
        )
        for i, dataset in zip(requests, decoded, strict=True):
            served[i] = dataset
        return served

    def _decode_request(self, task: TaskSpec, name: str, split: TaskSplit) -> DecodeRequest | None:
        # a training transform draws at random (crops, flips), unless it is the
        # evaluation one (gradient statistics read the train split with it)
        if self.decoded is None or split.transform is not self.transform_eval:
            return None
        if not split.indices:  # nothing to decode (check_data names it where it matters)
            return None
        preprocessing = self._preprocessing()
        if preprocessing is None:
            return None
        source = task.test_split if name == "test" else task.train_split
        key = DecodedKey(
            task=task.name,
            split=name,
            dataset=dataset_fingerprint(task, source, self.dataset_root, split.data),
            rows=rows_digest(torch.tensor(split.indices)),
            preprocessing=preprocessing.description,
        )
        rows = TaskSplit(split.data, task, split.indices, preprocessing.decode)
        return DecodeRequest(rows, key, preprocessing)

    def _preprocessing(self) -> CachedPreprocessing | None:
        if self._cut_transform is None or self._cut_transform[0] is not self.transform_eval:
            cut = CachedPreprocessing.of(self.transform_eval)
            if cut is None:
                log.info(
                    "the evaluation transform %r is not a torchvision Compose with ToTensor "
                    "whose steps show their settings: its images are decoded on every read",
                    self.transform_eval,
                )
            self._cut_transform = (self.transform_eval, cut)
        return self._cut_transform[1]

    def _loaders(self, stage: str) -> list[DataLoader]:
        world, rank = self._world()
        loaders = []
        plan = self.plan(stage)
        for (_, split), data in zip(plan, self._served(plan), strict=True):
            if split == "train":
                loaders.append(self._loader(data, shuffle=True))
            else:  # scored: each sample exactly once over all ranks, in order
                loaders.append(self._loader(data, sampler=ShardSampler(data, world, rank)))
        return loaders

    def serve_train_once(self, tasks: Sequence[str]) -> None:
        """Make the train dataloader walk each of ``tasks``' train split exactly once, for
        statistics over samples: unshuffled, each rank of a distributed run a disjoint,
        unpadded share, the tasks side by side: the i-th batch is ([each task's i-th batch,
        or None for a task already done], i)."""
        unknown = [t for t in tasks if t not in self.task_names]
        if unknown:
            raise MissingKey(
                f"task {unknown[0]!r} is not one of the data module's {self.task_names}"
            )
        self._once = list(tasks)

    def _loaders_once(self) -> CombinedLoader:
        world, rank = self._world()
        splits = self._served([(task, "train") for task in self._once])
        loaders = [self._loader(s, sampler=ShardSampler(s, world, rank)) for s in splits]
        # Lightning synchronises the ranks at every training step, so every rank takes as
        # many steps as rank 0, which has the most batches (shards differ by at most one
        # sample): a range of that length paces the loaders, which give None when done
        steps = max(
            (math.ceil(math.ceil(len(s) / world) / self.batch_size) for s in splits), default=0
        )
        return CombinedLoader((loaders, range(steps)), "max_size")

    def train_dataloader(self) -> list[DataLoader] | CombinedLoader:
        return self._loaders("train") if self._once is None else self._loaders_once()

    def val_dataloader(self) -> list[DataLoader]:
        return self._loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._loaders("test")


def _decoded_cache(setting: bool | str) -> DecodedImageCache | None:
    if setting is False:
        return None
    return DecodedImageCache(cache_root() / "decoded_images" if setting is True else setting)
