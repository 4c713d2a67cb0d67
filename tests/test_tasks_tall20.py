"""The twelve tasks the TALL suites add, on tiny mirrors of their hub datasets in each one's
own layout (renamed columns, boolean labels, a config, a validation split scored as test),
loaded offline through the real loader; and the errors a wrong task file gets."""

from pathlib import Path

import mirror
import numpy as np
import pytest
import torch
import yaml

from mergelab.lightning.data import TaskDataModule
from mergelab.tasks import EIGHT_TASKS, TALL14_TASKS, TALL20_TASKS, builtin_tasks, load_task
from mergelab.tasks.splits import load_split, protocol_split

NEW_TASKS = TALL20_TASKS[8:]
ROWS = 12  # per split: few enough to stay fast, enough for a validation sample (10 %)

# classes and templates of each protocol list (FusionBench's class-name modules and the
# TALL reference templates, which agree on every template)
COUNTS = {
    "oxford_flowers102": (102, 1),
    "pcam": (2, 1),
    "fer2013": (7, 6),
    "oxford_iiit_pet": (37, 1),
    "stl10": (10, 2),
    "cifar100": (100, 18),
    "cifar10": (10, 18),
    "food101": (101, 1),
    "fashion_mnist": (10, 2),
    "emnist_letters": (26, 1),
    "kmnist": (10, 1),
    "rendered_sst2": (2, 1),
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A dataset root with the twelve mirrors, written once for the module."""
    root = tmp_path_factory.mktemp("tall-hub")
    for seed, (task, layout) in enumerate(mirror.tall_layouts().items()):
        mirror.write_layout(root, layout, ROWS, load_task(task).num_classes, seed=seed)
    return root


def test_suites_in_the_papers_order():
    assert TALL14_TASKS[:8] == EIGHT_TASKS and TALL20_TASKS[:14] == TALL14_TASKS
    assert len(set(TALL20_TASKS)) == 20
    assert set(TALL20_TASKS) <= set(builtin_tasks())
    for name, (classes, templates) in COUNTS.items():
        spec = load_task(name)
        assert spec.name == name
        assert (spec.num_classes, len(spec.templates)) == (classes, templates), name
    assert load_task("kmnist").prompts("お") == ["a photo of the character お."]
    assert load_task("cifar100").classnames[26] == "cra"  # as the checkpoints' heads spell it
    assert load_task("fer2013").classnames[4] == "neutral"  # FusionBench's order, not TALL's


@pytest.mark.parametrize("task", NEW_TASKS)
def test_task_loads_from_its_hub_layout(hub, task):
    """Both splits a run reads load through load_split; the dataset's own class list (a
    ClassLabel) has as many names as the task file's, and matches it where the file says."""
    import datasets

    spec = load_task(task)
    layout = mirror.tall_layouts()[task]
    assert {spec.train_split, spec.test_split} <= set(layout.splits)
    for split in (spec.train_split, spec.test_split):
        data = load_split(spec, split, hub)
        assert len(data) == ROWS
        feature = data.features[spec.label_column]
        if isinstance(feature, datasets.ClassLabel):
            assert feature.num_classes == spec.num_classes
        labels = [int(v) for v in data.unique(spec.label_column)]
        assert min(labels) >= 0 and max(labels) < spec.num_classes
        assert data[0][spec.image_column].size == (32, 32)


def test_data_module_serves_the_twelve(hub):
    """The twelve through TaskDataModule: protocol validation from train, test from each
    task's test split (food101's "validation"), images and labels as the merge loop gets them."""

    def to_tensor(image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)

    dm = TaskDataModule(NEW_TASKS, batch_size=8, num_workers=0, dataset_root=str(hub))
    dm.set_transforms(to_tensor, to_tensor)
    assert dm.task_names == list(NEW_TASKS)
    for spec in dm.specs:
        val, test = dm.split(spec, "val"), dm.split(spec, "test")
        assert len(val) == len(protocol_split(ROWS)[1]) and len(test) == ROWS
        image, label = test[0]
        assert image.shape == (3, 32, 32) and 0 <= label < spec.num_classes
    loaders = dm.test_dataloader()
    assert len(loaders) == len(NEW_TASKS)
    images, labels = next(iter(loaders[NEW_TASKS.index("fer2013")]))
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.int64


def task_file(tmp_path: Path, task: str, **change) -> Path:
    """A copy of a built-in task file with some fields changed."""
    data = yaml.safe_load(Path(load_task(task).source).read_text(encoding="utf-8"))
    path = tmp_path / f"{task}_edited.yaml"
    path.write_text(yaml.safe_dump(data | change, allow_unicode=True))
    return path


def test_class_list_shorter_than_the_datasets_labels(hub, tmp_path):
    stl10 = load_task("stl10")
    path = task_file(tmp_path, "stl10", classnames=list(stl10.classnames[:9]))
    with pytest.raises(ValueError) as info:
        load_split(load_task(path), "train", hub)
    message = str(info.value)
    assert "task 'stl10'" in message and str(path) in message
    assert "lists 9 classnames" in message and "names 10 classes" in message
    assert "'truck'" in message  # the dataset's name for the label left without a class

    # without a ClassLabel (fer2013's integer 'cls'), the labels themselves are checked
    fer = load_task("fer2013")
    path = task_file(tmp_path, "fer2013", classnames=list(fer.classnames[:6]))
    with pytest.raises(ValueError, match=r"task 'fer2013'.*label 6 outside its 6 classes") as info:
        load_split(load_task(path), "test", hub)
    assert str(path) in str(info.value)


def test_split_the_dataset_does_not_have(hub, tmp_path):
    path = task_file(tmp_path, "food101", test_split="test")
    spec = load_task(path)
    with pytest.raises(ValueError) as info:
        load_split(spec, "test", hub)
    message = str(info.value)
    assert "task 'food101'" in message and "test_split 'test'" in message
    assert str(path) in message and "['train', 'validation']" in message
    # the same through the data module, as a run meets it
    dm = TaskDataModule([str(path)], num_workers=0, dataset_root=str(hub))
    dm.set_transforms(lambda image: image, lambda image: image)
    with pytest.raises(ValueError, match=r"test_split 'test'"):
        dm.split(spec, "test")

    path = task_file(tmp_path, "pcam", train_split="validation")
    with pytest.raises(ValueError) as info:
        load_split(load_task(path), "validation", hub)
    assert "train_split 'validation'" in str(info.value) and "'valid'" in str(info.value)


def test_label_names_compared_where_the_task_file_says(hub, tmp_path):
    # kmnist's hub labels are hiragana; TALL's romanised names do not match them
    romanised = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
    path = task_file(tmp_path, "kmnist", classnames=romanised)
    with pytest.raises(ValueError) as info:
        load_split(load_task(path), "train", hub)
    message = str(info.value)
    assert "task 'kmnist'" in message and str(path) in message
    assert "class 0 is 'o'" in message and "'お'" in message
    # off, only the count is compared
    path = task_file(tmp_path, "kmnist", classnames=romanised, match_label_names=False)
    assert len(load_split(load_task(path), "train", hub)) == ROWS
    # food101's hub names use underscores ("apple_pie"): equal after normalising
    assert load_task("food101").match_label_names


def test_match_label_names_must_be_a_boolean(tmp_path):
    path = task_file(tmp_path, "stl10", match_label_names="yes")
    with pytest.raises(ValueError, match="match_label_names must be true or false") as info:
        load_task(path)
    assert str(path) in str(info.value)


CONFIGS = Path(__file__).parents[1] / "configs"
HUB_MODEL = {"vit_b32": "clip-vit-base-patch32", "vit_b16": "clip-vit-base-patch16",
             "vit_l14": "clip-vit-large-patch14"}  # fmt: skip
FUSIONBENCH_NAME = {"stanford_cars": "stanford-cars", "oxford_iiit_pet": "oxford-iiit-pet",
                    "rendered_sst2": "rendered-sst2"}  # fmt: skip


@pytest.mark.parametrize("suite", ["tall14", "tall20"])
@pytest.mark.parametrize("model", sorted(HUB_MODEL))
def test_suite_configs_name_every_task_and_checkpoint(model, suite):
    """The suite's base and gradient-statistics configs list the suite in order, map every
    task to FusionBench's checkpoint id, and give a reference accuracy for every task where
    they give any."""
    tasks = list(TALL14_TASKS if suite == "tall14" else TALL20_TASKS)
    files = sorted((CONFIGS / f"{model}_{suite}").glob("*.yaml"))
    assert {f.name for f in files} == {f.name for f in (CONFIGS / model).glob("*.yaml")}
    for path in files:
        config = yaml.safe_load(path.read_text())
        section = config["model"].get("init_args", config["model"])
        assert config["data"]["tasks"] == tasks, path
        expected = {t: f"tanganke/{HUB_MODEL[model]}_{FUSIONBENCH_NAME.get(t, t)}" for t in tasks}
        assert section["finetuned"] == expected, path
        if section.get("finetuned_accuracy") is not None:
            assert list(section["finetuned_accuracy"]) == tasks, path
            assert all(0.5 < a < 1 for a in section["finetuned_accuracy"].values()), path
