"""``--trainer.precision`` as Lightning users set it: bf16-mixed scores what float32 scores
on the embedded test preset, with the encoder really run under autocast; the gradient
statistics' bf16 pass is tested in test_gradients; precisions a module does not compute
with, and names Lightning does not know, are refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import wandb

from mergelab.cli import run
from mergelab.errors import BadValue
from mergelab.lightning import evaluation

ROOT = Path(__file__).resolve().parents[1]
# the encoder runs in each precision: no score read from an earlier run
RUN = ["-c", "configs/embedded/base.yaml", "--report.print_table=false",
       "--trainer.enable_progress_bar=false", "--trainer.logger=false",
       "--model.score_cache=false"]  # fmt: skip
TALL = ["-c", "configs/methods/tall_masks.yaml"]
LOGITS = evaluation.zero_shot_logits


@pytest.fixture
def embedded(embedded_cache, monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("MERGELAB_CACHE", str(embedded_cache))
    monkeypatch.setenv("MERGELAB_EMBEDDED_PRESET", "test")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(ROOT)
    yield tmp_path
    wandb.finish()


def scores(folder: Path, precision: str, monkeypatch) -> tuple[dict, set]:
    """Every setting's accuracy on every task and split, and the dtypes of the features
    the encoder produced."""
    dtypes = set()

    def recorded(features, head, scale):
        dtypes.add(features.dtype)
        return LOGITS(features, head, scale)

    monkeypatch.setattr(evaluation, "zero_shot_logits", recorded)
    run(["test", *RUN, *TALL, f"--trainer.precision={precision}",
         f"--trainer.default_root_dir={folder / precision}"])  # fmt: skip
    [results] = (folder / precision).rglob("results.json")
    return json.loads(results.read_text()), dtypes


def test_bf16_mixed_scores_what_float32_scores(embedded, monkeypatch):
    """TALL masks' five λ on validation, each task's pick on test. Tolerance: every
    validation accuracy within one of the split's 7 images a task; where a task picks the
    same λ, its test accuracy within one of its 16 images; at most two tasks pick another
    λ (on a tie broken by one image)."""
    full, full_dtypes = scores(embedded, "32-true", monkeypatch)
    half, half_dtypes = scores(embedded, "bf16-mixed", monkeypatch)
    assert full_dtypes == {torch.float32} and half_dtypes == {torch.bfloat16}
    assert full["accuracy"].keys() == half["accuracy"].keys()
    for setting, splits in full["accuracy"].items():
        for task, accuracy in splits["val"].items():
            assert abs(accuracy - half["accuracy"][setting]["val"][task]) <= 1 / 7 + 1e-6
    picked = full["picked_settings"]
    same = [task for task, pick in picked.items() if half["picked_settings"][task] == pick]
    assert len(same) >= len(picked) - 2
    for task in same:
        test = full["headline"]["accuracy"][task], half["headline"]["accuracy"][task]
        assert abs(test[0] - test[1]) <= 1 / 16 + 1e-6, task


@pytest.mark.parametrize(
    ("stage", "config", "precision", "module"),
    [
        ("test", "configs/methods/task_arithmetic.yaml", "bf16-true", "MergeEvaluator"),
        ("fit", "configs/embedded/trust_region_gradients.yaml", "64-true", "GradientStatistics"),
    ],
)
def test_a_precision_the_module_does_not_compute_with_is_named(
    embedded, stage, config, precision, module
):
    args = ["-c", config] if stage == "fit" else [*RUN, "-c", config]
    with pytest.raises(BadValue, match=rf"{module} runs with --trainer.precision .*'{precision}'"):
        run([stage, *args, f"--trainer.precision={precision}",
             f"--trainer.default_root_dir={embedded}", "--trainer.logger=false"])  # fmt: skip
