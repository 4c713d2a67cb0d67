"""Tiny transformers models saved as save_pretrained saves them (a 2-layer Llama in
bfloat16, cut into a few shards), and their fine-tuned stand-ins: the base plus seeded
noise."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
import yaml
from safetensors import safe_open

from tests.mirror import REVISION

SHARD = "6KB"  # a few shards for the tiny Llama, as save_pretrained cuts them
TASKS = ("alpha", "beta", "gamma")


def llama_config(vocab: int = 64):
    return transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )


def noisy_copy(state: dict, seed: int, scale: float = 0.02) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: value + (scale * torch.randn(value.shape, generator=generator)).to(value.dtype)
        for key, value in state.items()
    }


def save_llama(folder: Path, state: dict, config) -> Path:
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(state)
    model.save_pretrained(folder, max_shard_size=SHARD)
    return folder


def tiny_llamas(root: Path) -> dict[str, Path]:
    """A bf16 Llama base and three fine-tuned copies, each in several shards, by name."""
    torch.manual_seed(0)
    config = llama_config()
    base = transformers.LlamaForCausalLM(config).to(torch.bfloat16).state_dict()
    folders = {"base": save_llama(root / "base", base, config)}
    for seed, task in enumerate(TASKS, start=1):
        folders[task] = save_llama(root / task, noisy_copy(base, seed), config)
    return folders


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, read with safetensors itself."""
    files = sorted(folder.glob("*.safetensors"))
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            tensors |= {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    return tensors


def write_config(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


def write_hub_folder(hub_cache: Path, repo_id: str, folder: Path) -> None:
    """``folder`` as hub model ``repo_id`` in a hub cache, as snapshot_download leaves it."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.symlink_to(folder.resolve(), target_is_directory=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
