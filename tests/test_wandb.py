"""W&B as its users run it, offline, on what W&B itself recorded: the user's WANDB_MODE,
WANDB_PROJECT, WANDB_ENTITY and WANDB_RUN_GROUP, a sweep agent's run id and sweep id, the
run's name, config and summary. (Bad input, an unknown WANDB_MODE among it, is refused
before any model is loaded: tests/test_bad_input_cli.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import mirror
from console import needs_cli, run_mergelab

pytestmark = needs_cli


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = mirror.write_merge_run(tmp_path_factory.mktemp("wandb"))
    # mnist from a local file: the in-process run reads no hub cache
    visual = mirror.pretrained_visual(root / "clip" / f"{mirror.TINY}.pt")
    save_file(mirror.finetune(visual, 1), root / "mnist.safetensors")
    return root


def mergelab(assets: Path, *args: str, expect_ok: bool = True, **env: str):
    return run_mergelab(assets, *args, expect_ok=expect_ok, HF_HUB_CACHE=str(assets / "hub"), **env)


def test_a_sweep_agents_run_logs_into_its_run_id_and_project(assets, monkeypatch):
    """As `wandb agent` starts a trial: its environment and the sweep file's command."""
    import wandb

    from mergelab.cli import run

    monkeypatch.chdir(assets)
    # a run left open in this process would be reused, and W&B's process-wide set-up keeps
    # the environment it first saw: start from neither
    wandb.finish()
    wandb.teardown()
    agent = {"WANDB_SWEEP_ID": "sweep42", "WANDB_RUN_ID": "trial7", "WANDB_PROJECT": "merges",
             "WANDB_ENTITY": "lab", "WANDB_RUN_GROUP": "b32", "WANDB_MODE": "offline"}  # fmt: skip
    for name, value in agent.items():
        monkeypatch.setenv(name, value)
    cli = run([
        "validate", "-c", "base.yaml", f"--model.finetuned.mnist={assets / 'mnist.safetensors'}",
        "--merge.method=TrustRegion", "--merge.method.threshold_quantile=0.9",
        "--merge.method.scaling_factor=0.5", "--report.print_table=false",
    ])  # fmt: skip
    try:
        experiment = cli.trainer.loggers[1].experiment
        assert (experiment.id, experiment.project, experiment.sweep_id) == (
            "trial7", "merges", "sweep42")  # fmt: skip
        assert (experiment.entity, experiment.group) == ("lab", "b32")
        assert experiment.name == "trust_region threshold_quantile=0.9 scaling_factor=0.5"
        assert experiment.summary["val/avg_acc"] == cli.model.results["headline"]["avg_acc"]
        merge = experiment.config["merge"]["method"]
        assert merge["class_path"] == "mergelab.methods.TrustRegion"
        assert merge["init_args"]["threshold_quantile"] == 0.9
        assert experiment.config["finetuned"]["eurosat"].endswith("eurosat.safetensors")
        assert experiment.config["data"]["tasks"] == mirror.THREE_TASKS
    finally:
        wandb.finish()
    assert list((assets / "lightning_logs" / "wandb").glob("offline-run-*-trial7"))


def wandb_runs(assets: Path) -> set[Path]:
    return set((assets / "lightning_logs").glob("wandb/*run-*"))


def test_wandb_mode_disabled_writes_no_run_and_offline_no_warning(assets):
    before = wandb_runs(assets)
    mergelab(assets, "test", "-c", "base.yaml", "--merge.method=ZeroShot", WANDB_MODE="disabled")
    assert wandb_runs(assets) == before
    offline = mergelab(assets, "test", "-c", "base.yaml", "--merge.method=ZeroShot",
                       WANDB_MODE="offline")  # fmt: skip
    assert len(wandb_runs(assets) - before) == 1
    assert "anonymous" not in offline.stderr


def test_several_settings_without_val_are_reported_when_asked(assets):
    mergelab(assets, "test", "-c", "base.yaml", "--merge.method.scaling_factor=[0.3, 0.6]",
             "--merge.report_without_pick=true", WANDB_MODE="disabled")  # fmt: skip
    [folder] = sorted((assets / "lightning_logs" / "task_arithmetic").glob("version_*"))[-1:]
    results = json.loads((folder / "results.json").read_text())
    assert results["picked_on"] is None and len(results["accuracy"]) == 2
