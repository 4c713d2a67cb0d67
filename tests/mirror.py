"""Tiny local mirrors of what mergelab reads from the hub, in the hub's own layouts.

- an open_clip model config JSON (registered by the CLI's ``model.model_config``) and its
  pretrained weights file;
- datasets as parquet files under ``<root>/<org>/<name>/data/`` (a config's files under
  ``<config>/`` with the README front matter that declares it);
- Hugging Face CLIPVisionModel checkpoints in a hub cache
  (``models--<org>--<name>/snapshots/<rev>/``), found by ``snapshot_download`` offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import torch
import yaml
from safetensors.torch import save_file

from mergelab.io.hub_layout import declare_config, write_image_split

TINY = "mergelab-test-tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
REVISION = "0123456789abcdef0123456789abcdef01234567"


def write_tiny_clip(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """(config JSON, pretrained weights .pt) of a random tiny open_clip model."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{TINY}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY)
    weights = folder / f"{TINY}.pt"
    torch.save(model.state_dict(), weights)
    return config, weights


def pretrained_visual(weights: Path) -> dict[str, torch.Tensor]:
    state = torch.load(weights, weights_only=True)
    return {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}


def finetune(visual: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict:
    """A stand-in for fine-tuning: θ0 plus seeded noise proportional to each tensor's spread."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in visual.items():
        noise = torch.randn(value.shape, generator=g) * scale * (value.float().std() + 1e-3)
        out[key] = value + noise.to(value.dtype)
    return out


def open_clip_to_hf(visual: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The inverse of mergelab's conversion, written out key by key for the mirror."""
    hf = {
        "vision_model.embeddings.class_embedding": visual["class_embedding"],
        "vision_model.embeddings.position_embedding.weight": visual["positional_embedding"],
        "vision_model.embeddings.patch_embedding.weight": visual["conv1.weight"],
        "vision_model.pre_layrnorm.weight": visual["ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": visual["ln_pre.bias"],
        "vision_model.post_layernorm.weight": visual["ln_post.weight"],
        "vision_model.post_layernorm.bias": visual["ln_post.bias"],
    }
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for part in ("weight", "bias"):
            q, k, v = visual[f"{src}attn.in_proj_{part}"].chunk(3)
            hf[f"{dst}self_attn.q_proj.{part}"] = q
            hf[f"{dst}self_attn.k_proj.{part}"] = k
            hf[f"{dst}self_attn.v_proj.{part}"] = v
            hf[f"{dst}self_attn.out_proj.{part}"] = visual[f"{src}attn.out_proj.{part}"]
            hf[f"{dst}layer_norm1.{part}"] = visual[f"{src}ln_1.{part}"]
            hf[f"{dst}layer_norm2.{part}"] = visual[f"{src}ln_2.{part}"]
            hf[f"{dst}mlp.fc1.{part}"] = visual[f"{src}mlp.c_fc.{part}"]
            hf[f"{dst}mlp.fc2.{part}"] = visual[f"{src}mlp.c_proj.{part}"]
    return {k: v.contiguous() for k, v in hf.items()}


def write_hf_vision_model(folder: Path, visual: dict[str, torch.Tensor]) -> Path:
    """A CLIPVisionModel folder (config.json + model.safetensors) holding ``visual``."""
    vision = TINY_CONFIG["vision_cfg"]
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": vision["width"],
        "intermediate_size": 4 * vision["width"],
        "num_hidden_layers": vision["layers"],
        "num_attention_heads": vision["width"] // vision["head_width"],
        "image_size": vision["image_size"],
        "patch_size": vision["patch_size"],
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file(open_clip_to_hf(visual, vision["layers"]), folder / "model.safetensors")
    return folder


def write_hub_model(hub_cache: Path, repo_id: str, visual: dict[str, torch.Tensor]) -> None:
    """``repo_id`` in a Hugging Face hub cache, as snapshot_download leaves it."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    write_hf_vision_model(repo / "snapshots" / REVISION, visual)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)


def _images(labels: np.ndarray, num_classes: int, rng: np.random.Generator):
    """32×32 images whose colour and stripe frequency depend on the label, plus noise."""
    from PIL import Image

    images = []
    xs = np.arange(32)
    for label in labels:
        hue = np.array([label / num_classes, 1 - label / num_classes, (label % 3) / 2])
        stripes = 0.5 + 0.5 * np.sin(xs * (1 + label) * np.pi / 16)
        pixels = hue[None, None, :] * stripes[None, :, None] + 0.2 * rng.random((32, 32, 3))
        images.append(Image.fromarray((255 * pixels.clip(0, 1)).astype(np.uint8)))
    return images


def write_dataset(
    root: Path,
    hub_id: str,
    num_classes: int,
    sizes: dict[str, int],
    config: str | None = None,
    seed: int = 0,
    label_column: str = "label",
) -> Path:
    """Parquet splits of a labelled image dataset in the hub layout under ``root/hub_id``."""
    folder = root / hub_id
    rng = np.random.default_rng(seed)
    for split, size in sizes.items():
        labels = rng.integers(0, num_classes, size)
        images = _images(labels, num_classes, rng)
        write_image_split(folder, split, images, labels, config, label_column)
    if config:
        declare_config(folder, config, list(sizes))
    return folder


def write_three_tasks(root: Path, sizes: dict[str, int]) -> None:
    """Mirrors of mnist, eurosat and svhn (its ``cropped_digits`` config) under ``root``."""
    write_dataset(root, "ylecun/mnist", 10, sizes)
    write_dataset(root, "tanganke/eurosat", 10, sizes, seed=1)
    write_dataset(root, "ufldl-stanford/svhn", 10, sizes, "cropped_digits", 2)


THREE_TASKS = ["mnist", "eurosat", "svhn"]


def write_merge_run(root: Path) -> Path:
    """A folder for ``mergelab test -c base.yaml``: the tiny CLIP, the three tasks'
    mirrors and one fine-tuned model per task in each source form (a hub model in a local
    hub cache: run with HF_HUB_CACHE=<root>/hub; an open_clip safetensors file; a Hugging
    Face folder)."""
    config, weights = write_tiny_clip(root / "clip")
    visual = pretrained_visual(weights)
    # odd sizes (val 7, test 41): two ranks cannot split them evenly
    write_three_tasks(root / "data", {"train": 70, "test": 41})
    write_hub_model(root / "hub", "mergelab-test/tiny_mnist", finetune(visual, 1))
    save_file(finetune(visual, 2), root / "eurosat.safetensors")
    write_hf_vision_model(root / "svhn_hf", finetune(visual, 3))
    base = {
        "model": {
            "model": TINY,
            "model_config": str(config),
            "pretrained": str(weights),
            "cache_dir": str(root / "cache"),
            "finetuned": {
                "mnist": "mergelab-test/tiny_mnist",
                "eurosat": str(root / "eurosat.safetensors"),
                "svhn": str(root / "svhn_hf"),
            },
        },
        "data": {
            "tasks": THREE_TASKS,
            "batch_size": 16,
            "num_workers": 0,
            "dataset_root": str(root / "data"),
        },
        "trainer": {"accelerator": "cpu"},
    }
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    return root
