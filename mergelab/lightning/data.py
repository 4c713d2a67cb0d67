"""One dataloader per task for train, validation and test, from hub datasets or local mirrors.

The validation split is the protocol's (task_vectors, src/datasets/common.py): 10 % of
the train split, at most 5000 samples, drawn with ``torch.randperm`` seeded with 0 as
``random_split`` does; the remaining samples are the training split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mergelab.tasks import EIGHT_TASKS, TaskSpec, load_task

VAL_FRACTION = 0.1
MAX_VAL_SAMPLES = 5000
SPLIT_SEED = 0


def protocol_split(num_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of a train split of ``num_train`` samples."""
    val_size = min(int(num_train * VAL_FRACTION), MAX_VAL_SAMPLES)
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return order[: num_train - val_size], order[num_train - val_size :]


def load_split(task: TaskSpec, split: str, dataset_root: str | os.PathLike | None = None):
    """A split of a task's dataset: a local folder, a mirror under ``dataset_root``, or the hub.

    Errors name the task, its file and what failed: a split the dataset lacks is reported
    with the task-file key that names it and the splits the dataset has.
    """
    import datasets

    location = task.dataset
    if dataset_root is not None and not Path(location).is_dir():
        location = str(Path(dataset_root) / task.dataset)
    local = Path(location).is_dir()
    where = "folder" if local else "hub dataset"
    cache_dir = _local_cache_dir(location) if local else None
    try:
        data = datasets.load_dataset(location, task.config, split=split, cache_dir=cache_dir)
    except Exception as err:  # offline, unknown id, missing split: name what failed
        available = _split_names(location, task.config) if _unknown_split(err) else None
        if available is not None and split not in available:
            keys = [k for k in ("train_split", "test_split") if getattr(task, k) == split]
            named_by = f"{' and '.join(keys) or 'split'} {split!r} in {_task_file(task)}"
            config = f" (config {task.config!r})" if task.config else ""
            raise ValueError(
                f"task {task.name!r}: cannot load split {split!r}: {named_by}, but {where} "
                f"{location!r}{config} has splits {available}"
            ) from err
        raise FileNotFoundError(
            f"task {task.name!r}: cannot load split {split!r} of {where} {location!r} "
            f"({type(err).__name__}: {err}; task file {_task_file(task)})"
        ) from err
    check_columns(task, data, split)
    return data


def _local_cache_dir(folder: str) -> str:
    """A ``datasets`` cache folder of its own for a local dataset folder and its files.

    ``datasets`` keys the cache of a local folder whose README declares configs by the
    folder's name and the declared file patterns only, so two mirrors of one dataset (or
    one mirror rewritten) would share a cache and the second would read the first's rows.
    Keying by the folder's path and its files' sizes and times keeps them apart."""
    import datasets

    root = Path(folder).resolve()
    digest = hashlib.sha256(str(root).encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"\0{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "mergelab-local" / digest.hexdigest()[:16])


def _task_file(task: TaskSpec) -> str:
    return task.source or "(no file)"


def _unknown_split(err: Exception) -> bool:
    """Whether ``datasets`` refused a split name (its message: 'Unknown split "x"')."""
    return isinstance(err, (ValueError, KeyError)) and "split" in str(err).lower()


def _split_names(location: str, config: str | None) -> list[str] | None:
    """The split names of a dataset, or None where they cannot be read (e.g. offline)."""
    import datasets

    try:
        return list(datasets.get_dataset_split_names(location, config))
    except Exception:
        return None


def check_columns(task: TaskSpec, data, split: str) -> None:
    """The image and label columns exist and every label names a class of the task.

    Where the label column is a ``ClassLabel`` (the dataset's own class names), it must
    have as many names as the task file's ``classnames``; with ``match_label_names`` the
    names must also agree one by one after :func:`~mergelab.tasks.label_name_key`. The
    first mismatch is named with the task file."""
    for column in (task.image_column, task.label_column):
        if column not in data.column_names:
            raise ValueError(
                f"task {task.name!r}: split {split!r} has no column {column!r} "
                f"(columns: {data.column_names}; task file {_task_file(task)})"
            )
    check_label_names(task, data.features[task.label_column], split)
    labels = data.unique(task.label_column)
    bad = [label for label in labels if not 0 <= int(label) < task.num_classes]
    if bad:
        raise ValueError(
            f"task {task.name!r}: split {split!r} has label {bad[0]} outside its "
            f"{task.num_classes} classes (classnames in {_task_file(task)})"
        )


def check_label_names(task: TaskSpec, feature, split: str) -> None:
    """The dataset's own class names (a ``ClassLabel`` feature) against the task file's."""
    import datasets

    from mergelab.tasks import label_name_key

    if not isinstance(feature, datasets.ClassLabel):
        return  # plain integers or booleans: only the range check applies
    names = list(feature.names)
    if len(names) != task.num_classes:
        unlisted = (
            f"; none for label {task.num_classes} ({names[task.num_classes]!r})"
            if len(names) > task.num_classes
            else ""
        )
        raise ValueError(
            f"task {task.name!r}: {_task_file(task)} lists {task.num_classes} classnames but "
            f"split {split!r} of {task.dataset!r} names {len(names)} classes in its "
            f"{task.label_column!r} column{unlisted}"
        )
    if not task.match_label_names:
        return
    for index, (ours, theirs) in enumerate(zip(task.classnames, names, strict=True)):
        if label_name_key(ours) != label_name_key(theirs):
            raise ValueError(
                f"task {task.name!r}: class {index} is {ours!r} in {_task_file(task)} but "
                f"{theirs!r} in split {split!r} of {task.dataset!r} (match_label_names "
                "compares names ignoring case, '_' and '-')"
            )


class SampleMemory:
    """Preprocessed samples of scored splits, kept in this process for its later runs (up
    to a budget of bytes): ``mergelab embedded`` runs every method in one process, and
    each would otherwise decode and preprocess the same images again. Only samples read
    in this process are kept (not those of dataloader worker processes)."""

    def __init__(self):
        self.splits: dict[tuple, dict[int, tuple[torch.Tensor, int]]] = {}
        self.used = 0

    def split(self, key: tuple) -> dict[int, tuple[torch.Tensor, int]]:
        """The kept samples of one split (position → sample), by what determines them."""
        return self.splits.setdefault(key, {})

    def keep(self, kept: dict, position: int, sample: tuple[torch.Tensor, int], budget: int):
        size = sample[0].numel() * sample[0].element_size()
        if self.used + size <= budget:
            kept[position] = sample
            self.used += size


SAMPLE_MEMORY = SampleMemory()


class TaskSplit(Dataset):
    """(image tensor, label) pairs of some rows of a hub dataset, preprocessed on access;
    with ``memory_budget`` (bytes), kept in :data:`SAMPLE_MEMORY` under ``key``."""

    def __init__(
        self,
        data,
        task: TaskSpec,
        indices: Sequence[int],
        transform: Callable,
        key: tuple | None = None,
        memory_budget: int = 0,
    ):
        self.data = data
        self.task = task
        self.indices = [int(i) for i in indices]
        self.transform = transform
        self.memory_budget = memory_budget
        self.kept = SAMPLE_MEMORY.split(key) if memory_budget and key else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        if self.kept is not None and i in self.kept:
            return self.kept[i]
        row = self.data[self.indices[i]]
        image = row[self.task.image_column].convert("RGB")
        sample = self.transform(image), int(row[self.task.label_column])
        if self.kept is not None:
            SAMPLE_MEMORY.keep(self.kept, i, sample, self.memory_budget)
        return sample


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
        keep_in_memory_mb: keep up to this many MiB of preprocessed validation and test
            samples in memory for the later runs of this process (``mergelab embedded``
            runs every method in one); 0 keeps none.
    """

    def __init__(
        self,
        tasks: Sequence[str] = EIGHT_TASKS,
        batch_size: int = 128,
        num_workers: int = 2,
        max_samples: int | None = None,
        dataset_root: str | None = None,
        test_splits: Sequence[str] = ("test",),
        keep_in_memory_mb: int = 0,
    ):
        super().__init__()
        if keep_in_memory_mb < 0:
            raise ValueError(f"keep_in_memory_mb must be ≥ 0, got {keep_in_memory_mb}")
        unknown = [s for s in test_splits if s not in ("val", "test")]
        if unknown or not test_splits:
            raise ValueError(f"test_splits takes 'val' and 'test', got {test_splits}")
        if max_samples is not None and max_samples <= 0:
            raise ValueError(f"max_samples must be positive, got {max_samples}")
        self.specs = [load_task(t) for t in tasks]
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"a task is listed twice: {names}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_samples = max_samples
        self.dataset_root = dataset_root
        self.test_splits = [s for s in ("val", "test") if s in test_splits]
        self.keep_in_memory_mb = keep_in_memory_mb
        self.transform_train: Callable | None = None
        self.transform_eval: Callable | None = None
        self._splits: dict[tuple[str, str], TaskSplit] = {}
        self._datasets: dict[tuple[str, str], object] = {}
        self._once: list[str] | None = None

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
            if name == "test":
                data = self._dataset(task, task.test_split)
                indices = torch.arange(len(data))
            else:
                data = self._dataset(task, task.train_split)
                train, val = protocol_split(len(data))
                indices = train if name == "train" else val
            indices = self._cap(indices)
            if name == "train":
                split = TaskSplit(data, task, indices, self.transform_train)
            else:  # scored: preprocessed the same way by every run, so worth keeping
                key = (
                    task,
                    name,
                    self.dataset_root,
                    tuple(indices.tolist()),
                    repr(self.transform_eval),
                )
                budget = self.keep_in_memory_mb << 20
                split = TaskSplit(data, task, indices, self.transform_eval, key, budget)
            self._splits[task.name, name] = split
        return self._splits[task.name, name]

    def samples_fingerprint(self, task: TaskSpec, name: str) -> str:
        """What determines the samples of a task's split: the task's definition, where its
        data is read from, and which rows are taken (a digest). Results computed from
        them, such as cached gradient statistics, are keyed by it."""
        split = self.split(task, name)
        identity = [dataclasses.asdict(task), self.dataset_root, name, split.indices]
        return hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:16]

    def _dataset(self, task: TaskSpec, split: str):
        """A hub split, loaded and checked once (train and val share the train split)."""
        if (task.name, split) not in self._datasets:
            self._datasets[task.name, split] = load_split(task, split, self.dataset_root)
        return self._datasets[task.name, split]

    def check_data(self, stage: str) -> None:
        """Load and check (columns, label range, class names) every hub split that
        ``stage`` scores, so that bad task data is named before any long work."""
        by_name = {task.name: task for task in self.specs}
        for task, split in self.plan(stage):
            spec = by_name[task]
            self._dataset(spec, spec.test_split if split == "test" else spec.train_split)

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
            **sampling,
        )

    def _world(self) -> tuple[int, int]:
        """(number of processes, this one's rank)."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _loaders(self, stage: str) -> list[DataLoader]:
        by_name = {task.name: task for task in self.specs}
        world, rank = self._world()
        loaders = []
        for task, split in self.plan(stage):
            data = self.split(by_name[task], split)
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
            raise KeyError(f"task {unknown[0]!r} is not one of the data module's {self.task_names}")
        self._once = list(tasks)

    def _loaders_once(self) -> CombinedLoader:
        by_name = {task.name: task for task in self.specs}
        world, rank = self._world()
        splits = [self.split(by_name[task], "train") for task in self._once]
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
