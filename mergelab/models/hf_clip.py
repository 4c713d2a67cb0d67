"""Hugging Face ``CLIPVisionModel`` state dicts as open_clip image encoder state dicts.

FusionBench's fine-tuned CLIP checkpoints (``tanganke/clip-vit-base-patch32_<task>``) are
``transformers.CLIPVisionModel`` state dicts: separate q/k/v projections, QuickGELU, and no
visual projection. :func:`convert_clip_vision_state_dict` renames and fuses them into the
state dict of ``open_clip.create_model(name).visual`` (a ``VisionTransformer``), so they can
be merged with, or evaluated as, open_clip models. The projection comes from the pretrained
open_clip model (``visual.proj``, ``[width, embed_dim]``); HF's ``CLIPModel`` has it as
``visual_projection.weight``, which is its transpose.

OpenAI's CLIP uses QuickGELU, and so do HF's CLIP configs: load the result into an open_clip
architecture that does too, e.g. ``"ViT-B-32-quickgelu"`` or
``create_model("ViT-B-32", force_quick_gelu=True)``. The weights would load into the plain
``"ViT-B-32"`` (nn.GELU) as well, silently giving different features.

The key correspondence was checked against the source of both libraries, open_clip 3.3
(``open_clip/transformer.py``: ``VisionTransformer``, ``ResidualAttentionBlock`` with
``nn.MultiheadAttention``'s fused ``in_proj_weight`` = [q; k; v] rows, ``Mlp`` as
``c_fc``/``gelu``/``c_proj``) and transformers 5 (``models/clip/modeling_clip.py``:
``CLIPVisionEmbeddings``, ``pre_layrnorm`` before the encoder, ``CLIPEncoderLayer``,
``post_layernorm`` on the class token), and is tested numerically in
``tests/test_hf_clip.py``. Both apply the 1/sqrt(head_dim) attention scale at run time, not
in the weights, and both use LayerNorm eps 1e-5 by default (HF: ``layer_norm_eps``); the
number of attention heads is not stored in either state dict, so it cannot be checked here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from mergelab.errors import BadValue

__all__ = ["convert_clip_vision_state_dict", "is_clip_vision_state_dict"]

# ``CLIPVisionModel.state_dict()`` keys lack this prefix since transformers 5 (which strips it
# on load); checkpoints saved by earlier versions, FusionBench's included, have it.
PREFIX = "vision_model."

# A buffer that transformers < 4.31 saved with the weights; it is always arange(positions).
_IGNORED = frozenset({"embeddings.position_ids"})

_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")

# open_clip key <- HF key(s) without PREFIX, in ``VisionTransformer.state_dict()`` order; the
# encoder layers and ``proj`` (which HF lacks) go between these two groups.
_EMBEDDINGS = (
    ("class_embedding", "embeddings.class_embedding"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
)
_STEM = (
    ("conv1.weight", "embeddings.patch_embedding.weight"),
    ("ln_pre.weight", "pre_layrnorm.weight"),
    ("ln_pre.bias", "pre_layrnorm.bias"),
)
_HEAD = (
    ("ln_post.weight", "post_layernorm.weight"),
    ("ln_post.bias", "post_layernorm.bias"),
)
# ``transformer.resblocks.{i}.`` <- ``encoder.layers.{i}.``; q, k and v are concatenated, in
# that order, along dim 0 into nn.MultiheadAttention's ``in_proj_{weight,bias}``.
_LAYER = (
    ("ln_1.weight", ("layer_norm1.weight",)),
    ("ln_1.bias", ("layer_norm1.bias",)),
    ("attn.in_proj_weight", tuple(f"self_attn.{p}_proj.weight" for p in "qkv")),
    ("attn.in_proj_bias", tuple(f"self_attn.{p}_proj.bias" for p in "qkv")),
    ("attn.out_proj.weight", ("self_attn.out_proj.weight",)),
    ("attn.out_proj.bias", ("self_attn.out_proj.bias",)),
    ("ln_2.weight", ("layer_norm2.weight",)),
    ("ln_2.bias", ("layer_norm2.bias",)),
    ("mlp.c_fc.weight", ("mlp.fc1.weight",)),
    ("mlp.c_fc.bias", ("mlp.fc1.bias",)),
    ("mlp.c_proj.weight", ("mlp.fc2.weight",)),
    ("mlp.c_proj.bias", ("mlp.fc2.bias",)),
)

# Keys that only an HF CLIP vision tower has (without PREFIX).
_SIGNATURE = (
    "embeddings.class_embedding",
    "embeddings.patch_embedding.weight",
    "pre_layrnorm.weight",
    "encoder.layers.0.self_attn.q_proj.weight",
)


def is_clip_vision_state_dict(keys: Iterable[str]) -> bool:
    """Whether ``keys`` are laid out as an HF CLIP vision tower's, prefixed or not.

    This looks for the keys no other layout has (``pre_layrnorm``, the class and patch
    embeddings, separate q/k/v projections), not at every key or any shape: it tells which
    converter to use, and :func:`convert_clip_vision_state_dict` then checks everything and
    names what does not fit (a full ``CLIPModel`` state dict, with its text tower, is detected
    here and refused there).
    """
    present = {k.removeprefix(PREFIX) for k in keys}
    return all(k in present for k in _SIGNATURE)


def convert_clip_vision_state_dict(
    hf_state_dict: Mapping[str, torch.Tensor], projection: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Convert an HF ``CLIPVisionModel`` state dict to an open_clip ``VisionTransformer`` one.

    ``projection`` becomes ``proj``: open_clip's ``visual.proj`` of shape
    ``[width, embed_dim]`` (HF ``CLIPModel.visual_projection.weight.T``). The keys and shapes
    are checked first, and a ``ValueError`` names the first unexpected, missing or misshapen
    key and its layer. Tensors keep their dtype and device; all but the fused q/k/v ones are
    the input's own tensors, not copies. The result is in ``VisionTransformer.state_dict()``
    order and loads into it with ``strict=True``.
    """
    prefix = _prefix(hf_state_dict)
    stripped = [k[len(prefix) :] for k in hf_state_dict if k[len(prefix) :] not in _IGNORED]
    layers = _num_layers(stripped)
    expected = _expected_keys(layers)

    expected_set = set(expected)
    unexpected = [k for k in stripped if k not in expected_set]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise BadValue(
            f"unexpected key {prefix + unexpected[0]!r}{_where(unexpected[0])}{more}: "
            "not an HF CLIPVisionModel state dict"
        )
    present = set(stripped)
    for key in expected:
        if key not in present:
            raise BadValue(
                f"missing key {prefix + key!r}{_where(key)} in the HF CLIPVisionModel state dict"
            )
    if layers == 0:
        raise BadValue("the HF CLIPVisionModel state dict has no encoder layers")

    sd = {key: hf_state_dict[prefix + key] for key in expected}
    width = _leading_dim(sd, prefix, "embeddings.class_embedding", ndim=1)
    hidden = _leading_dim(sd, prefix, "encoder.layers.0.mlp.fc1.weight", ndim=2)
    for key, shape in _expected_shapes(layers, width, hidden).items():
        actual = tuple(sd[key].shape)
        if not _fits(actual, shape):
            dims = ["*" if e is None else str(e) for e in shape]
            want = f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"
            raise BadValue(
                f"key {prefix + key!r}{_where(key)} has shape {actual}, expected {want} "
                f"for width {width} and MLP width {hidden}"
            )
    if projection.ndim != 2 or projection.shape[0] != width:
        raise BadValue(
            f"projection has shape {tuple(projection.shape)}, expected ({width}, embed_dim): "
            "open_clip's visual.proj is [width, embed_dim], the transpose of HF CLIPModel's "
            "visual_projection.weight"
        )

    out = {oc_key: sd[hf_key] for oc_key, hf_key in _EMBEDDINGS}
    out["proj"] = projection
    out.update((oc_key, sd[hf_key]) for oc_key, hf_key in _STEM)
    for i in range(layers):
        for oc_key, hf_keys in _LAYER:
            tensors = [sd[f"encoder.layers.{i}.{k}"] for k in hf_keys]
            fused = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
            out[f"transformer.resblocks.{i}.{oc_key}"] = fused
    out.update((oc_key, sd[hf_key]) for oc_key, hf_key in _HEAD)
    return out


def _prefix(keys: Iterable[str]) -> str:
    """``PREFIX`` if every key has it, ``""`` if none has; a ValueError for a mix."""
    keys = list(keys)
    with_prefix = [k.startswith(PREFIX) for k in keys]
    if all(with_prefix) and keys:
        return PREFIX
    if any(with_prefix):
        odd = keys[with_prefix.index(False)]
        raise BadValue(f"key {odd!r} lacks the {PREFIX!r} prefix that other keys have")
    return ""


def _num_layers(keys: Iterable[str]) -> int:
    indices = [int(m.group(1)) for k in keys if (m := _LAYER_KEY.fullmatch(k))]
    return max(indices) + 1 if indices else 0


def _fits(actual: tuple[int, ...], shape: tuple[int | None, ...]) -> bool:
    if len(actual) != len(shape):
        return False
    return all(e is None or e == a for e, a in zip(shape, actual, strict=True))


def _where(key: str) -> str:
    m = _LAYER_KEY.fullmatch(key)
    return f" (layer {m.group(1)})" if m else ""


def _expected_keys(layers: int) -> list[str]:
    """The HF keys (without prefix) that a ``layers``-deep CLIPVisionModel has."""
    keys = [hf_key for _, hf_key in _EMBEDDINGS + _STEM]
    for i in range(layers):
        keys += [f"encoder.layers.{i}.{k}" for _, hf_keys in _LAYER for k in hf_keys]
    return keys + [hf_key for _, hf_key in _HEAD]


def _leading_dim(sd: Mapping[str, torch.Tensor], prefix: str, key: str, ndim: int) -> int:
    """The width (or MLP width) as ``sd[key]`` has it, the tensor having ``ndim`` dims."""
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise BadValue(
            f"key {prefix + key!r}{_where(key)} has shape {shape}, expected {ndim} dimensions"
        )
    return shape[0]


def _expected_shapes(layers: int, width: int, hidden: int) -> dict[str, tuple[int | None, ...]]:
    """Shapes by HF key; ``None`` is any size (patch size, channels, number of positions)."""
    shapes: dict[str, tuple[int | None, ...]] = {
        "embeddings.class_embedding": (width,),
        "embeddings.position_embedding.weight": (None, width),
        "embeddings.patch_embedding.weight": (width, None, None, None),
        "pre_layrnorm.weight": (width,),
        "pre_layrnorm.bias": (width,),
    }
    per_layer: dict[str, tuple[int | None, ...]] = {
        "layer_norm1.weight": (width,),
        "layer_norm1.bias": (width,),
        "self_attn.q_proj.weight": (width, width),
        "self_attn.q_proj.bias": (width,),
        "self_attn.k_proj.weight": (width, width),
        "self_attn.k_proj.bias": (width,),
        "self_attn.v_proj.weight": (width, width),
        "self_attn.v_proj.bias": (width,),
        "self_attn.out_proj.weight": (width, width),
        "self_attn.out_proj.bias": (width,),
        "layer_norm2.weight": (width,),
        "layer_norm2.bias": (width,),
        "mlp.fc1.weight": (hidden, width),
        "mlp.fc1.bias": (hidden,),
        "mlp.fc2.weight": (width, hidden),
        "mlp.fc2.bias": (width,),
    }
    for i in range(layers):
        shapes.update({f"encoder.layers.{i}.{k}": s for k, s in per_layer.items()})
    shapes["post_layernorm.weight"] = (width,)
    shapes["post_layernorm.bias"] = (width,)
    return shapes
