"""Bad input as careless users give it, through the console script's ``main`` in this
process: each case ends in ``mergelab: error: ...`` naming the culprit, exit status 2,
no traceback, and nothing written where it ran (no run folder, no W&B run). That a bad
checkpoint is never cached: tests/test_bad_checkpoints.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401  (its console handler binds stderr at import: not a test's)
import pytest
import torch
import yaml
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import mirror
from console import run_console

from mergelab.errors import BadInput, BadValue
from mergelab.methods import MergeMethod


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """The tiny CLIP, three tasks' mirrors, a fine-tuned file per task, and bad files."""
    root = tmp_path_factory.mktemp("bad_input")
    config, weights = mirror.write_tiny_clip(root / "clip")
    visual = mirror.pretrained_visual(weights)
    mirror.write_three_tasks(root / "data", {"train": 110, "test": 41})
    for seed, task in enumerate(mirror.THREE_TASKS, 1):
        save_file(mirror.finetune(visual, seed), root / f"{task}.safetensors")
    bad = root / "bad"
    bad.mkdir()
    mirror.write_three_tasks(bad / "data", {"train": 110, "test": 41})
    mirror.write_dataset(bad / "data", "tanganke/eurosat", 12, {"train": 130, "test": 41}, seed=1)
    mirror.write_three_tasks(bad / "tiny_train", {"train": 5, "test": 41})  # no val rows
    save_file(
        mirror.finetune(visual, 9) | {"extra.weight": torch.ones(2)}, bad / "extra.safetensors"
    )
    shapes = mirror.finetune(visual, 9)
    shapes["proj"] = torch.zeros(3, 3)
    save_file(shapes, bad / "shape.safetensors")
    nan = mirror.finetune(visual, 9)
    nan["proj"] = torch.full_like(nan["proj"], float("nan"))
    save_file(nan, bad / "nan.safetensors")
    clip = torch.load(weights, weights_only=True)
    clip["visual.proj"] = torch.full_like(clip["visual.proj"], float("nan"))
    torch.save(clip, bad / "nan_clip.pt")
    (bad / "random.safetensors").write_bytes(os.urandom(512))
    (bad / "text.pt").write_text("not a checkpoint\n")
    whole = (root / "eurosat.safetensors").read_bytes()
    (bad / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    finetuned = {"method": "finetuned"}
    (bad / "accuracy_missing_task.json").write_text(
        json.dumps({"settings": finetuned, "headline": {"accuracy": {"mnist": 0.9, "svhn": 0.8}}})
    )
    (bad / "accuracy_zero.json").write_text(
        json.dumps(
            {
                "settings": finetuned,
                "headline": {"accuracy": {"mnist": 0.9, "eurosat": 0.0, "svhn": 0.8}},
            }
        )
    )
    (bad / "accuracy_percent.json").write_text(json.dumps({"mnist": 91.2, "eurosat": 80}))
    (bad / "accuracy_booleans.json").write_text(json.dumps({"mnist": True, "eurosat": True}))
    (bad / "accuracy_malformed.json").write_text('{"mnist": 0.9,\n}')
    (bad / "accuracy_of_a_merge.json").write_text(
        json.dumps({"settings": {"method": "ties"}, "headline": {"accuracy": {"mnist": 0.5}}})
    )
    (bad / "not_results.json").write_text(json.dumps({"accuracy": 0.9}))
    (bad / "empty_stats").mkdir()
    task = yaml.safe_load(
        (Path(mirror.__file__).parents[1] / "mergelab/tasks/builtin/mnist.yaml").read_text()
    )
    (bad / "no_classnames.yaml").write_text(
        yaml.safe_dump({k: v for k, v in task.items() if k != "classnames"})
    )
    (bad / "bad_yaml.yaml").write_text("name: [unclosed\n")
    (bad / "a_file").write_text("")
    finetuned = {t: str(root / f"{t}.safetensors") for t in mirror.THREE_TASKS}
    mirror.write_base_config(root, config, weights, finetuned)
    return root


# case: (command-line arguments after `test -c base.yaml`, what the message must name);
# {root} is the assets folder, {bad} its bad files
CASES = {
    # settings, refused before any model is loaded
    "quantile above one": (
        ["--merge.method=TrustRegion", "--merge.method.threshold_quantile=1.5"],
        "threshold_quantile must be in (0, 1], got 1.5",
    ),
    "quantile zero": (
        ["--merge.method=TrustRegion", "--merge.method.threshold_quantile=0"],
        "threshold_quantile must be in (0, 1], got 0",
    ),
    "quantile list with one bad": (
        ["--merge.method=TrustRegion", "--merge.method.threshold_quantile=[0.9, 2]"],
        "threshold_quantile must be in (0, 1], got 2",
    ),
    "statistics folder missing": (
        ["--merge.method=TrustRegion", "--merge.method.gradient_stats={root}/nowhere"],
        "gradient_stats: no folder",
    ),
    "statistics folder empty": (
        ["--merge.method=TrustRegion", "--merge.method.gradient_stats={bad}/empty_stats"],
        "empty_stats",
    ),
    "empty scaling factors": (["--merge.method.scaling_factor=[]"], "scaling_factor"),
    "TALL λ twice": (
        ["--merge.method=TallMasks", "--merge.method.lambdas=[0.2, 0.2]"],
        "listed twice",
    ),
    "TALL λ negative": (
        ["--merge.method=TallMasks", "--merge.method.lambdas=[-1.0]"],
        "λ must be > 0",
    ),
    "consensus k negative": (
        ["--merge.method=Consensus", "--merge.method.k=-1", "--merge.method.tall_lambda=0.5"],
        "consensus k must be ≥ 0, got -1",
    ),
    "consensus without λ": (["--merge.method=Consensus"], "tall_results"),
    "consensus both λ sources": (
        [
            "--merge.method=Consensus",
            "--merge.method.tall_lambda=0.5",
            "--merge.method.tall_results={bad}/not_results.json",
        ],
        "tall_lambda",
    ),
    "consensus TALL results missing": (
        ["--merge.method=Consensus", "--merge.method.tall_results={root}/nowhere.json"],
        "nowhere.json",
    ),
    "settings without val": (
        ["--merge.method.scaling_factor=[0.3, 0.6]"],
        "has no val to pick one",
    ),
    "unknown split": (["--data.test_splits=[train]"], "test_splits"),
    "max samples zero": (["--data.max_samples=0"], "max_samples must be positive, got 0"),
    "task listed twice": (["--data.tasks=[mnist, mnist]"], "listed twice"),
    "unknown task": (["--data.tasks=[mnist, no_such_task]"], "no_such_task"),
    "task file missing a key": (["--data.tasks=[{bad}/no_classnames.yaml, eurosat]"], "classnames"),
    "task file not YAML": (["--data.tasks=[{bad}/bad_yaml.yaml, eurosat]"], "bad_yaml.yaml"),
    "sharded strategy": (["--trainer.strategy=fsdp"], "trainer.strategy 'fsdp'"),
    "unknown method class": (["--merge.method=MergeAllTheThings"], "MergeAllTheThings"),
    "fine-tuned model not given": (["--data.tasks=[mnist, eurosat, svhn, gtsrb]"], "'gtsrb'"),
    # files, refused when read, before the merge
    "fine-tuned file missing": (
        ["--model.finetuned.mnist={root}/nowhere.safetensors"],
        "nowhere.safetensors",
    ),
    "fine-tuned random bytes": (
        ["--model.finetuned.mnist={bad}/random.safetensors"],
        "random.safetensors",
    ),
    "fine-tuned text as .pt": (["--model.finetuned.mnist={bad}/text.pt"], "text.pt"),
    "fine-tuned truncated": (
        ["--model.finetuned.mnist={bad}/truncated.safetensors"],
        "truncated.safetensors",
    ),
    "fine-tuned extra tensor": (
        ["--model.finetuned.mnist={bad}/extra.safetensors"],
        "extra.weight",
    ),
    "fine-tuned wrong shape": (["--model.finetuned.mnist={bad}/shape.safetensors"], "proj"),
    "fine-tuned NaN, merged": (["--model.finetuned.mnist={bad}/nan.safetensors"], "'mnist'"),
    "fine-tuned NaN, scored": (
        ["--merge.method=Finetuned", "--model.finetuned.mnist={bad}/nan.safetensors"],
        "NaN",
    ),
    "fine-tuned a folder of nothing": (
        ["--model.finetuned.mnist={bad}/empty_stats"],
        "empty_stats",
    ),
    "pretrained missing": (["--model.pretrained={root}/nowhere.pt"], "nowhere.pt"),
    "pretrained not a checkpoint": (["--model.pretrained={bad}/text.pt"], "text.pt"),
    "pretrained NaN": (
        ["--model.pretrained={bad}/nan_clip.pt", "--merge.method=ZeroShot"],
        "nan_clip.pt has NaN or Inf at 'visual.proj'",
    ),
    "model config missing": (["--model.model_config={root}/nowhere.json"], "nowhere.json"),
    "accuracy file missing": (["--model.finetuned_accuracy={root}/nowhere.json"], "nowhere.json"),
    "accuracy file missing a task": (
        ["--model.finetuned_accuracy={bad}/accuracy_missing_task.json"],
        "no entry for task 'eurosat'",
    ),
    "accuracy of zero": (["--model.finetuned_accuracy={bad}/accuracy_zero.json"], "'eurosat'"),
    "accuracy file not results": (
        ["--model.finetuned_accuracy={bad}/not_results.json"],
        "not_results.json",
    ),
    "accuracy in percent": (
        ["--model.finetuned_accuracy={bad}/accuracy_percent.json"],
        "accuracy_percent.json: the accuracy of task 'mnist' is 91.2",
    ),
    "accuracy of booleans": (
        ["--model.finetuned_accuracy={bad}/accuracy_booleans.json"],
        "accuracy_booleans.json: the accuracy of task 'mnist' is True",
    ),
    "accuracy file malformed": (
        ["--model.finetuned_accuracy={bad}/accuracy_malformed.json"],
        "accuracy_malformed.json is not JSON",
    ),
    "accuracy file of a merge run": (
        ["--model.finetuned_accuracy={bad}/accuracy_of_a_merge.json"],
        "accuracy_of_a_merge.json is the results of a 'ties' run",
    ),
    "test run without a test split": (
        ["--data.test_splits=[val]"],
        "data.test_splits ['val'] has no test split",
    ),
    "validation split empty": (
        ["--data.dataset_root={bad}/tiny_train", "--data.test_splits=[val, test]"],
        "its val split has no samples",
    ),
    "split smaller than its classes": (
        ["--data.max_samples=5", "--data.test_splits=[val, test]"],
        "task 'mnist': its val split has 5 samples, fewer than its 10 classes",
    ),
    "dataset mirror missing": (["--data.dataset_root={root}/nowhere"], "nowhere"),
    "labels outside the classes": (
        ["--data.dataset_root={bad}/data"],
        "task 'eurosat': split 'test' has label 1",
    ),
    # output and cache folders
    "cache folder is a file": (["--model.cache_dir={bad}/a_file"], "a_file"),
    "decoded-image cache is a file": (["--data.decoded_cache={bad}/a_file/decoded"], "a_file"),
    "score cache is a file": (["--model.score_cache={bad}/a_file/scores"], "the score cache"),
    # a precision Lightning does not know
    "unknown precision": (["--trainer.precision=bf17"], "bf17"),
}


def run_main(monkeypatch, capsys, cwd: Path, args: list[str]) -> tuple[int, str]:
    code, _, error = run_console(monkeypatch, capsys, cwd, *args)
    return code, error


@pytest.fixture
def offline(monkeypatch):
    """No network; W&B's process-wide set-up (which keeps the environment it first saw)
    torn down afterwards, so that later tests' W&B runs read their own environment."""
    for name, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MERGELAB_TRACEBACK", raising=False)
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


@pytest.mark.parametrize("args, culprit", CASES.values(), ids=list(CASES))
def test_bad_input_is_named_with_exit_status_two_and_nothing_written(
    args, culprit, assets, tmp_path, monkeypatch, capsys, offline
):
    fill = {"root": str(assets), "bad": str(assets / "bad")}
    cache = tmp_path / "cache"
    args = [a.format(**fill) for a in args]
    if not any(a.startswith("--model.cache_dir") for a in args):
        args.append(f"--model.cache_dir={cache}")
    cwd = tmp_path / "run"
    cwd.mkdir()
    code, error = run_main(
        monkeypatch, capsys, cwd, ["test", "-c", str(assets / "base.yaml"), *args]
    )
    assert code == 2, error
    assert "Traceback" not in error
    message = error.strip().splitlines()
    assert any(line.startswith("mergelab: error: ") for line in message), error
    assert culprit.format(**fill) in error
    assert not list(cwd.iterdir()), "a failed run left files behind"


# --- a run that fails after it produced something keeps its folder, marked as failed ------


def test_merged_weights_that_overflow_are_named(assets, tmp_path, monkeypatch, capsys, offline):
    """λ = 1e308 overflows θ0 + λ·δ: refused naming λ and the parameter, exit status 2;
    the run had written its merged task vector, so its folder stays, marked FAILED."""
    cwd = tmp_path / "run"
    cwd.mkdir()
    args = ["--merge.method=TaskArithmetic", "--merge.method.scaling_factor=1e308"]
    args.append(f"--model.cache_dir={tmp_path / 'cache'}")
    code, error = run_main(
        monkeypatch, capsys, cwd, ["test", "-c", str(assets / "base.yaml"), *args]
    )
    assert code == 2, error
    assert "Traceback" not in error
    assert "scaling factor 1e+308: θ0 + λ·δ of '" in error
    [folder] = (cwd / "lightning_logs" / "task_arithmetic").iterdir()
    assert (folder / "FAILED").is_file() and not (folder / "results.json").exists()


class WritesThenFails(MergeMethod):
    """Writes a file into its run folder, then raises ``error``: a failure after work."""

    def __init__(self, error: str = "crash"):
        self.error = error

    def variants(self, context):
        (context.artifact_dir / "partial.safetensors").write_bytes(b"")
        if self.error == "crash":
            raise RuntimeError("crashed after writing")
        if self.error == "bug":  # a lookup that fails: a KeyError, but no check raised it
            return {}["test"]
        raise BadValue("bad input found after writing")


@pytest.mark.parametrize("error", ["crash", "bug", "bad input"])
def test_a_run_failing_after_its_first_output_is_marked_failed(
    error, assets, tmp_path, monkeypatch, capsys, offline
):
    import wandb

    cwd = tmp_path / "run"
    cwd.mkdir()
    args = ["test", "-c", str(assets / "base.yaml"), f"--model.cache_dir={tmp_path / 'cache'}"]
    args += [f"--merge.method={__name__}.WritesThenFails", f"--merge.method.error={error}"]
    if error == "crash":  # a crash keeps its traceback
        with pytest.raises(RuntimeError, match="crashed after writing"):
            run_main(monkeypatch, capsys, cwd, args)
    elif error == "bug":  # of a type bad input also has: still a crash, not exit status 2
        with pytest.raises(KeyError, match="test") as raised:
            run_main(monkeypatch, capsys, cwd, args)
        assert not isinstance(raised.value, BadInput)
    else:
        code, message = run_main(monkeypatch, capsys, cwd, args)
        assert code == 2 and "mergelab: error: bad input found after writing" in message
    [folder] = (cwd / "lightning_logs" / "writes_then_fails").iterdir()
    assert (folder / "partial.safetensors").is_file()
    assert ("'test'" if error == "bug" else "after writing") in (folder / "FAILED").read_text()
    assert not (folder / "results.json").exists()
    assert wandb.run is None  # finished (as failed), not left open
    assert list((cwd / "lightning_logs" / "wandb").glob("offline-run-*"))


FIT_CASES = {
    "negative learning rate": (["--model.lr=-1"], "lr must be positive, got -1"),
    "negative weight decay": (["--model.weight_decay=-0.1"], "weight_decay must be ≥ 0"),
    "unknown task": (["--model.task=no_such_task"], "no_such_task"),
    "pretrained missing": (["--model.pretrained={root}/nowhere.pt"], "nowhere.pt"),
    "task not in the data": (["--model.task=svhn"], "'svhn'"),
}


@pytest.mark.parametrize("args, culprit", FIT_CASES.values(), ids=list(FIT_CASES))
def test_bad_fine_tuning_input_is_named_and_nothing_written(
    args, culprit, assets, tmp_path, monkeypatch, capsys, offline
):
    fill = {"root": str(assets)}
    base = yaml.safe_load((assets / "base.yaml").read_text())
    model = {k: base["model"][k] for k in ("model", "model_config", "pretrained")}
    fit = {
        "model": {
            "class_path": "mergelab.lightning.finetune.FineTuner",
            "init_args": {"task": "mnist", **model, "cache_dir": str(tmp_path / "cache")},
        },
        "data": base["data"] | {"tasks": ["mnist"]},
        "trainer": {"accelerator": "cpu", "max_steps": 1},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(fit))
    cwd = tmp_path / "run"
    cwd.mkdir()
    args = ["fit", "-c", str(tmp_path / "fit.yaml"), *(a.format(**fill) for a in args)]
    code, error = run_main(monkeypatch, capsys, cwd, args)
    assert code == 2 and "Traceback" not in error, error
    assert "mergelab: error: " in error and culprit.format(**fill) in error
    assert not list(cwd.iterdir()), "a failed run left files behind"


def test_an_unknown_wandb_mode_is_named_before_any_model_is_loaded(
    assets, tmp_path, monkeypatch, capsys, offline
):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    code, error = run_main(monkeypatch, capsys, tmp_path, ["test", "-c", str(assets / "base.yaml")])
    assert code == 2 and "mergelab: error: " in error and "WANDB_MODE='sometimes'" in error
    assert not list(tmp_path.iterdir())


def test_bad_input_shows_its_traceback_when_asked(assets, tmp_path, monkeypatch, capsys, offline):
    """With MERGELAB_TRACEBACK=1 the error propagates (the interpreter prints its
    traceback and exits with status 1)."""
    monkeypatch.setenv("MERGELAB_TRACEBACK", "1")
    args = ["test", "-c", str(assets / "base.yaml"), "--merge.method=TrustRegion"]
    with pytest.raises(ValueError, match="threshold_quantile must be in"):
        run_main(monkeypatch, capsys, tmp_path, [*args, "--merge.method.threshold_quantile=2"])


def test_a_run_folder_that_cannot_be_made_is_named(assets, tmp_path, monkeypatch, capsys, offline):
    (tmp_path / "lightning_logs").write_text("a file where the runs' folder would go\n")
    args = ["test", "-c", str(assets / "base.yaml"), f"--model.cache_dir={tmp_path / 'cache'}"]
    code, error = run_main(monkeypatch, capsys, tmp_path, args)
    assert code == 2 and "mergelab: error: " in error and "lightning_logs" in error, error
    assert [p.name for p in tmp_path.iterdir()] == ["lightning_logs"]
    assert (tmp_path / "lightning_logs").is_file()


def test_the_same_model_for_two_tasks_is_warned_about(tmp_path, caplog):
    from mergelab.lightning.evaluation import _warn_shared_sources

    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    with caplog.at_level("WARNING", logger="mergelab.lightning.evaluation"):
        _warn_shared_sources({"a": str(model), "b": str(tmp_path / "." / model.name), "c": "x"})
    [record] = caplog.records
    assert "['a', 'b']" in record.getMessage() and str(model) in record.getMessage()
