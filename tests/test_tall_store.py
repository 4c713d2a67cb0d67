"""``mergelab compress`` and ``retrieve``: TALL masks of any model, kept in a store at one
bit per parameter per task, and each task's model written back in the base's layout,
checked against a naive transcription of the TALL mask and retrieval formulas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergelab.checkpoint_merge.tall_store import compress_main, retrieve_main
from mergelab.engine.checkpoints import SafetensorsCheckpoint
from mergelab.errors import BadValue, FileInTheWay, MissingKey

pytest.importorskip("transformers")

from tests.tiny_transformers import (
    TASKS,
    llama_config,
    noisy_copy,
    save_llama,
    weights,
    write_config,
)


def naive_retrieval(base: dict, models: dict, task: str, lam: float) -> dict:
    """θ0 + mt ⊙ τMTL with mt = 1{|τt| > λ·|τMTL − τt|}, τMTL = Σ τs, in float32,
    rounded once to the base's dtype."""
    out = {}
    for key, theta0 in base.items():
        taus = [model[key].float() - theta0.float() for model in models.values()]
        mtl = torch.zeros_like(taus[0])
        for tau in taus:
            mtl = mtl + tau
        own = models[task][key].float() - theta0.float()
        mask = own.abs() > lam * (mtl - own).abs()
        out[key] = (theta0.float() + torch.where(mask, mtl, 0.0)).to(theta0.dtype)
    return out


def compress(tmp_path: Path, llamas: dict, **fields) -> Path:
    config = write_config(
        tmp_path / "compress.yaml",
        base=str(llamas["base"]),
        models={task: str(llamas[task]) for task in TASKS},
        output=str(tmp_path / "store"),
        **fields,
    )
    return compress_main([str(config)])


def test_every_task_retrieved_in_the_base_layout(tmp_path, llamas, capsys, monkeypatch):
    store = compress(tmp_path, llamas, tall_lambda=0.4)
    assert "τMTL and 3 masks" in capsys.readouterr().out
    base = weights(llamas["base"])
    models = {task: weights(llamas[task]) for task in TASKS}
    read_from_store: list[str] = []
    original = SafetensorsCheckpoint.read_into

    def recording(self, key, out, start=0, stop=None):
        if self.path.name == "tall_masks.safetensors":
            read_from_store.append(key)
        return original(self, key, out, start, stop)

    monkeypatch.setattr(SafetensorsCheckpoint, "read_into", recording)
    for task in TASKS:
        read_from_store.clear()
        output = retrieve_main([str(store), task, f"--output={tmp_path / task}"])
        assert {key.split("/")[0] for key in read_from_store} == {"mtl", "mask"}
        assert {key.split("/")[1] for key in read_from_store if key.startswith("mask/")} == {task}
        index = json.loads((output / "model.safetensors.index.json").read_text())
        base_index = json.loads((llamas["base"] / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == base_index["weight_map"]
        assert (output / "config.json").is_file()
        retrieved = weights(output)
        for key, expected in naive_retrieval(base, models, task, 0.4).items():
            assert retrieved[key].dtype == expected.dtype
            torch.testing.assert_close(retrieved[key].float(), expected.float(), rtol=2**-7, atol=0)


def test_each_task_at_its_best_lambda_from_a_scores_file(tmp_path, llamas):
    scores = tmp_path / "scores.yaml"
    scores.write_text(
        "alpha: {0.2: 80.0, 0.4: 82.5, 0.6: 81.0}\n"
        "beta: {0.2: 70.0, 0.4: 70.0, 0.6: 69.0}\n"  # a tie: the first listed wins
        "gamma: {0.2: 60.0, 0.4: 61.0, 0.6: 65.0}\n"
    )
    store = compress(tmp_path, llamas, scores=str(scores))
    info = json.loads((store / "store.json").read_text())
    assert {task: entry["lambda"] for task, entry in info["tasks"].items()} == {
        "alpha": 0.4,
        "beta": 0.2,
        "gamma": 0.6,
    }
    masks = SafetensorsCheckpoint(store / "tall_masks.safetensors")
    stored = {tuple(key.split("/")[1:3]) for key in masks if key.startswith("mask/")}
    assert stored == {("alpha", "0.4"), ("beta", "0.2"), ("gamma", "0.6")}  # one mask a task
    output = retrieve_main([str(store), "gamma", f"--output={tmp_path / 'gamma'}"])
    base = weights(llamas["base"])
    models = {task: weights(llamas[task]) for task in TASKS}
    retrieved = weights(output)
    for key, expected in naive_retrieval(base, models, "gamma", 0.6).items():
        torch.testing.assert_close(retrieved[key].float(), expected.float(), rtol=2**-7, atol=0)


def test_bad_input_named_before_anything_is_written(tmp_path, llamas):
    with pytest.raises(BadValue, match="give tall_lambda or a scores file, not neither"):
        compress(tmp_path, llamas)
    missing = tmp_path / "scores.yaml"
    missing.write_text("alpha: {0.3: 1.0}\nbeta: {0.3: 1.0}\n")
    with pytest.raises(MissingKey, match="task 'gamma'"):
        compress(tmp_path, llamas, scores=str(missing))
    assert not (tmp_path / "store").exists()

    store = compress(tmp_path, llamas, tall_lambda=0.3)
    with pytest.raises(FileInTheWay, match="store"):
        compress(tmp_path, llamas, tall_lambda=0.3)
    with pytest.raises(MissingKey, match="task 'delta' is not in the store"):
        retrieve_main([str(store), "delta", f"--output={tmp_path / 'out'}"])

    other = tmp_path / "other_base"
    state = noisy_copy(weights(llamas["base"]), 42)
    save_llama(other, state, llama_config())
    with pytest.raises(BadValue, match="is not the base model of the store"):
        retrieve_main([str(store), "alpha", f"--output={tmp_path / 'out'}", f"--base={other}"])
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
