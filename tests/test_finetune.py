"""``mergelab fit`` with FineTuner end to end, through the installed console script, on a
tiny registered open_clip model and a local mnist mirror (tests/mirror.py)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import mirror
from console import needs_cli, run_console, run_mergelab

from mergelab.engine.checkpoints import SafetensorsCheckpoint
from mergelab.lightning.finetune import warmup_cosine
from mergelab.models.clip import load_image_encoder

LR, WARMUP, STEPS = 1e-3, 2, 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    config, weights = mirror.write_tiny_clip(root / "clip")
    mirror.write_dataset(root / "data", "ylecun/mnist", 10, {"train": 60, "test": 20})
    base = {
        "model": {
            "class_path": "mergelab.lightning.finetune.FineTuner",
            "init_args": {
                "task": "mnist",
                "model": mirror.TINY,
                "model_config": str(config),
                "pretrained": str(weights),
                "cache_dir": str(root / "cache"),
                "lr": LR,
                "warmup_steps": WARMUP,
            },
        },
        "data": {
            "tasks": ["mnist"],
            "batch_size": 8,
            "num_workers": 0,
            "dataset_root": str(root / "data"),
        },
        "trainer": {
            "accelerator": "cpu",
            "max_steps": STEPS,
            "gradient_clip_val": 1.0,
            "log_every_n_steps": 1,
            "limit_val_batches": 1,
            "val_check_interval": 2,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                    "init_args": {"logging_interval": "step"},
                }
            ],
        },
    }
    (root / "finetune.yaml").write_text(yaml.safe_dump(base))
    return root


def mergelab(assets: Path, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    return run_mergelab(assets, *args, expect_ok=expect_ok)


@pytest.fixture(scope="module")
def fitted(assets) -> Path:
    mergelab(assets, "fit", "-c", "finetune.yaml")
    versions = sorted((assets / "lightning_logs" / "finetune").glob("version_*"))
    assert len(versions) == 1
    return versions[0]


def test_warmup_then_cosine_matches_the_formula():
    warmup, total = 500, 2000
    for step in [0, 1, 250, 499]:
        assert warmup_cosine(step, warmup, total) == pytest.approx((step + 1) / warmup)
    for step in [500, 900, 1250, 1999]:
        expected = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert warmup_cosine(step, warmup, total) == pytest.approx(expected)
    assert warmup_cosine(500, 500, 500) == pytest.approx(1.0)  # no room to decay: no crash
    assert warmup_cosine(0, 0, 10) == pytest.approx(1.0)


@needs_cli
def test_fit_writes_a_finetuned_encoder_that_merges_read(assets, fitted):
    path = fitted / "mnist.safetensors"
    assert path.is_file()
    assert not [p for p in fitted.iterdir() if p.name.endswith(".tmp")]  # renamed into place
    pretrained = mirror.pretrained_visual(assets / "clip" / f"{mirror.TINY}.pt")
    encoder = load_image_encoder(path, pretrained, assets / "cache")
    assert isinstance(encoder, SafetensorsCheckpoint)
    assert encoder.path == path  # read in place: already an open_clip image encoder
    assert set(encoder) == set(pretrained)
    changed = [k for k in pretrained if not torch.equal(encoder[k], pretrained[k])]
    assert "conv1.weight" in changed and "proj" in changed
    meta = json.loads(encoder.metadata["mergelab"])
    assert meta["task"] == "mnist" and meta["model"] == mirror.TINY


@needs_cli
def test_fit_logs_loss_accuracy_and_the_scheduled_learning_rate(fitted):
    with open(fitted / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert any(r.get("train/acc") for r in rows)
    assert any(r.get("val/acc") for r in rows)  # validation after 2 steps
    lrs = [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")]
    expected = [LR * warmup_cosine(step, WARMUP, STEPS) for step in range(STEPS)]
    assert lrs == pytest.approx(expected)


@needs_cli
def test_fit_rejects_a_data_module_with_other_tasks(assets):
    result = mergelab(assets, "fit", "-c", "finetune.yaml", "--data.tasks=[svhn]", expect_ok=False)
    assert result.returncode != 0
    assert "data module must hold exactly that task" in result.stderr
    assert "data.tasks: [mnist]" in result.stderr


@needs_cli
def test_fit_help(tmp_path, monkeypatch, capsys):
    code, out, _ = run_console(monkeypatch, capsys, tmp_path, "fit", "--help")
    assert code == 0
    assert "--model CONFIG | CLASS_PATH_OR_NAME" in out  # any fit model, by class
    assert "--trainer.max_epochs" in out
    fine_tuner = "mergelab.lightning.finetune.FineTuner"
    code, out, _ = run_console(monkeypatch, capsys, tmp_path, "fit", "--model.help", fine_tuner)
    assert code == 0 and "--model.warmup_steps" in out
    assert "--model.finetuned" not in out  # the evaluator's, not FineTuner's


@pytest.mark.parametrize(
    "config", sorted((Path(__file__).parents[1] / "configs" / "finetune").glob("*.yaml")), ids=str
)
def test_every_finetune_config_parses(config, capsys, monkeypatch):
    from mergelab.cli import run
    from mergelab.tasks import load_task

    monkeypatch.setattr(sys, "argv", ["mergelab"])
    with pytest.raises(SystemExit) as exit_:
        run(["fit", "-c", str(config), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "mergelab.lightning.finetune.FineTuner"
    assert load_task(printed["model"]["init_args"]["task"]).name == config.stem
    assert printed["data"]["tasks"] == [config.stem]
    assert printed["data"]["batch_size"] == 128
    assert printed["trainer"]["gradient_clip_val"] == 1.0
