"""``mergelab fit`` with GradientStatistics end to end, through the installed console
script, on a tiny registered open_clip model and local dataset mirrors (tests/mirror.py):
statistics against a naive per-sample loop, two CPU processes (DDP, gloo) against one,
reuse of saved statistics, the merge at the end of fit and
``test --merge.method.gradient_stats``."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import mirror
from console import needs_cli, run_mergelab

from mergelab.engine.checkpoints import SafetensorsCheckpoint
from mergelab.io.gradient_statistics import load_task_statistics, read_statistics, statistics_file

TASKS = ["mnist", "eurosat", "svhn"]
MAX_SAMPLES = 9
pytestmark = needs_cli


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gradients")
    config, weights = mirror.write_tiny_clip(root / "clip")
    visual = mirror.pretrained_visual(weights)
    sizes = {"train": 40, "test": 10}
    mirror.write_three_tasks(root / "data", sizes)
    mirror.write_dataset(root / "data", "tanganke/dtd", 47, {"test": 10}, seed=3)  # no train
    for seed, task in enumerate(TASKS, 1):
        save_file(mirror.finetune(visual, seed), root / f"{task}.safetensors")
    model = {
        "model": mirror.TINY,
        "model_config": str(config),
        "pretrained": str(weights),
        "cache_dir": str(root / "cache"),
        "finetuned": {t: str(root / f"{t}.safetensors") for t in TASKS},
    }
    data = {
        "tasks": TASKS,
        "batch_size": 4,
        "num_workers": 0,
        "dataset_root": str(root / "data"),
    }
    fit = {
        "model": {
            "class_path": "mergelab.lightning.gradient_stats.GradientStatistics",
            "init_args": model | {"statistics": "stats", "chunk_size": 3},
        },
        "data": data | {"max_samples": MAX_SAMPLES},
        "merge": {
            "method": {
                "class_path": "mergelab.methods.TrustRegion",
                "init_args": {"threshold_quantile": 0.9},
            }
        },
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1},
    }
    (root / "fit.yaml").write_text(yaml.safe_dump(fit))
    (root / "test.yaml").write_text(
        yaml.safe_dump({"model": model, "data": data, "trainer": {"accelerator": "cpu"}})
    )
    return root


def mergelab(assets: Path, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    return run_mergelab(assets, *args, expect_ok=expect_ok, WANDB_MODE="disabled")


def latest_run(assets: Path, name: str) -> Path:
    return sorted((assets / "lightning_logs" / name).glob("version_*"))[-1]


@pytest.fixture(scope="module")
def fitted(assets) -> Path:
    mergelab(assets, "fit", "-c", "fit.yaml")
    return latest_run(assets, "gradient_stats")


def naive_statistics(assets: Path, task: str) -> dict[str, torch.Tensor]:
    """Mean over the run's samples of |∇| from one forward and backward pass per sample."""
    from mergelab.lightning.data import TaskDataModule
    from mergelab.models.clip import load_clip
    from mergelab.models.heads import zero_shot_head

    init = yaml.safe_load((assets / "fit.yaml").read_text())["model"]["init_args"]
    clip = load_clip(init["model"], init["pretrained"], init["cache_dir"], init["model_config"])
    dm = TaskDataModule([task], max_samples=MAX_SAMPLES, dataset_root=str(assets / "data"))
    dm.set_transforms(clip.preprocess_val, clip.preprocess_val)
    split = dm.split(dm.specs[0], "train")
    head = zero_shot_head(clip, dm.specs[0], init["cache_dir"])
    encoder, scale = clip.model.visual.eval(), clip.model.logit_scale.exp().item()
    sums = {n: torch.zeros_like(p) for n, p in encoder.named_parameters()}
    for i in range(len(split)):
        image, label = split[i]
        encoder.zero_grad(set_to_none=True)
        logits = scale * F.normalize(encoder(image[None]), dim=-1) @ head.T
        F.cross_entropy(logits, torch.tensor([label])).backward()
        for name, param in encoder.named_parameters():
            sums[name] += param.grad.abs()
    return {n: s / len(split) for n, s in sums.items()}


def relative_error(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in b)


def read_all(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {t: dict(SafetensorsCheckpoint(statistics_file(folder, t)).items()) for t in TASKS}


def test_statistics_equal_a_per_sample_loop_and_say_what_they_are(assets, fitted):
    stats = assets / "stats"
    meta = json.loads(SafetensorsCheckpoint(stats / "eurosat.safetensors").metadata["mergelab"])
    assert meta["task"] == "eurosat" and meta["samples"] == MAX_SAMPLES
    assert meta["tasks"] == TASKS and len(meta["model"]) == 16
    saved = read_all(stats)
    assert relative_error(saved["svhn"], naive_statistics(assets, "svhn")) <= 1e-5
    assert relative_error(saved["mnist"], saved["svhn"]) > 1e-2  # each task its own


def test_fit_merges_with_the_statistics_and_logs_the_work(assets, fitted):
    delta = SafetensorsCheckpoint(fitted / "merged_task_vector.safetensors")
    meta = json.loads(delta.metadata["mergelab"])
    assert meta["method"] == "trust_region" and meta["gradient_stats"].endswith("stats")
    with open(fitted / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k: v for row in rows for k, v in row.items() if v}
    assert float(logged["trust_region/threshold"]) == pytest.approx(meta["threshold"])
    densities = [float(v) for k, v in logged.items() if k.startswith("trust_region/density/")]
    assert len(densities) == len(delta) and 0.8 < sum(densities) / len(densities) < 1
    for task in TASKS:
        assert float(logged[f"gradients/{task}/samples"]) == MAX_SAMPLES
        assert float(logged[f"gradients/{task}/seconds"]) > 0


def test_two_processes_count_every_sample_once_and_agree(assets, fitted):
    mergelab(
        assets, "fit", "-c", "fit.yaml", "--model.init_args.statistics=stats_ddp",
        "--trainer.devices=2", "--trainer.strategy=ddp", "--data.batch_size=2",
    )  # fmt: skip
    single, double = read_all(assets / "stats"), read_all(assets / "stats_ddp")
    for task in TASKS:
        meta = json.loads(SafetensorsCheckpoint(assets / "stats_ddp" / f"{task}.safetensors")
                          .metadata["mergelab"])  # fmt: skip
        assert meta["samples"] == MAX_SAMPLES  # 9 samples over 2 ranks: 5 + 4, no padding
        assert relative_error(double[task], single[task]) <= 1e-6


def test_a_later_run_loads_the_statistics_and_test_scores_the_merge(assets, fitted):
    files = sorted((assets / "stats").iterdir())
    before = {p: p.stat().st_mtime_ns for p in files}
    mergelab(assets, "fit", "-c", "fit.yaml")
    assert {p: p.stat().st_mtime_ns for p in files} == before  # read, not rewritten
    again = latest_run(assets, "gradient_stats")
    assert again != fitted
    first = SafetensorsCheckpoint(fitted / "merged_task_vector.safetensors")
    second = SafetensorsCheckpoint(again / "merged_task_vector.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)

    mergelab(
        assets, "test", "-c", "test.yaml", "--merge.method=TrustRegion",
        "--merge.method.threshold_quantile=0.9", "--merge.method.gradient_stats=stats",
    )  # fmt: skip
    scored = latest_run(assets, "trust_region")
    results = json.loads((scored / "results.json").read_text())
    assert results["settings"]["gradient_stats"] == "stats"
    tested = SafetensorsCheckpoint(scored / "merged_task_vector.safetensors")
    assert all(torch.equal(first[k], tested[k]) for k in first)  # the same merge


def test_statistics_of_another_model_or_task_are_refused(assets, fitted, tmp_path):
    path = assets / "stats" / "mnist.safetensors"
    fingerprint = json.loads(SafetensorsCheckpoint(path).metadata["mergelab"])["model"]
    with pytest.raises(ValueError, match=r"another pretrained model.*0123456789abcdef"):
        read_statistics(path, "mnist", "0123456789abcdef")
    with pytest.raises(ValueError, match=r"task 'mnist', not 'svhn'"):
        read_statistics(path, "svhn", fingerprint)
    with pytest.raises(FileNotFoundError, match=r"task 'dtd'"):
        load_task_statistics(assets / "stats", ["mnist", "dtd"], fingerprint)
    result = mergelab(
        assets, "fit", "-c", "fit.yaml", "--data.max_samples=5", expect_ok=False
    )  # same folder, other samples
    assert "statistics over other samples or another zero-shot head of 'mnist'" in result.stderr
    assert "(9 samples saved, 5 now" in result.stderr


def test_statistics_of_another_zero_shot_head_are_not_reused(assets, fitted, tmp_path):
    """The same image encoder and samples with another text tower: another zero-shot head
    in the loss, which θ0's image-encoder fingerprint does not see. The saved statistics
    are refused in their folder, and the default cache keys other ones."""
    weights = yaml.safe_load((assets / "fit.yaml").read_text())["model"]["init_args"]["pretrained"]
    state = torch.load(weights, weights_only=True)
    state["token_embedding.weight"] = torch.randn_like(state["token_embedding.weight"])
    torch.save(state, tmp_path / "other_text.pt")
    other = f"--model.init_args.pretrained={tmp_path / 'other_text.pt'}"
    result = mergelab(assets, "fit", "-c", "fit.yaml", other, expect_ok=False)
    assert result.returncode == 2
    assert "statistics over other samples or another zero-shot head of 'mnist'" in result.stderr
    cached = assets / "cache" / "gradient_stats"
    before = set(cached.iterdir()) if cached.is_dir() else set()
    default = "--model.init_args.statistics=null"
    mergelab(assets, "fit", "-c", "fit.yaml", default)
    mergelab(assets, "fit", "-c", "fit.yaml", default, other)
    assert len(set(cached.iterdir()) - before) == 2  # one folder per head, none reused


def test_the_cache_of_statistics_is_keyed_by_the_samples_too(assets, tmp_path):
    """Another dataset at another place, or other rows of it, key other statistics: a
    rebuilt dataset never gets the statistics of the old one."""

    from mergelab.lightning.data import TaskDataModule

    def fingerprint(root: Path, max_samples: int | None = MAX_SAMPLES) -> str:
        dm = TaskDataModule(["mnist"], max_samples=max_samples, dataset_root=str(root))
        dm.set_transforms(lambda image: image, lambda image: image)
        return dm.samples_fingerprint(dm.specs[0], "train")

    shutil.copytree(assets / "data", tmp_path / "copy")
    same = fingerprint(assets / "data")
    assert fingerprint(assets / "data") == same
    assert fingerprint(tmp_path / "copy") != same
    assert fingerprint(assets / "data", max_samples=5) != same


def test_bad_input_stops_before_any_work(assets):
    result = mergelab(
        assets, "fit", "-c", "fit.yaml", "--data.tasks=[mnist, dtd]",
        "--model.init_args.statistics=stats_dtd",
        f"--model.init_args.finetuned.dtd={assets / 'mnist.safetensors'}", expect_ok=False,
    )  # fmt: skip
    assert "task 'dtd': cannot load split 'train'" in result.stderr
    assert not (assets / "stats_dtd").exists()
    from mergelab.lightning.data import TaskDataModule

    with pytest.raises(ValueError, match="max_samples must be positive, got 0"):
        TaskDataModule(TASKS, max_samples=0)
