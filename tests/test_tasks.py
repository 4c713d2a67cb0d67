"""The task registry: the eight built-in tasks as the protocol lists them, and user tasks."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import mirror

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
    from torch.utils.data import random_split

    for size in (50, 1234, 73257):
        train, val = protocol_split(size)
        expected_val = min(int(size * 0.1), 5000)
        ref_train, ref_val = random_split(
            range(size), [size - expected_val, expected_val], torch.Generator().manual_seed(0)
        )
        assert train.tolist() == list(ref_train.indices)
        assert val.tolist() == list(ref_val.indices)


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
