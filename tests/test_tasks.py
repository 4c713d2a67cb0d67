"""The task registry: the eight built-in tasks as the protocol lists them, and user tasks."""

import pytest
import yaml

from mergelab.lightning.data import TaskDataModule, protocol_split
from mergelab.tasks import EIGHT_TASKS, TALL14_TASKS, TALL20_TASKS, builtin_tasks, load_task

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
