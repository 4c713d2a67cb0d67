"""``mergelab merge``: tiny transformers models (a 2-layer Llama saved in shards, a ViT in
one file) merged into their own layout, checked against naive transcriptions of the
formulas and loaded back with transformers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from mergelab import TallMasks, methods
from mergelab.checkpoint_merge.command import main as merge_main
from mergelab.engine.pool import ModelPool
from mergelab.errors import BadValue, FileInTheWay, MissingKey
from mergelab.methods.base import MergeContext

transformers = pytest.importorskip("transformers")

from tests.tiny_transformers import (  # noqa: E402
    TASKS,
    llama_config,
    noisy_copy,
    save_llama,
    weights,
    write_config,
    write_hub_folder,
)


def merge_config(tmp_path: Path, llamas: dict[str, Path], method: dict, **fields) -> Path:
    models = {task: str(llamas[task]) for task in TASKS}
    return write_config(
        tmp_path / "merge.yaml",
        base=str(llamas["base"]),
        models=models,
        output=str(tmp_path / "merged"),
        method=method,
        **fields,
    )


def naive_task_arithmetic(base: dict, models: list[dict], factor: float, dtype) -> dict:
    """θ0 + λ Σt (θt − θ0), in float32, the tasks added in order, rounded once to dtype."""
    out = {}
    for key, theta0 in base.items():
        total = torch.zeros(theta0.shape, dtype=torch.float32)
        for model in models:
            total = total + (model[key].float() - theta0.float())
        out[key] = (total * factor + theta0.float()).to(dtype)
    return out


def test_task_arithmetic_writes_the_base_layout(tmp_path, llamas):
    config = merge_config(
        tmp_path,
        llamas,
        {"class_path": "mergelab.methods.TaskArithmetic", "init_args": {"scaling_factor": 0.4}},
    )
    output = merge_main([str(config)])

    base_index = json.loads((llamas["base"] / "model.safetensors.index.json").read_text())
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]  # the same shards, the same names
    assert (output / "config.json").read_text() == (llamas["base"] / "config.json").read_text()
    assert (output / "generation_config.json").is_file()
    assert not list(tmp_path.glob(".merged*"))  # no temporary left

    models = [weights(llamas[task]) for task in TASKS]
    expected = naive_task_arithmetic(weights(llamas["base"]), models, 0.4, torch.bfloat16)
    merged = weights(output)
    assert set(merged) == set(expected)
    for key, value in expected.items():
        assert merged[key].dtype == torch.bfloat16
        torch.testing.assert_close(merged[key].float(), value.float(), rtol=2**-7, atol=0)

    card = (output / "README.md").read_text()
    assert "task_arithmetic" in card and "scaling_factor" in card
    for task in TASKS:
        assert str(llamas[task]) in card
    # the card's configuration makes the same model again
    again = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert again["method"]["init_args"]["scaling_factor"] == 0.4

    reloaded = transformers.LlamaForCausalLM.from_pretrained(output)
    state = reloaded.state_dict()
    torch.testing.assert_close(state["model.norm.weight"], merged["model.norm.weight"])


def test_output_dtype_and_config(tmp_path, llamas):
    config = merge_config(
        tmp_path,
        llamas,
        {"class_path": "mergelab.methods.TaskArithmetic", "init_args": {"scaling_factor": 0.3}},
        dtype="float32",
        max_shard_size="1GB",
    )
    output = merge_main([str(config)])
    assert (output / "model.safetensors").is_file()  # one shard: no index
    assert not (output / "model.safetensors.index.json").exists()
    models = [weights(llamas[task]) for task in TASKS]
    expected = naive_task_arithmetic(weights(llamas["base"]), models, 0.3, torch.float32)
    merged = weights(output)
    for key, value in expected.items():
        assert merged[key].dtype == torch.float32
        torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-7)
    saved = json.loads((output / "config.json").read_text())
    assert saved.get("torch_dtype", saved.get("dtype")) == "float32"


def test_resized_vocabulary_and_excluded_tensors_are_copied_and_named(tmp_path, llamas, caplog):
    resized = noisy_copy(transformers.LlamaForCausalLM(llama_config(72)).state_dict(), 9)
    resized = {k: v.to(torch.bfloat16) for k, v in resized.items()}
    for key, value in weights(llamas["alpha"]).items():
        if "embed_tokens" not in key and "lm_head" not in key:
            resized[key] = value
    folder = save_llama(tmp_path / "resized", resized, llama_config(72))
    config = write_config(
        tmp_path / "merge.yaml",
        base=str(llamas["base"]),
        models={"resized": str(folder), "beta": str(llamas["beta"])},
        output=str(tmp_path / "merged"),
        exclude=["model.norm.*"],
    )
    with caplog.at_level("INFO", logger="mergelab"):
        output = merge_main([str(config)])
    base = weights(llamas["base"])
    merged = weights(output)
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(merged[key], base[key])
        assert key in caplog.text
        assert f"`{key}`" in (output / "README.md").read_text()
    assert not torch.equal(
        merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]
    )


def test_ties_dare_and_zero_shot_trust_region_match_the_python_api(tmp_path, llamas):
    """DARE's sum is streamed a parameter at a time (DARE + TIES, whole): both as the
    method's δ of the whole model."""
    base = weights(llamas["base"])
    models = {task: weights(llamas[task]) for task in TASKS}
    pool = ModelPool(base, models)
    context = MergeContext(list(TASKS), lambda: base, lambda: pool)
    for number, (name, init_args) in enumerate(
        [
            ("Ties", {"scaling_factor": 0.5, "keep": 0.3}),
            ("TrustRegion", {"scaling_factor": 0.5, "threshold_quantile": 0.9}),
            ("Dare", {"scaling_factor": 0.5, "drop_rate": 0.3, "seed": 4}),
            ("Dare", {"scaling_factor": 0.5, "drop_rate": 0.3, "ties": 0.5}),
        ]
    ):
        folder = tmp_path / f"{number}-{name}"
        folder.mkdir()
        method = {"class_path": f"mergelab.methods.{name}", "init_args": init_args}
        output = merge_main([str(merge_config(folder, llamas, method, dtype="float32"))])
        merged = weights(output)
        delta = getattr(methods, name)(**init_args).merged_task_vector(pool, context, None)
        assert set(merged) == set(base)
        for key, theta0 in base.items():
            expected = theta0.float() + 0.5 * delta[key]
            torch.testing.assert_close(merged[key], expected, rtol=1e-6, atol=1e-7)


def test_consensus_matches_the_python_api(tmp_path, llamas):
    """Consensus (k = 2 of the three tasks' TALL masks at λ 0.4, α 0.6): its masks streamed
    to a work folder beside the output, which is gone afterwards."""
    method = {
        "class_path": "mergelab.methods.Consensus",
        "init_args": {"k": 2, "scaling_factor": 0.6, "tall_lambda": 0.4},
    }
    output = merge_main([str(merge_config(tmp_path, llamas, method, dtype="float32"))])
    base = weights(llamas["base"])
    masks = TallMasks.build(base, {task: weights(llamas[task]) for task in TASKS}, [0.4])
    lambdas = dict.fromkeys(TASKS, 0.4)
    expected = masks.consensus({k: v.float() for k, v in base.items()}, 2, 0.6, lambdas)
    merged = weights(output)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml", "merged"]


def test_a_hub_model_with_pickled_weights_only(tmp_path, llamas, monkeypatch):
    """A hub repository of pytorch_model.bin (no safetensors) is read from it; the hub
    cache found offline, as snapshot_download leaves it."""
    import huggingface_hub.constants

    state = weights(llamas["beta"])
    (tmp_path / "pickled").mkdir()
    torch.save(state, tmp_path / "pickled" / "pytorch_model.bin")  # as older transformers did
    shutil.copy(llamas["beta"] / "config.json", tmp_path / "pickled")
    write_hub_folder(tmp_path / "hub", "org/pickled-beta", tmp_path / "pickled")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = write_config(
        tmp_path / "merge.yaml",
        base=str(llamas["base"]),
        models={"alpha": str(llamas["alpha"]), "beta": "org/pickled-beta"},
        output=str(tmp_path / "merged"),
    )
    merged = weights(merge_main([str(config)]))
    models = [weights(llamas["alpha"]), state]
    expected = naive_task_arithmetic(weights(llamas["base"]), models, 0.3, torch.bfloat16)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key].float(), value.float(), rtol=2**-7, atol=0)


def test_a_single_file_vit(tmp_path):
    config = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=8,
        num_labels=3,
    )
    torch.manual_seed(1)
    base = transformers.ViTForImageClassification(config)
    base.save_pretrained(tmp_path / "base")
    for seed, task in enumerate(("cars", "dtd"), start=2):
        base.load_state_dict(noisy_copy(base.state_dict(), seed))
        base.save_pretrained(tmp_path / task)
    merge = write_config(
        tmp_path / "vit.yaml",
        base=str(tmp_path / "base"),
        models={task: str(tmp_path / task) for task in ("cars", "dtd")},
        output=str(tmp_path / "merged"),
        method={
            "class_path": "mergelab.methods.TaskArithmetic",
            "init_args": {"scaling_factor": 1.0},
        },
    )
    output = merge_main([str(merge)])
    assert sorted(p.name for p in output.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    transformers.ViTForImageClassification.from_pretrained(output)


def test_bad_input_is_refused_before_anything_is_written(tmp_path, llamas):
    ta = {"class_path": "mergelab.methods.TaskArithmetic", "init_args": {"scaling_factor": 0.3}}
    (tmp_path / "merged").mkdir()
    with pytest.raises(FileInTheWay, match="merged"):
        merge_main([str(merge_config(tmp_path, llamas, ta))])
    (tmp_path / "merged").rmdir()

    listed = {
        "class_path": "mergelab.methods.TaskArithmetic",
        "init_args": {"scaling_factor": [0.3, 0.5]},
    }
    with pytest.raises(BadValue, match="one value"):
        merge_main([str(merge_config(tmp_path, llamas, listed))])
    with pytest.raises(BadValue, match="TallMasks does not yield one"):
        tall = {"class_path": "mergelab.methods.TallMasks"}
        merge_main([str(merge_config(tmp_path, llamas, tall))])
    with pytest.raises(BadValue, match="dtype 'int8'"):
        merge_main([str(merge_config(tmp_path, llamas, ta, dtype="int8"))])

    partial = tmp_path / "partial"
    state = weights(llamas["beta"])
    del state["model.layers.1.mlp.up_proj.weight"]
    partial.mkdir()
    from safetensors.torch import save_file

    save_file(state, partial / "model.safetensors")
    config = write_config(
        tmp_path / "partial.yaml",
        base=str(llamas["base"]),
        models={"alpha": str(llamas["alpha"]), "partial": str(partial)},
        output=str(tmp_path / "merged"),
    )
    with pytest.raises(MissingKey, match=re.escape("'partial' lacks 'model.layers.1.mlp.up_proj")):
        merge_main([str(config)])
    assert not (tmp_path / "merged").exists()
    assert not list(tmp_path.glob(".merged*"))


@pytest.mark.parametrize("method", ["TaskArithmetic", "TrustRegion", "Ties", "Mergekit"])
def test_a_failure_midway_leaves_nothing(tmp_path, llamas, method):
    """A fine-tuned model with NaN in its last layer: refused, naming it (Task Arithmetic
    while the first shards are already written; TATR, TIES and mergekit's rules in their
    first pass or read); the
    output folder never appears and its temporary is removed."""
    init_args = {"weights": {"alpha": 0.5, "broken": 0.5}} if method == "Mergekit" else {}
    state = weights(llamas["gamma"])
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    broken = tmp_path / "broken"
    save_llama(broken, state, llama_config())
    config = write_config(
        tmp_path / "merge.yaml",
        base=str(llamas["base"]),
        models={"alpha": str(llamas["alpha"]), "broken": str(broken)},
        output=str(tmp_path / "merged"),
        method={"class_path": f"mergelab.methods.{method}", "init_args": init_args},
    )
    with pytest.raises(BadValue, match="'broken' has NaN"):
        merge_main([str(config)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "merge.yaml"]


MERGE_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "merge").glob("*.yaml"))


@pytest.mark.parametrize("config", MERGE_CONFIGS, ids=lambda path: path.stem)
def test_every_merge_config_runs_as_written(tmp_path, llamas, config):
    """The installed console script on each shipped config, its hub ids found offline in a
    hub cache that holds the tiny Llamas, as snapshot_download leaves it."""
    fields = yaml.safe_load(config.read_text())
    hub = tmp_path / "hub"
    write_hub_folder(hub, fields["base"], llamas["base"])
    for repo_id, task in zip(fields["models"].values(), TASKS, strict=False):
        write_hub_folder(hub, repo_id, llamas[task])
    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    command = "compress" if "tall_lambda" in fields else "merge"
    output = tmp_path / "output"
    done = subprocess.run(
        ["mergelab", command, str(config), f"--output={output}"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    if command == "compress":
        task = next(iter(fields["models"]))
        done = subprocess.run(
            ["mergelab", "retrieve", str(output), task, f"--output={tmp_path / task}"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        output = tmp_path / task
    assert set(weights(output)) == set(weights(llamas["base"]))


def test_the_console_reports_bad_input_in_one_line(tmp_path, llamas):
    config = write_config(
        tmp_path / "merge.yaml",
        base=str(llamas["base"]),
        models={"alpha": "org/missing", "beta": str(llamas["beta"])},
        output=str(tmp_path / "merged"),
    )
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        ["mergelab", "merge", str(config)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith("mergelab: error: ")
    assert "org/missing" in done.stderr and "Traceback" not in done.stderr
