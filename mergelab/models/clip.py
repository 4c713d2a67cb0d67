"""CLIP models from open_clip, and fine-tuned image encoders from any of their usual forms.

The pretrained model comes from an open_clip name and a tag (``ViT-B-32`` / ``openai``)
or a local weights file. A fine-tuned image encoder may be an open_clip state dict
(image encoder only, a whole CLIP model, or task_vectors' ``ImageEncoder`` with its
``model.`` prefix) in ``.safetensors``/``.pt``, or a Hugging Face ``CLIPVisionModel``
(a hub id such as ``tanganke/clip-vit-base-patch32_mnist``, or a folder). Every source
is converted once to an open_clip image-encoder safetensors file in the cache, which the
merge engine then reads lazily.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from mergelab.engine.checkpoints import SafetensorsCheckpoint, save_state_dict, tensor_spec
from mergelab.engine.model_files import (
    UNREADABLE_CHECKPOINT,
    open_checkpoint,
)
from mergelab.engine.tensor_selection import check_same_layout
from mergelab.errors import BadValue, MissingFile, MissingKey
from mergelab.io.cache import cache_root
from mergelab.io.model_sources import looks_like_a_path, model_source
from mergelab.models.hf_clip import convert_clip_vision_state_dict, is_clip_vision_state_dict


@dataclass
class CLIPBundle:
    """An open_clip model with what evaluation needs from it."""

    name: str
    pretrained: str | None
    model: torch.nn.Module
    preprocess_train: object
    preprocess_val: object
    tokenizer: object

    @property
    def identity(self) -> str:
        """Names the pretrained weights: for a local file also its size and mtime."""
        ident = f"{self.name}/{self.pretrained}"
        if self.pretrained and Path(self.pretrained).is_file():
            stat = Path(self.pretrained).stat()
            ident += f"/{stat.st_size}/{stat.st_mtime_ns}"
        return ident

    def visual_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.visual.state_dict().items()}


def load_clip(
    name: str,
    pretrained: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    model_config: str | os.PathLike | None = None,
) -> CLIPBundle:
    """An open_clip model by architecture name and pretrained tag or file.

    ``model_config``: an open_clip model config JSON to register first; its file stem is
    the architecture name.
    """
    if model_config is not None:
        path = Path(model_config)
        if not path.is_file():
            raise MissingFile(f"open_clip model config not found: {path}")
        open_clip.add_model_config(path)
    if name not in open_clip.list_models():
        raise MissingKey(
            f"unknown open_clip architecture {name!r}; register a config with "
            "open_clip.add_model_config or use one of open_clip.list_models()"
        )
    local = pretrained is not None and looks_like_a_path(pretrained)
    if local and not Path(pretrained).is_file():
        raise MissingFile(f"pretrained: no such file {pretrained} (model.pretrained)")
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, cache_dir=str(cache_root(cache_dir) / "open_clip")
        )
    except (*UNREADABLE_CHECKPOINT, OSError) as err:
        if local:  # a file that is there and that open_clip cannot read
            first_line = (str(err).splitlines() or [""])[0]
            raise BadValue(
                f"pretrained: {pretrained} is not a {name!r} checkpoint that open_clip can "
                f"read ({type(err).__name__}: {first_line})"
            ) from err
        if isinstance(err, OSError):  # hub unreachable (offline)
            raise OSError(f"cannot fetch CLIP {name!r} weights {pretrained!r}: {err}") from err
        if isinstance(err, RuntimeError):
            raise RuntimeError(
                f"cannot load CLIP {name!r} with weights {pretrained!r}: {err}"
            ) from err
        raise
    for key, tensor in model.state_dict().items():  # every path that reads θ0 starts here
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise BadValue(f"pretrained: {pretrained} has NaN or Inf at {key!r}")
    model.eval()
    return CLIPBundle(
        name, pretrained, model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)
    )


def _open_clip_visual_keys(state: Mapping[str, torch.Tensor], expected: set[str]) -> dict | None:
    """The image-encoder part of an open_clip-style state dict, whatever its prefix: every
    key under the prefix (an extra one is refused by the layout check that follows)."""
    for prefix in ("", "visual.", "model.visual.", "module.visual.", "image_encoder.model.visual."):
        found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if expected <= set(found):
            return found
    return None


def _fingerprint_source(path: Path) -> str:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    digest = hashlib.sha256(str(path.resolve()).encode())
    for f in files:
        if f.is_file():
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def _encoder_inputs(path: Path, pretrained_visual: Mapping[str, torch.Tensor]) -> str:
    """What a converted encoder is computed from, as a SHA-256: the source (its path, and
    each file's size and time), the pretrained projection that a Hugging Face vision
    model lacks and the conversion takes, and the layout it is converted to."""
    digest = hashlib.sha256(_fingerprint_source(path).encode())
    projection = pretrained_visual["proj"].detach().cpu().contiguous()
    digest.update(f"{projection.dtype}{tuple(projection.shape)}".encode())
    digest.update(projection.reshape(-1).view(torch.uint8).numpy().tobytes())
    for key in sorted(pretrained_visual):
        spec = tensor_spec(pretrained_visual, key)
        digest.update(f"{key}:{spec.shape}:{spec.dtype};".encode())
    return digest.hexdigest()


def load_image_encoder(
    source: str | os.PathLike,
    pretrained_visual: Mapping[str, torch.Tensor],
    cache_dir: str | os.PathLike | None = None,
) -> SafetensorsCheckpoint:
    """A fine-tuned image encoder in open_clip's layout, as a lazy safetensors checkpoint.

    ``pretrained_visual`` gives the expected keys and the projection that Hugging Face
    vision models lack. Converted checkpoints are cached under ``<cache>/encoders``.
    """
    path = model_source(source, "fine-tuned model", ["*.json", "*.safetensors"])
    if path.suffix == ".safetensors":
        checkpoint = SafetensorsCheckpoint(path)
        if set(checkpoint) == set(pretrained_visual):
            return checkpoint  # already an open_clip image encoder: read it in place
    inputs = _encoder_inputs(path, pretrained_visual)
    cached = cache_root(cache_dir) / "encoders" / f"{path.stem}-{inputs[:16]}.safetensors"
    if cached.is_file():
        checkpoint = SafetensorsCheckpoint(cached)
        if checkpoint.metadata.get("inputs") == inputs:
            return checkpoint
        # an entry of another conversion under the same name (or of an older mergelab):
        # converted again below, never used
    state = open_checkpoint(path)  # a folder: sharded, one file, or pytorch_model.bin
    expected = set(pretrained_visual)
    if is_clip_vision_state_dict(state.keys()):
        visual = convert_clip_vision_state_dict(state, pretrained_visual["proj"])
    else:
        visual = _open_clip_visual_keys(state, expected)
        if visual is None:
            missing = sorted(expected - set(state))[:1]
            raise BadValue(
                f"{source}: not an open_clip image encoder nor a Hugging Face CLIPVisionModel "
                f"(no {missing[0] if missing else 'matching'} key under any known prefix)"
            )
    # converted completely or refused, and cached only once it passed
    specs = {key: tensor_spec(pretrained_visual, key) for key in pretrained_visual}
    check_same_layout(specs, visual, f"fine-tuned model {str(source)!r}")
    metadata = {"source": str(source), "inputs": inputs}
    save_state_dict(visual, cached, metadata=metadata, overwrite=True)
    return SafetensorsCheckpoint(cached)
