"""Synthetic Llama-shaped checkpoints for bench_model_merge.py: a random bfloat16 base model
with Hugging Face Llama key names, and "fine-tuned" copies (base + small seeded noise), each
a Hugging Face model folder of safetensors shards and ``model.safetensors.index.json``
written by mergelab's ``ShardedWriter``, with a ``config.json`` and a tiny
``tokenizer_config.json``.

Everything goes under ``<workdir>/models/`` (``base``, ``task0``, ``task1``, ...), and
``<workdir>/manifest.json`` says what was written with which settings: a later run with the
same settings reuses every finished folder (more tasks only add folders), other settings
regenerate ``models/`` from scratch.

torch, safetensors and mergelab are imported inside ``write_checkpoints`` only: a
benchmark's parent process imports this module and must stay small.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

MANIFEST = "manifest.json"
MODELS = "models"
INDEX_NAME = "model.safetensors.index.json"  # model_files.INDEX, without importing torch
FORMAT = 1  # bump when what is written changes: older folders are then regenerated
INIT_STD = 0.02  # the weights' std (HF's initializer_range); RMSNorm weights are 1
NOISE = 0.02  # fine-tuning noise × each tensor's init std: ~3 bf16 ulps of a weight
BLOCK = 1 << 24  # elements generated at a time (64 MB of float32)
GB = 1e9

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LlamaShape:
    """The widths of a Llama decoder (q/k/v/o, gate/up/down, two RMSNorms per layer,
    untied ``lm_head``, no biases)."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int = 128

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, in the order ``save_pretrained`` writes them."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes[p + "self_attn.q_proj.weight"] = (q, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, q)
            shapes[p + "mlp.gate_proj.weight"] = (self.intermediate, h)
            shapes[p + "mlp.up_proj.weight"] = (self.intermediate, h)
            shapes[p + "mlp.down_proj.weight"] = (h, self.intermediate)
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (self.vocab, h)
        return shapes

    @property
    def params(self) -> int:
        return sum(math.prod(shape) for shape in self.tensors().values())

    @property
    def nbytes(self) -> int:
        """Tensor bytes of one model in bfloat16 (the files add a small header each)."""
        return 2 * self.params

    def hf_config(self) -> dict:
        """A ``config.json`` that transformers' LlamaConfig reads."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "initializer_range": INIT_STD,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "use_cache": True,
            "torch_dtype": "bfloat16",
        }


TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "add_bos_token": True,
    "model_max_length": 32768,
}


def llama_shape(params: float) -> LlamaShape:
    """A Llama shape of about ``params`` parameters: Qwen2-1.5B's widths (hidden 1536,
    intermediate 8960, vocab 151936, 128-wide heads, 2 KV heads) and as many layers as fit;
    where fewer than 4 layers would fit, the hidden size shrinks by 128 at a time (the
    intermediate size with it, the vocabulary with its square)."""
    for hidden in range(1536, 0, -128):
        scale = hidden / 1536
        intermediate = max(128, round(8960 * scale / 128) * 128)
        vocab = 151936 if hidden == 1536 else max(1024, round(151936 * scale**2 / 128) * 128)
        heads = hidden // 128
        one = LlamaShape(hidden, intermediate, 1, vocab, heads, min(2, heads))
        outside = replace(one, layers=0).params  # embeddings, lm_head, final norm
        layers = round((params - outside) / (one.params - outside))
        if layers >= 4 or hidden == 128:
            return replace(one, layers=max(1, layers))
    raise AssertionError("unreachable")


def settings(shape: LlamaShape, shards: int, seed: int) -> dict:
    return {"format": FORMAT, "shape": asdict(shape), "shards": shards, "seed": seed}


def read_manifest(workdir: Path) -> dict | None:
    try:
        return json.loads((workdir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def folders_to_write(workdir: Path, shape: LlamaShape, shards: int, seed: int, tasks: int):
    """The model folders (``base``, ``task<i>``) that these settings still need written."""
    wanted = ["base", *(f"task{i}" for i in range(tasks))]
    manifest = read_manifest(workdir)
    if manifest is None or manifest["settings"] != settings(shape, shards, seed):
        return wanted
    done = set(manifest["complete"])
    return [name for name in wanted if name not in done or not (workdir / MODELS / name).is_dir()]


def model_folders(workdir: Path, tasks: int) -> tuple[Path, dict[str, Path]]:
    """The base folder and each task's fine-tuned folder."""
    models = workdir / MODELS
    return models / "base", {f"task{i}": models / f"task{i}" for i in range(tasks)}


def model_files(folder: Path) -> list[Path]:
    """Every file of a model folder, in name order (shards in their numbered order)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in model_files(folder))


def tensor_mismatch(folder: Path, tensors: dict[str, list[int]]) -> str | None:
    """What differs between a merged folder's tensors and the base's; None if nothing."""
    from safetensors import safe_open

    index = folder / INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    found = {}
    for name in files:
        with safe_open(str(folder / name), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 -- a safe_open handle, not a dict
                found[key] = (f.get_slice(key).get_shape(), f.get_slice(key).get_dtype())
    if set(found) != set(tensors):
        missing, extra = sorted(set(tensors) - set(found)), sorted(set(found) - set(tensors))
        return (
            f"{len(missing)} tensors missing (e.g. {missing[:2]}), {len(extra)} extra {extra[:2]}"
        )
    for key, shape in tensors.items():
        if list(found[key][0]) != shape or found[key][1] != "BF16":
            return f"{key}: {found[key][0]} {found[key][1]}, the base has {shape} BF16"
    return None


def write_checkpoints(workdir: Path, shape: LlamaShape, shards: int, seed: int, tasks: int):
    """Write the folders ``folders_to_write`` names, updating the manifest after each."""
    import torch

    from mergelab.engine.model_files import INDEX, ShardedWriter, TensorSpec, shard_plan

    start = time.perf_counter()
    models = workdir / MODELS
    manifest = read_manifest(workdir)
    if manifest is None and models.exists():
        raise RuntimeError(f"{models} exists without {workdir / MANIFEST}: not ours, not touched")
    if manifest is None or manifest["settings"] != settings(shape, shards, seed):
        shutil.rmtree(models, ignore_errors=True)
        manifest = {"settings": settings(shape, shards, seed), "complete": []}
    shapes = shape.tensors()
    specs = {key: TensorSpec(s, torch.bfloat16) for key, s in shapes.items()}
    cap = _shard_cap(specs, shards, shard_plan)
    manifest |= {"tensors": {key: list(s) for key, s in shapes.items()}, "max_shard_bytes": cap}
    log.info(
        "Llama shape: hidden %d, intermediate %d, %d layers, vocab %d, %d heads (%d KV): "
        "%.3f G parameters, %.2f GB per model in %d shards",
        shape.hidden,
        shape.intermediate,
        shape.layers,
        shape.vocab,
        shape.heads,
        shape.kv_heads,
        shape.params / 1e9,
        shape.nbytes / GB,
        shards,
    )
    base_shards: dict[str, Path] = {}
    for name in folders_to_write(workdir, shape, shards, seed, tasks):
        folder_start = time.perf_counter()
        folder = models / name
        shutil.rmtree(folder, ignore_errors=True)  # finished but not yet in the manifest
        manifest["complete"] = [done for done in manifest["complete"] if done != name]
        _save_manifest(workdir, manifest)
        if name != "base" and not base_shards:
            base = models / "base"
            index = base / INDEX
            weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
            base_shards = {key: base / weight_map.get(key, "model.safetensors") for key in shapes}
        model = 0 if name == "base" else 1 + int(name.removeprefix("task"))
        writer = ShardedWriter(folder, specs, cap, metadata={"format": "pt"})
        (writer.staging / "config.json").write_text(json.dumps(shape.hf_config(), indent=2))
        (writer.staging / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
        with writer:
            for number, (key, size) in enumerate(shapes.items()):
                generator = torch.Generator().manual_seed((seed * 1000 + model) * 100_000 + number)
                std = INIT_STD if len(size) > 1 else 1.0
                if model == 0:  # N(0, 0.02²) weights, RMSNorm weights of 1
                    tensor = torch.zeros(size, dtype=torch.bfloat16)
                    if len(size) == 1:
                        tensor.fill_(1.0)
                    else:
                        _add_noise(tensor, std, generator)
                else:
                    tensor = _read_tensor(base_shards[key], key)
                    _add_noise(tensor, NOISE * std, generator)
                writer[key] = tensor
                del tensor
        manifest["complete"].append(name)
        _save_manifest(workdir, manifest)
        log.info(
            "  %-6s written in %5.1f s (%.2f GB)",
            name,
            time.perf_counter() - folder_start,
            folder_bytes(folder) / GB,
        )
    return time.perf_counter() - start


def _shard_cap(specs: dict, shards: int, shard_plan) -> int:
    """The smallest ``max_shard_bytes`` that ``shard_plan`` cuts into ``shards`` shards."""
    low = -(-sum(s.numel * s.dtype.itemsize for s in specs.values()) // shards)
    high = max(low, sum(s.numel * s.dtype.itemsize for s in specs.values()))
    while low < high:
        middle = (low + high) // 2
        if len(shard_plan(specs, middle)) <= shards:
            high = middle
        else:
            low = middle + 1
    if len(shard_plan(specs, low)) != shards:
        raise ValueError(f"{len(specs)} tensors cannot be cut into exactly {shards} shards")
    return low


def _add_noise(tensor, scale: float, generator) -> None:
    """``tensor`` (bfloat16) += N(0, scale²), drawn in float32 blocks of BLOCK elements."""
    import torch

    if scale == 0:
        return
    flat = tensor.view(-1)
    for start in range(0, flat.numel(), BLOCK):
        block = flat[start : start + BLOCK]
        noise = torch.randn(block.numel(), generator=generator, dtype=torch.float32)
        block.copy_(noise.mul_(scale).add_(block))


def _read_tensor(path: Path, key: str):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def _save_manifest(workdir: Path, manifest: dict) -> None:
    tmp = workdir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(workdir / MANIFEST)
