"""Hugging Face model folders, sharded or not: read lazily by ``ShardedCheckpoint`` and
``open_checkpoint``, written by ``ShardedWriter``; checked against what the safetensors
library and ``transformers`` themselves read and write."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mergelab.engine.checkpoints import SafetensorsCheckpoint, TensorSpec, tensor_spec
from mergelab.engine.model_files import (
    INDEX,
    ShardedCheckpoint,
    ShardedWriter,
    open_checkpoint,
)
from mergelab.engine.task_arithmetic import task_arithmetic
from mergelab.errors import BadInput

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]


def write(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> Path:
    specs = {key: TensorSpec(tuple(t.shape), t.dtype) for key, t in tensors.items()}
    with ShardedWriter(folder, specs, max_shard_bytes) as writer:
        for key, tensor in tensors.items():
            writer[key] = tensor
    return folder


def random_tensors(sizes: list[tuple[int, int]], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (rows, dtype_index) in enumerate(sizes):
        values = torch.randn(rows, 3, generator=generator) * 100
        tensors[f"layers.{i}.weight"] = values.to(DTYPES[dtype_index])
    return tensors


@given(
    sizes=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 3)), min_size=1, max_size=8),
    max_shard_bytes=st.integers(1, 600),
    seed=st.integers(0, 2**16),
)
def test_written_shards_are_what_save_pretrained_writes(
    tmp_path_factory, sizes, max_shard_bytes, seed
):
    """Every tensor back, bit for bit, read by the safetensors library from the file the
    index names; each shard within the limit unless one tensor alone exceeds it; the
    index's total size the sum of the tensors' bytes; one shard: model.safetensors and no
    index."""
    tensors = random_tensors(sizes, seed)
    folder = write(tmp_path_factory.mktemp("w") / "model", tensors, max_shard_bytes)
    files = sorted(p.name for p in folder.iterdir())
    if (folder / INDEX).exists():
        index = json.loads((folder / INDEX).read_text())
        weight_map = index["weight_map"]
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in tensors.values()
        )
        shards = sorted(set(weight_map.values()))
        assert files == sorted([INDEX, *shards]) and len(shards) > 1
        assert shards == [
            f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
        ]
    else:
        assert files == ["model.safetensors"]
        weight_map = dict.fromkeys(tensors, "model.safetensors")
    for name in set(weight_map.values()):
        shard = load_file(folder / name)
        nbytes = sum(t.numel() * t.element_size() for t in shard.values())
        assert nbytes <= max_shard_bytes or len(shard) == 1
        for key, tensor in shard.items():
            assert weight_map[key] == name
            assert torch.equal(tensor, tensors[key]) and tensor.dtype == tensors[key].dtype
    assert set(weight_map) == set(tensors)
    read = open_checkpoint(folder)
    assert list(read) == list(tensors)  # the shards' order: the written order
    assert all(torch.equal(read[k], t) for k, t in tensors.items())


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_a_sharded_llama_folder_reads_as_its_state_dict(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "llama", max_shard_size="8KB")
    assert (tmp_path / "llama" / INDEX).is_file()
    checkpoint = open_checkpoint(tmp_path / "llama")
    assert isinstance(checkpoint, ShardedCheckpoint) and len(checkpoint.shards) > 2
    state = model.state_dict()
    assert set(checkpoint) == set(state)  # no tied weights here: every tensor is saved
    for key, tensor in state.items():
        assert tensor_spec(checkpoint, key) == TensorSpec(tuple(tensor.shape), tensor.dtype)
        assert torch.equal(checkpoint[key], tensor)


def test_transformers_loads_what_the_writer_wrote(tmp_path):
    """A folder written by ShardedWriter (with the model's config.json) is one that
    ``from_pretrained`` loads to the same weights."""
    transformers = pytest.importorskip("transformers")
    model = tiny_llama()
    model.save_pretrained(tmp_path / "source")
    source = open_checkpoint(tmp_path / "source")
    out = tmp_path / "out"
    with ShardedWriter(out, {k: source.spec(k) for k in source}, 6000) as writer:
        (writer.staging / "config.json").write_bytes((tmp_path / "source/config.json").read_bytes())
        for key in source:
            writer[key] = source[key]
    assert len(json.loads((out / INDEX).read_text())["weight_map"]) == len(source)
    loaded = transformers.LlamaForCausalLM.from_pretrained(out)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_merging_sharded_folders_equals_merging_their_tensors(tmp_path):
    """The engine reads sharded folders as it reads files: Task Arithmetic over three
    sharded models equals θ0 + λ Σ τt computed here from the tensors."""
    base = random_tensors([(30, 0), (7, 0), (12, 0)], seed=0)
    tuned = [
        {k: v + 0.1 * (i + 1) * torch.randn_like(v) for k, v in base.items()} for i in range(2)
    ]
    write(tmp_path / "base", base, 200)
    for i, state in enumerate(tuned):
        write(tmp_path / f"t{i}", state, 200)
    finetuned = {f"task{i}": tmp_path / f"t{i}" for i in range(2)}
    [merged] = task_arithmetic(tmp_path / "base", finetuned, scaling_factor=[0.3])
    for key, theta0 in base.items():
        expected = theta0 + 0.3 * sum(state[key] - theta0 for state in tuned)
        assert torch.allclose(merged[key], expected, rtol=1e-6, atol=1e-6), key


def sharded(tmp_path: Path) -> Path:
    return write(tmp_path / "model", random_tensors([(20, 0)] * 3, seed=1), 300)


def broken(tmp_path: Path, case: str) -> Path:
    folder = sharded(tmp_path)
    index_path = folder / INDEX
    index = json.loads(index_path.read_text())
    if case == "not json":
        index_path.write_text("{'weight_map': ")
    elif case == "no weight map":
        index_path.write_text(json.dumps({"metadata": {}}))
    elif case == "shard file missing":
        (folder / "model-00002-of-00003.safetensors").unlink()
    elif case == "shard left out of the index":
        index["weight_map"] = {
            k: v for k, v in index["weight_map"].items() if not v.startswith("model-00003")
        }
        index_path.write_text(json.dumps(index))
    elif case == "key not in its shard":
        index["weight_map"]["layers.9.weight"] = "model-00001-of-00003.safetensors"
        index_path.write_text(json.dumps(index))
    elif case == "shard holds an unplaced key":
        shard = folder / "model-00001-of-00003.safetensors"
        save_file(load_file(shard) | {"extra": torch.ones(2)}, shard)
    elif case == "shard outside the folder":
        index["weight_map"]["layers.0.weight"] = "../model-00001-of-00003.safetensors"
        index_path.write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize(
    "case, named",
    [
        ("not json", f"{INDEX}: not JSON"),
        ("no weight map", f"{INDEX}: no 'weight_map'"),
        ("shard file missing", "names shard 'model-00002-of-00003.safetensors', which is not in"),
        ("shard left out of the index", "no tensor in shard model-00003-of-00003.safetensors"),
        ("key not in its shard", "places 'layers.9.weight' in model-00001-of-00003.safetensors"),
        ("shard holds an unplaced key", "holds 'extra', which"),
        ("shard outside the folder", "is not a file in its folder"),
    ],
)
def test_a_broken_folder_is_named_before_any_tensor_is_read(tmp_path, case, named):
    folder = broken(tmp_path, case)
    with pytest.raises(BadInput, match=named.replace("(", r"\(").replace(".", r"\.")):
        open_checkpoint(folder)


def test_nothing_half_written_and_no_folder_replaced(tmp_path):
    tensors = random_tensors([(20, 0)] * 3, seed=2)
    specs = {key: TensorSpec(tuple(t.shape), t.dtype) for key, t in tensors.items()}
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="stopped"), ShardedWriter(out, specs, 300) as writer:
        writer["layers.0.weight"] = tensors["layers.0.weight"]
        raise RuntimeError("stopped")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary
    closed_early = pytest.raises(RuntimeError, match=r"closed before 'layers\.1\.weight'")
    with closed_early, ShardedWriter(out, specs, 300) as writer:
        writer["layers.0.weight"] = tensors["layers.0.weight"]
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    with pytest.raises(BadInput, match=f"{out} exists"):
        ShardedWriter(out, specs, 300)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_written_tensors_are_patched_in_place_and_a_restart_drops_them(tmp_path, dtype):
    """Elements of tensors already written overwritten in place (a closed shard and the
    open one); a patch of a tensor not yet written, or in another dtype, refused; a
    restart drops what was written, and what is written again is what the folder holds."""
    tensors = {f"t{n}": torch.arange(10.0 * n, 10.0 * n + 10).to(dtype) for n in range(3)}
    specs = {key: tensor_spec(tensors, key) for key in tensors}
    writer = ShardedWriter(tmp_path / "out", specs, [["t0", "t1"], ["t2"]])
    writer["t0"] = tensors["t0"]
    with pytest.raises(BadInput, match="'t1' patched before it was written"):
        writer.patch("t1", np.array([0]), torch.zeros(1, dtype=dtype))
    writer["t1"] = tensors["t1"]
    writer["t2"] = tensors["t2"]
    with pytest.raises(BadInput, match=r"'t2' patched with 1 torch\.float64 values"):
        writer.patch("t2", np.array([0]), torch.zeros(1, dtype=torch.float64))
    writer.patch("t0", np.array([1, 9]), torch.tensor([-1.0, -9.0], dtype=dtype))
    writer.patch("t2", np.array([0]), torch.tensor([-20.0], dtype=dtype))
    writer.restart()
    assert not list(writer.staging.iterdir())
    for key, tensor in tensors.items():
        writer[key] = tensor
    writer.patch("t1", np.array([4]), torch.tensor([-14.0], dtype=dtype))
    folder = writer.close()
    written = {}
    for shard in sorted(folder.glob("*.safetensors")):
        written |= load_file(shard)
    expected = {key: tensor.clone() for key, tensor in tensors.items()}
    expected["t1"][4] = -14
    assert {key: value.tolist() for key, value in written.items()} == {
        key: value.tolist() for key, value in expected.items()
    }


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_read_ahead_asks_for_the_bytes_of_the_elements_given(tmp_path, monkeypatch):
    """The range asked of the operating system: elements [2, 5) of the second tensor, its
    offset from the file's own header (8 bytes of length, the JSON, then the data)."""
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(3, dtype=torch.bfloat16), "b": torch.zeros(7)}, str(path))
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    start = json.loads(raw[8 : 8 + length])["b"]["data_offsets"][0]
    asked = []
    monkeypatch.setattr(os, "posix_fadvise", lambda *args: asked.append(args[1:]))
    checkpoint = SafetensorsCheckpoint(path)
    checkpoint.read_ahead("b", 2, 5)
    assert asked[-1] == (8 + length + start + 2 * 4, 3 * 4, os.POSIX_FADV_WILLNEED)
    checkpoint.close()
