"""The embedded benchmark: built once per preset and cache, resolved from ``embedded:``
references, checked against its manifest, resumed after an interruption, rebuilt when
corrupt; and ``mergelab embedded`` end to end on the ``test`` preset."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import embedded_env

from mergelab.cli import class_of
from mergelab.embedded import resolve
from mergelab.embedded.benchmark import GRADIENTS, benchmark_methods
from mergelab.embedded.build import ASSETS, MANIFEST, EmbeddedBenchmark
from mergelab.embedded.preset import PRESETS, get_preset
from mergelab.embedded.scenes import TASKS
from mergelab.engine.checkpoints import SafetensorsCheckpoint
from mergelab.registry import CONFIGS, REFERENCES, method_configs
from mergelab.tasks import load_task

MERGELAB = shutil.which("mergelab")


def _copy(cache: Path, to: Path) -> EmbeddedBenchmark:
    """A copy of the built test preset in another cache folder."""
    source = EmbeddedBenchmark("test", str(cache)).root
    target = EmbeddedBenchmark("test", str(to))
    shutil.copytree(source, target.root)
    return target


def _interrupted_before_last_step(built: Path, staging: Path) -> None:
    """Staging as a build leaves it when stopped before its last step."""
    shutil.copytree(built, staging)
    (staging / MANIFEST).unlink()
    (staging / ASSETS["finetuned_accuracy"]).unlink()
    for name in ["datasets", "pretrained", *(f"finetuned/{t}" for t in TASKS)]:
        (staging / ".steps" / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / ".steps" / name).touch()


def test_built_assets_are_the_real_layouts(embedded_cache, monkeypatch):
    monkeypatch.setenv("MERGELAB_CACHE", str(embedded_cache))
    monkeypatch.setenv("MERGELAB_EMBEDDED_PRESET", "test")
    benchmark = EmbeddedBenchmark()
    assert benchmark.check() is None
    assert resolve("embedded:pretrained") == str(benchmark.root / "pretrained.safetensors")
    assert resolve("/some/other/path") == "/some/other/path"
    for task in TASKS:
        spec = load_task(resolve(f"embedded:tasks/{task}"))  # its dataset is relative to it
        assert spec.name == task and Path(spec.dataset).is_dir()
        encoder = SafetensorsCheckpoint(resolve(f"embedded:finetuned/{task}"))
        assert "conv1.weight" in encoder
    accuracy = json.loads(Path(resolve("embedded:finetuned_accuracy")).read_text())
    assert set(accuracy["headline"]["accuracy"]) == set(TASKS)
    manifest = json.loads((benchmark.root / MANIFEST).read_text())
    assert set(ASSETS.values()) <= set(manifest["files"])


def test_unknown_asset_and_preset_are_named(embedded_cache, monkeypatch):
    monkeypatch.setenv("MERGELAB_CACHE", str(embedded_cache))
    monkeypatch.setenv("MERGELAB_EMBEDDED_PRESET", "test")
    with pytest.raises(KeyError, match="pretrianed"):
        resolve("embedded:pretrianed")
    monkeypatch.setenv("MERGELAB_EMBEDDED_PRESET", "huge")
    with pytest.raises(KeyError, match="huge"):
        get_preset()


def test_presets_name_their_cache_folder_by_content():
    keys = {name: preset.key for name, preset in PRESETS.items()}
    assert len(set(keys.values())) == len(PRESETS)
    assert all(key.startswith(f"{name}-") for name, key in keys.items())
    changed = dataclasses.replace(PRESETS["test"], finetune_steps=3)
    assert changed.key != keys["test"] and changed.key.startswith("test-")


def test_an_interrupted_build_resumes_its_unfinished_steps(embedded_cache, tmp_path):
    """Staging holds every step but the last: only that one runs again, and the result
    matches the original build file for file."""
    original = EmbeddedBenchmark("test", str(embedded_cache))
    resumed = EmbeddedBenchmark("test", str(tmp_path))
    _interrupted_before_last_step(original.root, resumed.staging)
    pretrained_mtime = (resumed.staging / "pretrained.safetensors").stat().st_mtime_ns

    resumed.ensure()
    assert not resumed.staging.exists() and resumed.check() is None
    assert (resumed.root / "pretrained.safetensors").stat().st_mtime_ns == pretrained_mtime
    files = json.loads((resumed.root / MANIFEST).read_text())["files"]
    expected = json.loads((original.root / MANIFEST).read_text())["files"]
    for name in ("pretrained.safetensors", "tasks/shape.yaml", "finetuned/shape.safetensors"):
        assert files[name] == expected[name]


def test_a_corrupt_cache_is_detected_and_rebuilt(embedded_cache, tmp_path):
    benchmark = _copy(embedded_cache, tmp_path)
    target = benchmark.root / ASSETS["finetuned/count"]
    target.write_bytes(target.read_bytes()[:-8] + b"\0" * 8)
    assert "finetuned/count.safetensors differs" in benchmark.check()
    first = next(iter(json.loads((benchmark.root / MANIFEST).read_text())["files"]))
    (benchmark.root / first).unlink()  # checked first, before the corrupt file
    assert benchmark.check() == f"{first} is missing"

    # the rebuild may resume from a staging folder, never from the corrupt one
    built = EmbeddedBenchmark("test", str(embedded_cache)).root
    _interrupted_before_last_step(built, benchmark.staging)
    benchmark.ensure()
    assert benchmark.check() is None
    assert target.read_bytes() == (built / ASSETS["finetuned/count"]).read_bytes()
    assert not list(tmp_path.glob("embedded/*.discarded-*"))


@pytest.mark.skipif(MERGELAB is None, reason="needs `pip install -e .`")
def test_a_run_builds_what_is_missing_on_first_use(embedded_cache, tmp_path):
    """A plain `mergelab validate` on a cache without the benchmark builds it (here the
    last fine-tuning and the accuracy step, the rest staged) inside the CLI, then runs."""
    built = EmbeddedBenchmark("test", str(embedded_cache)).root
    benchmark = EmbeddedBenchmark("test", str(tmp_path / "cache"))
    _interrupted_before_last_step(built, benchmark.staging)
    (benchmark.staging / ".steps" / "finetuned" / "stripes").unlink()
    (benchmark.staging / ASSETS["finetuned/stripes"]).unlink()
    configs = ["--config", str(CONFIGS / "embedded" / "base.yaml")]
    configs += ["--config", str(CONFIGS / "methods" / "zero_shot.yaml")]
    result = subprocess.run(
        [MERGELAB, "validate", *configs],
        env=embedded_env(tmp_path / "cache"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert benchmark.check() is None
    assert (benchmark.root / ASSETS["finetuned/stripes"]).is_file()
    assert list((tmp_path / "lightning_logs" / "zero_shot").glob("version_*/results_val.json"))


def test_an_unwritable_cache_is_a_clear_error_before_any_work(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    benchmark = EmbeddedBenchmark("test", str(blocker / "cache"))
    with pytest.raises(PermissionError, match=r"not writable.*--cache-dir"):
        benchmark.ensure()


@pytest.mark.skipif(MERGELAB is None, reason="needs `pip install -e .`")
def test_main_command_runs_every_method_and_writes_the_comparison(embedded_cache, tmp_path):
    output = tmp_path / "summary"
    result = run_mergelab(embedded_cache, tmp_path, "embedded", "--output", str(output))
    runs = json.loads((output / "summary.json").read_text())
    methods = benchmark_methods()
    assert list(runs) == methods
    configs = method_configs()
    for method, document in runs.items():
        config = configs["trust_region" if method == GRADIENTS else method]
        expected = class_of(config.class_path).name
        assert document["settings"]["method"] == expected
        # the references score test alone: one model, nothing to pick
        assert document["picked_on"] == (None if method in REFERENCES else "val")
        assert (tmp_path / "lightning_logs" / expected / "version_0" / "results.json").is_file()
    # zero-shot TATR, TATR with gradients and TATR + TIES: runs of their own
    trust_region_runs = [m for m in methods if m.startswith("trust_region")]
    runs_folder = tmp_path / "lightning_logs" / "trust_region"
    assert len(list(runs_folder.glob("version_*/results.json"))) == len(trust_region_runs)
    # TATR with gradients: the statistics of fit, cached, then scored like zero-shot TATR
    assert runs["trust_region_gradients"]["settings"]["gradient_stats"]
    assert runs["trust_region"]["settings"]["gradient_stats"] is None
    assert list((tmp_path / "lightning_logs" / "gradient_stats").glob("version_0/*.safetensors"))
    table = (output / "summary.md").read_text()
    assert table in result.stdout
    assert all(f"| {m} |" in table for m in runs)
    assert (output / "summary.png").stat().st_size > 0
    # the fine-tuned row's normalised accuracy is 100 % by definition
    finetuned = runs["finetuned"]["headline"]
    assert finetuned["avg_normalized_acc"] == pytest.approx(1.0)
    # a quiet console: one line per method with its seconds, the table, no banners
    console = result.stdout + result.stderr
    for method in methods:
        assert re.search(rf"^\[mergelab\] {method}: \d+ s, ", console, re.MULTILINE), method
    for banner in QUIET:
        assert banner not in console
    assert "Testing" not in console  # the runs' progress bars
    assert "site-packages" not in console  # where every library warning names its source


# what Lightning, W&B and torch print on every run, silenced unless --verbose
QUIET = ["GPU available", "💡 Tip", "LeafSpec", "No seed found", "Seed set to"]


def test_verbose_brings_back_the_banners(embedded_cache, tmp_path):
    result = run_mergelab(
        embedded_cache, tmp_path, "embedded", "--methods", "zero_shot", "--verbose"
    )
    assert "GPU available" in result.stdout + result.stderr


@pytest.mark.skipif(MERGELAB is None, reason="needs `pip install -e .`")
def test_a_plain_test_run_is_quiet_unless_verbose(embedded_cache, tmp_path):
    """`mergelab test` shows its progress bar, its table and where it wrote them; the
    banners and the harmless warnings come back with --verbose."""
    configs = ["-c", str(CONFIGS / "embedded" / "base.yaml")]
    configs += ["-c", str(CONFIGS / "methods" / "zero_shot.yaml")]
    consoles = {}
    for verbose in ([], ["--verbose"]):
        result = run_mergelab(embedded_cache, tmp_path, "test", *configs, *verbose)
        assert "results written to" in result.stdout and "| zero_shot |" in result.stdout
        consoles[bool(verbose)] = result.stdout + result.stderr
    assert not [banner for banner in QUIET if banner in consoles[False]]
    assert "site-packages" not in consoles[False]  # no library warning
    assert "Testing" in consoles[False]  # the one progress display
    assert "GPU available" in consoles[True] and "No seed found" in consoles[True]


def run_mergelab(cache: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``mergelab *args`` on the test preset in ``cwd``, asserted to succeed."""
    result = subprocess.run(
        [MERGELAB, *args],
        env=embedded_env(cache),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _build_elsewhere(cache: Path, env: dict[str, str], setup: str = "") -> dict:
    """The test preset built in a fresh process and cache, pinned to one core, under
    ``env``; its manifest's files (size and SHA-256 of each)."""
    code = (
        "import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        f"import mergelab.embedded.build as build; {setup}"
        "build.EmbeddedBenchmark('test', sys.argv[1]).ensure()"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(cache)],
        env={**os.environ, **env},
        check=True,
        timeout=600,
        capture_output=True,
    )
    return json.loads((EmbeddedBenchmark("test", str(cache)).root / MANIFEST).read_text())["files"]


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_every_cpu_builds_identical_files(embedded_cache, tmp_path, capability):
    """The session's build (this machine's own vector unit, every core: its steps shared
    out among one process per core) against one on a single core, in one process, with
    torch told to run another CPU's kernels: every file the same, byte for byte (the
    manifest's SHA-256 of each)."""
    built = EmbeddedBenchmark("test", str(embedded_cache)).root
    files = _build_elsewhere(tmp_path, {"ATEN_CPU_CAPABILITY": capability})
    assert files == json.loads((built / MANIFEST).read_text())["files"]


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="a CPU without AVX2"
)
def test_without_the_build_environment_the_kernels_change_the_files(embedded_cache, tmp_path):
    """The control of the test above: with the build's kernels left to the CPU (its
    environment emptied), AVX2 kernels train other weights than the portable ones."""
    built = EmbeddedBenchmark("test", str(embedded_cache)).root
    expected = json.loads((built / MANIFEST).read_text())["files"]
    setup = "build.BUILD_ENVIRONMENT.clear(); "
    files = _build_elsewhere(tmp_path, {"ATEN_CPU_CAPABILITY": "avx2"}, setup)
    assert files["tasks/shape.yaml"] == expected["tasks/shape.yaml"]  # the data: numpy's
    assert files["pretrained.safetensors"] != expected["pretrained.safetensors"]
