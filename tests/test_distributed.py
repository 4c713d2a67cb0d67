"""N processes give what one gives: ``mergelab test`` under DDP (2 gloo processes on the
CPU, launched by Lightning) and as 2 nodes of 1 process each, through the real CLI, for
each kind of method, against the same run in one process: the same results.json, the same
logged metrics and the same merge artifact, every sample scored exactly once."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import wandb
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import mirror
from console import MERGELAB, needs_cli, run_mergelab

from mergelab.cli import run

pytestmark = needs_cli

TWO_PROCESSES = ["--trainer.devices=2", "--trainer.strategy=ddp"]
WITH_VAL = "--data.test_splits=[val, test]"
# each method with several settings where it has them, picked on validation (zero-shot's
# one shared model is task_arithmetic's path with one setting)
METHODS = {
    "finetuned": ["--merge.method=Finetuned"],
    "task_arithmetic": ["--merge.method.scaling_factor=[0.3, 0.6, 1.0]", WITH_VAL],
    "trust_region": [
        "--merge.method=TrustRegion", "--merge.method.threshold_quantile=0.9",
        "--merge.method.scaling_factor=[0.3, 0.6]", WITH_VAL,
    ],
    "tall_masks": ["--merge.method=TallMasks", "--merge.method.lambdas=[0.2, 0.4, 0.6]", WITH_VAL],
}  # fmt: skip
ARTIFACTS = ("merged_task_vector.safetensors", "tall_masks.safetensors")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """The merge run's mirrors, with mnist's model in a Hugging Face folder rather than the
    hub cache: the runs in this process read the hub cache that this process started with."""
    root = mirror.write_merge_run(tmp_path_factory.mktemp("distributed"))
    visual = mirror.pretrained_visual(root / "clip" / f"{mirror.TINY}.pt")
    mirror.write_hf_vision_model(root / "mnist_hf", mirror.finetune(visual, 1))
    config = yaml.safe_load((root / "base.yaml").read_text())
    config["model"]["finetuned"]["mnist"] = str(root / "mnist_hf")
    (root / "base.yaml").write_text(yaml.safe_dump(config))
    return root


def scored(assets: Path, label: str, method: str, *args: str, stage: str = "test") -> Path:
    """``mergelab <stage>`` with its own run folder (<label>/<method>/version_0): through
    the console script when it launches processes (its stderr kept in console.txt), else
    in this process."""
    command = [stage, "-c", "base.yaml", *args, f"--trainer.default_root_dir={label}",
               *logger_dirs(label)]  # fmt: skip
    if "--trainer.strategy=ddp" in args:
        stderr = run_mergelab(assets, *command, WANDB_MODE="disabled").stderr
        (assets / label / "console.txt").write_text(stderr)
    else:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(assets)
            patch.setenv("WANDB_MODE", "disabled")
            run([*command, "--report.print_table=false"])
        wandb.finish()  # the run's W&B run (disabled), not to be reused by a later one
        wandb.teardown()
    [folder] = (assets / label / method).glob("version_*")
    return folder


def logger_dirs(label: str) -> list[str]:
    loggers = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": label}},
        {"class_path": "mergelab.lightning.loggers.WandbLogger", "init_args": {"save_dir": label}},
    ]
    return ["--trainer.logger=" + json.dumps(loggers)]


def outcome(folder: Path) -> dict:
    """What a run produced: its results, its logged metrics, its artifact's bytes."""
    [results_file] = folder.glob("results*.json")
    results = json.loads(results_file.read_text())
    with open(folder / "metrics.csv", newline="") as f:
        metrics = {k: v for row in csv.DictReader(f) for k, v in row.items() if v != ""}
    artifacts = {a: (folder / a).read_bytes() for a in ARTIFACTS if (folder / a).exists()}
    return {"results": results, "metrics": metrics, "artifacts": artifacts}


def assert_same(single: dict, several: dict) -> None:
    assert several["results"] == single["results"]
    assert several["metrics"] == single["metrics"]
    assert several["artifacts"].keys() == single["artifacts"].keys()
    for name, data in single["artifacts"].items():
        assert several["artifacts"][name] == data, name


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_score_what_one_does(assets, method):
    args = METHODS[method]
    single = outcome(scored(assets, f"one_{method}", method, *args))
    several = outcome(scored(assets, f"two_{method}", method, *args, *TWO_PROCESSES))
    assert_same(single, several)
    if len(single["results"]["accuracy"]) > 1:
        assert single["results"]["picked_on"] == "val"


def test_validate_on_two_processes_scores_what_one_does(assets):
    """... with a decoded-image cache of its own: one process decodes, the other waits
    and reads what it wrote; and with a score cache of its own: each rank keeps its
    shard's counts, and a rerun where rank 0 reads them and rank 1 computes (its entries
    deleted) scores the same again."""
    args = ["--merge.method=TallMasks", "--merge.method.lambdas=[0.3, 0.5]"]
    single = scored(assets, "one_validate", "tall_masks", *args, stage="validate")
    cache, scores = assets / "two_validate_decoded", assets / "two_validate_scores"
    two = [*args, *TWO_PROCESSES, f"--data.decoded_cache={cache}", f"--model.score_cache={scores}"]
    several = scored(assets, "two_validate", "tall_masks", *two, stage="validate")
    assert_same(outcome(single), outcome(several))
    shards = {}
    for entry in scores.rglob("*.json"):
        shard = json.loads(entry.read_text())["key"]["samples"].split(" shard ")[1]
        shards.setdefault(shard, {})[entry] = entry.stat().st_mtime_ns
    assert sorted(shards) == ["0 of 2", "1 of 2"]  # 2 λ × 3 tasks each
    assert [len(entries) for entries in shards.values()] == [6, 6]
    for entry in shards["1 of 2"]:
        entry.unlink()
    again = scored(assets, "two_validate_again", "tall_masks", *two, stage="validate")
    assert_same(outcome(single), outcome(again))
    assert all(entry.stat().st_mtime_ns == t for entry, t in shards["0 of 2"].items())
    assert all(entry.is_file() for entry in shards["1 of 2"])
    assert json.loads((several / "results_val.json").read_text())["stage"] == "val"
    console = (assets / "two_validate" / "console.txt").read_text()
    assert console.count("decoding ") == 1, console
    entries = sorted(str(p.parent.relative_to(cache).parent) for p in cache.rglob("meta.json"))
    assert entries == sorted(mirror.THREE_TASKS)
    assert not [p for p in cache.rglob(".*")]  # no temporaries


def test_consensus_with_each_tasks_lambda_on_two_processes(assets):
    """Consensus from the λ a TALL run picked per task, and without a kept artifact: the
    ranks share the masks through a file that is removed at the end."""
    tall = scored(assets, "tall_for_consensus", "tall_masks", *METHODS["tall_masks"])
    args = [
        "--merge.method=Consensus", f"--merge.method.tall_results={tall}",
        "--merge.method.scaling_factor=[0.5, 1.0]", WITH_VAL, "--merge.save_artifact=false",
    ]  # fmt: skip
    single = scored(assets, "one_consensus", "consensus", *args)
    several = scored(assets, "two_consensus", "consensus", *args, *TWO_PROCESSES)
    assert_same(outcome(single), outcome(several))
    assert not (several / ".merge").exists() and not (several / ARTIFACTS[1]).exists()
    picked = json.loads((tall / "results.json").read_text())["picked_settings"]
    settings = json.loads((several / "results.json").read_text())["settings"]
    assert settings["tall_results"] == str(tall) and set(picked) == set(mirror.THREE_TASKS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_each(assets):
    """... sharing a decoded-image cache that neither has filled: each node decodes, the
    first to finish puts its entries in place, and the other's are dropped."""
    args = ["test", "-c", "base.yaml", *METHODS["trust_region"], "--trainer.num_nodes=2",
            f"--data.decoded_cache={assets / 'nodes_decoded'}",
            "--trainer.devices=1", "--trainer.strategy=ddp", "--trainer.default_root_dir=nodes",
            *logger_dirs("nodes")]  # fmt: skip
    env = os.environ | {
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }  # fmt: skip
    nodes = [
        subprocess.Popen(
            [MERGELAB, *args],
            cwd=assets,
            env=env | {"NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        output, _ = node.communicate(timeout=600)
        assert node.returncode == 0, output[-3000:]
    [folder] = (assets / "nodes" / "trust_region").glob("version_*")
    single = scored(assets, "one_node", "trust_region", *METHODS["trust_region"])
    assert_same(outcome(single), outcome(folder))
    entries = [p.parent for p in (assets / "nodes_decoded").rglob("meta.json")]
    assert len(entries) == 2 * len(mirror.THREE_TASKS)  # val and test
    assert not [p for p in (assets / "nodes_decoded").rglob(".*")]
