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
    write_three_tasks(root / "data", {"train": 110, "test": 41})
    write_hub_model(root / "hub", "mergelab-test/tiny_mnist", finetune(visual, 1))
    save_file(finetune(visual, 2), root / "eurosat.safetensors")
    write_hf_vision_model(root / "svhn_hf", finetune(visual, 3))
    finetuned = {
        "mnist": "mergelab-test/tiny_mnist",
        "eurosat": str(root / "eurosat.safetensors"),
        "svhn": str(root / "svhn_hf"),
    }
    write_base_config(root, config, weights, finetuned, {"cache_dir": str(root / "cache")})
    return root


def write_base_config(
    root: Path, config: Path, weights: Path, finetuned: dict[str, str], model: dict | None = None
) -> Path:
    """``<root>/base.yaml``: the tiny CLIP with ``finetuned``, the three tasks' mirrors in
    ``<root>/data``, on the CPU; ``model`` adds model options."""
    base = {
        "model": {
            "model": TINY,
            "model_config": str(config),
            "pretrained": str(weights),
            **(model or {}),
            "finetuned": finetuned,
        },
        "data": {
            "tasks": THREE_TASKS,
            "batch_size": 16,
            "num_workers": 0,
            "dataset_root": str(root / "data"),
        },
        "trainer": {"accelerator": "cpu"},
    }
    path = root / "base.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


# --- the TALL suites' datasets in their own hub layouts -------------------------------------


class HubLayout:
    """How a hub image dataset stores its splits and columns, for a tiny mirror of it.

    ``label`` is ``"int"`` (plain integers), ``"bool"`` (a two-class boolean column) or
    ``"names"`` (a ClassLabel with ``names``); ``extra`` adds columns of other data
    (``"string"`` or a ClassLabel name list); ``split_files`` declares split names that
    ``datasets`` would not infer from the file names (as the hub README does)."""

    def __init__(
        self,
        hub_id: str,
        splits: tuple[str, ...],
        *,
        image_column: str = "image",
        label_column: str = "label",
        label: str = "names",
        names: tuple[str, ...] = (),
        config: str | None = None,
        extra: tuple[tuple[str, object], ...] = (),
        split_files: bool = False,
    ):
        self.hub_id, self.splits, self.config = hub_id, tuple(splits), config
        self.image_column, self.label_column = image_column, label_column
        self.label, self.names, self.extra = label, tuple(names), tuple(extra)
        self.split_files = split_files


def write_layout_split(
    root: Path, layout: HubLayout, split: str, size: int, num_classes: int, seed: int = 0
) -> Path:
    """One split of ``layout`` under ``root/<hub id>``: labels cycle through every class
    first (so each split holds all of them when ``size`` allows), then are random."""
    import datasets

    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(min(size, num_classes)), rng.integers(0, num_classes, size)])
    labels = labels[:size]
    if layout.label == "bool":
        label_feature, label_values = datasets.Value("bool"), [bool(v) for v in labels]
    elif layout.label == "names":
        label_feature, label_values = datasets.ClassLabel(names=list(layout.names)), labels.tolist()
    else:
        label_feature, label_values = datasets.Value("int64"), labels.tolist()
    columns = {
        layout.image_column: _images(labels, num_classes, rng),
        layout.label_column: label_values,
    }
    features = {layout.image_column: datasets.Image(), layout.label_column: label_feature}
    for name, kind in layout.extra:
        if kind == "string":
            features[name] = datasets.Value("string")
            columns[name] = [f"{split}-{i:05d}" for i in range(size)]
        else:
            features[name] = datasets.ClassLabel(names=list(kind))
            columns[name] = [int(v) % len(kind) for v in labels]
    table = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    path = root / layout.hub_id / (layout.config or "data") / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(str(path))
    return path


def write_layout(root: Path, layout: HubLayout, size: int, num_classes: int, seed: int = 0) -> Path:
    """Every split of ``layout`` with ``size`` rows, and the README that declares its config
    or split names where the hub's does."""
    for i, split in enumerate(layout.splits):
        write_layout_split(root, layout, split, size, num_classes, seed + i)
    folder = root / layout.hub_id
    if layout.config:
        declare_config(folder, layout.config, list(layout.splits))
    elif layout.split_files:
        files = "\n".join(f"  - split: {s}\n    path: data/{s}-*" for s in layout.splits)
        readme = f"---\nconfigs:\n- config_name: default\n  data_files:\n{files}\n---\n"
        (folder / "README.md").write_text(readme)
    return folder


PET_NAMES = (
    "abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle",
    "bengal", "birman", "bombay", "boxer", "british_shorthair", "chihuahua", "egyptian_mau",
    "english_cocker_spaniel", "english_setter", "german_shorthaired", "great_pyrenees",
    "havanese", "japanese_chin", "keeshond", "leonberger", "maine_coon", "miniature_pinscher",
    "newfoundland", "persian", "pomeranian", "pug", "ragdoll", "russian_blue", "saint_bernard",
    "samoyed", "scottish_terrier", "shiba_inu", "siamese", "sphynx",
    "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier",
)  # fmt: skip


def tall_layouts() -> dict[str, HubLayout]:
    """The twelve datasets the TALL suites add to the eight, laid out as their hub copies
    are (dataset cards of each hub id; FusionBench's dataset configs for which splits are
    read). Label names the cards list are written out; where a card's names were not
    checked, the mirror uses the task file's names (FusionBench's food101 names with '_'
    for ' ', as the hub spells them)."""
    from mergelab.tasks import load_task

    def names(task: str) -> tuple[str, ...]:
        return load_task(task).classnames

    return {
        "oxford_flowers102": HubLayout(
            "dpdl-benchmark/oxford_flowers102", ("train", "validation", "test"),
            names=names("oxford_flowers102"),
        ),
        # label is a bool; the README names the middle split "valid"
        "pcam": HubLayout(
            "1aurent/PatchCamelyon", ("train", "valid", "test"), label="bool", split_files=True
        ),
        # a webdataset on the hub: image "jpg", integer label "cls", plus the shard keys
        "fer2013": HubLayout(
            "clip-benchmark/wds_fer2013", ("train", "test"), image_column="jpg",
            label_column="cls", label="int", extra=(("__key__", "string"), ("__url__", "string")),
        ),
        "oxford_iiit_pet": HubLayout(
            "timm/oxford-iiit-pet", ("train", "test"), names=PET_NAMES,
            extra=(("image_id", "string"), ("label_cat_dog", ("cat", "dog"))),
        ),
        "stl10": HubLayout(
            "tanganke/stl10", ("train", "test"),
            names=("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                   "truck"),
        ),
        "cifar100": HubLayout("tanganke/cifar100", ("train", "test"), names=names("cifar100")),
        "cifar10": HubLayout("tanganke/cifar10", ("train", "test"), names=names("cifar10")),
        # no test split: FusionBench scores "validation", Food-101's official test set
        "food101": HubLayout(
            "ethz/food101", ("train", "validation"),
            names=tuple(n.replace(" ", "_") for n in names("food101")),
        ),
        "fashion_mnist": HubLayout(
            "zalando-datasets/fashion_mnist", ("train", "test"),
            names=("T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"),
        ),
        "emnist_letters": HubLayout(
            "tanganke/emnist_letters", ("train", "test"), config="emnist-letters",
            names=tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
        ),
        "kmnist": HubLayout(
            "tanganke/kmnist", ("train", "test"), config="kmnist",
            names=("お", "き", "す", "つ", "な", "は", "ま", "や", "れ", "を"),
        ),
        "rendered_sst2": HubLayout(
            "nateraw/rendered-sst2", ("train", "validation", "test"),
            names=("negative", "positive"),
        ),
    }  # fmt: skip
