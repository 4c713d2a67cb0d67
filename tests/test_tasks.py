"""The task registry: the eight built-in tasks as the protocol lists them, and user tasks."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import mirror

from mergelab.lightning import data as data_module
from mergelab.lightning.data import TaskDataModule
from mergelab.tasks import EIGHT_TASKS, TALL14_TASKS, TALL20_TASKS, builtin_tasks, load_task
from mergelab.tasks.splits import protocol_split

# class and template counts of the task_vectors protocol (REFERENCE §3)
COUNTS = {
    "sun397": (397, 2),
    "stanford_cars": (196, 8),
    "resisc45": (45, 18),
    "eurosat": (10, 3),
    "svhn": (10, 1),
    "gtsrb": (43, 3),
    "mnist": (10, 1),
    "dtd": (47, 8),
}


def test_builtin_tasks_match_the_protocol():
    assert sorted(TALL20_TASKS) == builtin_tasks()
    assert TALL20_TASKS[:14] == TALL14_TASKS and TALL14_TASKS[:8] == EIGHT_TASKS
    for name, (classes, templates) in COUNTS.items():
        spec = load_task(name)
        assert (spec.num_classes, len(spec.templates)) == (classes, templates), name
        assert len(spec.prompts(spec.classnames[0])) == templates
    assert load_task("svhn").config == "cropped_digits"
    assert load_task("mnist").prompts("7") == ['a photo of the number: "7".']


def test_user_task_from_yaml(tmp_path):
    path = tmp_path / "shapes.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "shapes",
                "dataset": str(tmp_path / "shapes_data"),
                "classnames": ["circle", "square"],
                "templates": ["a drawing of a {c}."],
            }
        )
    )
    spec = load_task(path)
    assert spec.prompts("square") == ["a drawing of a square."]
    assert TaskDataModule(tasks=[str(path), "mnist"]).task_names == ["shapes", "mnist"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"templates": ["no placeholder"]}, "lacks the placeholder"),
        ({"classnames": ["a", "a"]}, "class name 'a' appears twice"),
        ({"dataset": None}, "missing 'dataset'"),
    ],
)
def test_bad_task_file_names_file_and_key(tmp_path, change, message):
    data = {"name": "t", "dataset": "x/y", "classnames": ["a", "b"], "templates": ["{c}"]}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data | change))
    with pytest.raises(ValueError, match=message) as info:
        load_task(path)
    assert str(path) in str(info.value)


def test_validation_split_is_the_protocols():
    """10 % of train, at most 5000, from randperm seeded with 0, as random_split does."""
    import torch
    from torch.utils.data import random_split

    for size in (50, 1234, 73257):
        train, val = protocol_split(size)
        expected_val = min(int(size * 0.1), 5000)
        ref_train, ref_val = random_split(
            range(size), [size - expected_val, expected_val], torch.Generator().manual_seed(0)
        )
        assert train.tolist() == list(ref_train.indices)
        assert val.tolist() == list(ref_val.indices)


def test_scored_samples_are_kept_for_the_next_run_within_their_budget(tmp_path, monkeypatch):
    """``keep_in_memory_mb``: a second data module over the same split reads the samples
    the first preprocessed (no decoding), equal to freshly preprocessed ones; no more are
    kept than the budget holds, and none without one."""
    mirror.write_three_tasks(tmp_path, {"train": 110, "test": 41})
    monkeypatch.setattr(data_module, "SAMPLE_MEMORY", data_module.SampleMemory())
    decoded = []

    def transform(image):  # 3 × 128 × 128 float32: 192 KiB a sample
        decoded.append(1)
        pixels = np.asarray(image.resize((128, 128)), dtype=np.float32)
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()

    def read(budget_mb: int) -> list:
        module = TaskDataModule(["mnist"], num_workers=0, dataset_root=str(tmp_path),
                                keep_in_memory_mb=budget_mb)  # fmt: skip
        module.set_transforms(transform, transform)
        split = module.split(module.specs[0], "test")
        return [split[i] for i in range(len(split))]

    first, second = read(8), read(8)  # 8 MiB hold 42 samples: all 41 are kept
    assert len(decoded) == 41  # the second read decoded nothing
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, second, strict=True))
    assert data_module.SAMPLE_MEMORY.used == 41 * 3 * 128 * 128 * 4

    monkeypatch.setattr(data_module, "SAMPLE_MEMORY", data_module.SampleMemory())
    decoded.clear()
    read(1), read(1)  # 1 MiB holds 5 samples: the others are decoded on both reads
    assert len(data_module.SAMPLE_MEMORY.splits) == 1
    assert len(next(iter(data_module.SAMPLE_MEMORY.splits.values()))) == 5
    assert len(decoded) == 41 + 36
    decoded.clear()
    read(0), read(0)  # no budget: nothing kept
    assert len(decoded) == 82

    # the mirror rewritten in place with other images: its samples are decoded, not served
    monkeypatch.setattr(data_module, "SAMPLE_MEMORY", data_module.SampleMemory())
    before = read(8)
    mirror.write_dataset(tmp_path, "ylecun/mnist", 10, {"train": 110, "test": 41}, seed=7)
    decoded.clear()
    after = read(8)
    assert len(decoded) == 41
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(before, after, strict=True))


def test_a_split_smaller_than_the_processes_is_refused_before_scoring(tmp_path):
    """Every process of a distributed run scores at least one sample of each split: one
    with none would leave the test loop while the others wait for it."""
    mirror.write_three_tasks(tmp_path, {"train": 110, "test": 41})
    module = TaskDataModule(["mnist", "svhn"], num_workers=0, dataset_root=str(tmp_path),
                            max_samples=10, test_splits=["val", "test"])  # fmt: skip
    module.trainer = SimpleNamespace(world_size=10, global_rank=0)  # as Lightning sets it
    module.check_data("test")  # 10 samples for 10 processes
    module.trainer = SimpleNamespace(world_size=11, global_rank=0)
    with pytest.raises(ValueError, match=r"'mnist': 10 val samples, fewer than the 11 processes"):
        module.check_data("test")
    module.trainer = None  # one process: any size that holds every class
    module.check_data("test")


def test_a_scored_split_smaller_than_its_classes_is_refused(tmp_path):
    """A validation or test split cannot hold one sample per class: refused, naming task,
    split and counts; a train split of any size is taken (fit reads it whole)."""
    mirror.write_three_tasks(tmp_path, {"train": 110, "test": 41})
    module = TaskDataModule(["mnist"], num_workers=0, dataset_root=str(tmp_path),
                            max_samples=9, test_splits=["val", "test"])  # fmt: skip
    with pytest.raises(
        ValueError, match=r"'mnist': its val split has 9 samples, fewer than its 10"
    ):
        module.check_data("test")
    module.check_data("train")
