"""A task's dataset splits: loaded from a local folder, a mirror or the hub, checked against
the task file (columns, label range, class names), and the protocol's validation split.

The validation split is the protocol's (task_vectors, src/datasets/common.py): 10 % of
the train split, at most 5000 samples, drawn with ``torch.randperm`` seeded with 0 as
``random_split`` does; the remaining samples are the training split.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from mergelab.errors import BadValue, MissingFile
from mergelab.tasks import TaskSpec, label_name_key

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

    location = _location(task, dataset_root)
    local = Path(location).is_dir()
    where = "folder" if local else "hub dataset"
    cache_dir = _local_cache_dir(location) if local else None
    try:
        data = datasets.load_dataset(location, task.config, split=split, cache_dir=cache_dir)
    except (OSError, ValueError) as err:  # offline, unknown id, missing split (datasets' own)
        available = _split_names(location, task.config)
        if available is not None and split not in available:
            keys = [k for k in ("train_split", "test_split") if getattr(task, k) == split]
            named_by = f"{' and '.join(keys) or 'split'} {split!r} in {_task_file(task)}"
            config = f" (config {task.config!r})" if task.config else ""
            raise BadValue(
                f"task {task.name!r}: cannot load split {split!r}: {named_by}, but {where} "
                f"{location!r}{config} has splits {available}"
            ) from err
        raise MissingFile(
            f"task {task.name!r}: cannot load split {split!r} of {where} {location!r} "
            f"({type(err).__name__}: {err}; task file {_task_file(task)})"
        ) from err
    check_columns(task, data, split)
    return data


def dataset_fingerprint(task: TaskSpec, split: str, dataset_root: str | None, data) -> str:
    """What a loaded split's content is known by: the columns read, the split, and the
    dataset's files: for a local folder their names, sizes and times (wherever the folder
    lies, so that a moved or renamed copy keeps its fingerprint), for a hub dataset the
    files ``datasets`` keeps it in (their folders name the hub revision) and their sizes."""
    location = _location(task, dataset_root)
    identity = [task.image_column, task.label_column, task.config, split, len(data)]
    if Path(location).is_dir():
        identity.append(_files_digest(Path(location)).hexdigest())
    else:
        files = [Path(entry["filename"]) for entry in data.cache_files]
        # from the dataset's folder in the cache down, so that a moved cache keeps it
        identity += [f"{'/'.join(f.parts[-5:])}:{f.stat().st_size}" for f in files]
    return hashlib.sha256("\n".join(map(str, identity)).encode()).hexdigest()[:16]


def _location(task: TaskSpec, dataset_root: str | os.PathLike | None) -> str:
    """The folder or hub id a task's data is read from."""
    if dataset_root is not None and not Path(task.dataset).is_dir():
        return str(Path(dataset_root) / task.dataset)
    return task.dataset


def _files_digest(folder: Path):
    """A digest of the names, sizes and modification times of a folder's files."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"\0{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest


def _local_cache_dir(folder: str) -> str:
    """A ``datasets`` cache folder of its own for a local dataset folder and its files.

    ``datasets`` keys the cache of a local folder whose README declares configs by the
    folder's name and the declared file patterns only, so two mirrors of one dataset (or
    one mirror rewritten) would share a cache and the second would read the first's rows.
    Keying by the folder's path and its files' sizes and times keeps them apart."""
    import datasets

    root = Path(folder).resolve()
    digest = hashlib.sha256(f"{root}\0{_files_digest(root).hexdigest()}".encode())
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "mergelab-local" / digest.hexdigest()[:16])


def _task_file(task: TaskSpec) -> str:
    return task.source or "(no file)"


def _split_names(location: str, config: str | None) -> list[str] | None:
    """The split names of a dataset, or None where they cannot be read (e.g. offline)."""
    import datasets

    try:
        return list(datasets.get_dataset_split_names(location, config))
    except (OSError, ValueError):  # offline, or not a dataset it can read
        return None


def check_columns(task: TaskSpec, data, split: str) -> None:
    """The image and label columns exist and every label names a class of the task.

    Where the label column is a ``ClassLabel`` (the dataset's own class names), it must
    have as many names as the task file's ``classnames``; with ``match_label_names`` the
    names must also agree one by one after :func:`~mergelab.tasks.label_name_key`. The
    first mismatch is named with the task file."""
    for column in (task.image_column, task.label_column):
        if column not in data.column_names:
            raise BadValue(
                f"task {task.name!r}: split {split!r} has no column {column!r} "
                f"(columns: {data.column_names}; task file {_task_file(task)})"
            )
    check_label_names(task, data.features[task.label_column], split)
    labels = data.unique(task.label_column)
    bad = [label for label in labels if not 0 <= int(label) < task.num_classes]
    if bad:
        raise BadValue(
            f"task {task.name!r}: split {split!r} has label {bad[0]} outside its "
            f"{task.num_classes} classes (classnames in {_task_file(task)})"
        )


def check_label_names(task: TaskSpec, feature, split: str) -> None:
    """The dataset's own class names (a ``ClassLabel`` feature) against the task file's."""
    import datasets

    if not isinstance(feature, datasets.ClassLabel):
        return  # plain integers or booleans: only the range check applies
    names = list(feature.names)
    if len(names) != task.num_classes:
        unlisted = (
            f"; none for label {task.num_classes} ({names[task.num_classes]!r})"
            if len(names) > task.num_classes
            else ""
        )
        raise BadValue(
            f"task {task.name!r}: {_task_file(task)} lists {task.num_classes} classnames but "
            f"split {split!r} of {task.dataset!r} names {len(names)} classes in its "
            f"{task.label_column!r} column{unlisted}"
        )
    if not task.match_label_names:
        return
    for index, (ours, theirs) in enumerate(zip(task.classnames, names, strict=True)):
        if label_name_key(ours) != label_name_key(theirs):
            raise BadValue(
                f"task {task.name!r}: class {index} is {ours!r} in {_task_file(task)} but "
                f"{theirs!r} in split {split!r} of {task.dataset!r} (match_label_names "
                "compares names ignoring case, '_' and '-')"
            )
