"""The miniature tasks: deterministic scenes, one factor per task, read by the same loader
as the real tasks."""

import numpy as np
import torch

from mergelab.embedded.scenes import (
    DOMAINS,
    FACTORS,
    IMAGE_SIZE,
    TASKS,
    caption,
    render,
    sample_factors,
    write_tasks,
)
from mergelab.lightning.data import TaskDataModule
from mergelab.tasks import load_task


def test_caption_names_every_factor():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scene = sample_factors(rng)
        text = caption(scene)
        for factor in FACTORS:
            name = factor.classnames[scene[factor.name]]
            if factor.name == "stripes" and name == "plain":
                assert "no stripes" in text
            else:
                assert name in text, (factor.name, text)


def test_scenes_are_a_function_of_the_seed():
    first = [np.asarray(render(sample_factors(r), r)) for r in [np.random.default_rng(5)] * 3]
    again = [np.asarray(render(sample_factors(r), r)) for r in [np.random.default_rng(5)] * 3]
    for a, b in zip(first, again, strict=True):
        assert a.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and np.array_equal(a, b)


def test_each_task_draws_from_its_own_domain():
    rng = np.random.default_rng(2)
    for task in TASKS:
        seen = {f.name: set() for f in FACTORS}
        for _ in range(300):
            for name, value in sample_factors(rng, task).items():
                seen[name].add(value)
        for factor in FACTORS:
            allowed = DOMAINS[task].get(factor.name, range(len(factor.classnames)))
            assert seen[factor.name] == set(allowed), (task, factor.name)
        assert len(seen[task]) == len(next(f for f in FACTORS if f.name == task).classnames)


def test_factors_change_the_image():
    rng = np.random.default_rng(0)
    scene = sample_factors(rng)
    for factor in FACTORS:
        other = dict(scene, **{factor.name: (scene[factor.name] + 1) % len(factor.classnames)})
        a = np.asarray(render(scene, np.random.default_rng(1)), dtype=float)
        b = np.asarray(render(other, np.random.default_rng(1)), dtype=float)
        assert np.abs(a - b).mean() > 0.1, factor.name  # the same scene, one factor changed


def test_written_tasks_load_like_hub_datasets(tmp_path):
    paths = write_tasks(tmp_path, {"train": 30, "test": 12}, seed=1)
    assert list(paths) == list(TASKS)
    data = TaskDataModule(tasks=[str(p) for p in paths.values()], batch_size=8, num_workers=0)
    data.set_transforms(_to_tensor, _to_tensor)
    for factor in FACTORS:
        spec = load_task(paths[factor.name])
        assert spec.classnames == factor.classnames
        test = data.split(spec, "test")
        labels = [test[i][1] for i in range(len(test))]
        assert len(test) == 12 and all(0 <= y < len(factor.classnames) for y in labels)
        assert test[0][0].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert len(data.split(spec, "train")) + len(data.split(spec, "val")) == 30
    # rebuilt from the same seed: the same images and labels
    again = write_tasks(tmp_path / "again", {"train": 30, "test": 12}, seed=1)
    import datasets

    for task in TASKS:
        a = datasets.load_dataset(str(tmp_path / "data" / task), split="test")
        b = datasets.load_dataset(str(tmp_path / "again" / "data" / task), split="test")
        assert a["label"] == b["label"]
        assert np.array_equal(np.asarray(a[0]["image"]), np.asarray(b[0]["image"]))
    assert set(again) == set(TASKS)


def _to_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)
