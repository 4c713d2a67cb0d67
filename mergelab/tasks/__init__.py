"""Classification tasks as data: one YAML file per task (hub dataset, columns, class names,
prompt templates). The twenty tasks of the TALL suites ship in ``builtin/``; a user adds a
task by writing a file of the same schema and naming its path wherever a task name is
accepted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from mergelab.errors import BadValue, MissingFile, MissingKey

BUILTIN = Path(__file__).with_name("builtin")

# The eight vision tasks of Ilharco et al. (2023) in the protocol's order.
EIGHT_TASKS = ("sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
# The 14- and 20-task suites of Wang et al. (2024, TALL masks) in the paper's order: the eight,
# then six, then six more (FusionBench's TALL14/TALL20 lists; "-" in its names is "_" here).
TALL14_TASKS = (
    *EIGHT_TASKS,
    "oxford_flowers102",
    "pcam",
    "fer2013",
    "oxford_iiit_pet",
    "stl10",
    "cifar100",
)
TALL20_TASKS = (
    *TALL14_TASKS,
    "cifar10",
    "food101",
    "fashion_mnist",
    "emnist_letters",
    "kmnist",
    "rendered_sst2",
)


@dataclass(frozen=True)
class TaskSpec:
    """Everything that defines a task: where its images are and how its classes are named.

    ``test_split`` is the hub split scored as test (``validation`` where a dataset has no
    test split); validation is always carved from ``train_split``. ``image_column`` and
    ``label_column`` name the columns as the hub dataset has them. Where the label column
    is a ``ClassLabel``, a load checks that it has as many names as ``classnames``; with
    ``match_label_names`` it also compares the names themselves, ignoring case and
    treating ``_`` and ``-`` as spaces (see :func:`label_name_key`).
    """

    name: str
    dataset: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    config: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    match_label_names: bool = False
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, classname: str) -> list[str]:
        return [template.format(c=classname) for template in self.templates]


_REQUIRED = ("name", "dataset", "classnames", "templates")
_ALLOWED = {f.name for f in fields(TaskSpec)} - {"source"}


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in BUILTIN.glob("*.yaml"))


def load_task(name_or_path: str | os.PathLike) -> TaskSpec:
    """A built-in task by name, or a task from a YAML file path.

    A ``dataset`` that starts with ``./`` or ``../`` is a folder relative to the file.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = BUILTIN / f"{name_or_path}.yaml"
        if not path.is_file():
            raise MissingKey(
                f"unknown task {str(name_or_path)!r}: built-in tasks are {builtin_tasks()}, "
                "or give the path of a task YAML file"
            )
    elif not path.is_file():
        raise MissingFile(f"task file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise BadValue(f"task file {path} is not valid YAML: {err}") from err
    if isinstance(data, dict) and str(data.get("dataset", "")).startswith(("./", "../")):
        data["dataset"] = str((path.parent / data["dataset"]).resolve())
    return parse_task(data, source=str(path))


def parse_task(data: object, source: str) -> TaskSpec:
    """Check a task's fields (naming the file and key on error) and build its spec."""
    if not isinstance(data, dict):
        raise BadValue(f"{source}: expected a mapping of task fields")
    unknown = sorted(set(data) - _ALLOWED)
    if unknown:
        raise BadValue(f"{source}: unknown key {unknown[0]!r}; allowed: {sorted(_ALLOWED)}")
    missing = [key for key in _REQUIRED if not data.get(key)]
    if missing:
        raise BadValue(f"{source}: missing {missing[0]!r}")
    classnames = tuple(str(c) for c in data["classnames"])
    if len(set(classnames)) != len(classnames):
        duplicate = next(c for c in classnames if classnames.count(c) > 1)
        raise BadValue(f"{source}: class name {duplicate!r} appears twice")
    for key in ("train_split", "test_split", "image_column", "label_column"):
        if key in data and not (isinstance(data[key], str) and data[key]):
            raise BadValue(f"{source}: {key} must be a non-empty string, got {data[key]!r}")
    if not isinstance(data.get("match_label_names", False), bool):
        raise BadValue(
            f"{source}: match_label_names must be true or false, got {data['match_label_names']!r}"
        )
    templates = tuple(str(t) for t in data["templates"])
    for template in templates:
        if "{c}" not in template:
            raise BadValue(f"{source}: template {template!r} lacks the placeholder {{c}}")
    fields_ = {k: v for k, v in data.items() if k not in ("classnames", "templates")}
    return TaskSpec(**fields_, classnames=classnames, templates=templates, source=source)


def label_name_key(name: str) -> str:
    """A class name as ``match_label_names`` compares it: lower case, ``_`` and ``-`` as
    spaces, runs of spaces as one (``"Apple_pie"`` and ``"apple pie"`` match)."""
    return " ".join(name.casefold().replace("_", " ").replace("-", " ").split())
