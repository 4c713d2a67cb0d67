"""HF CLIPVisionModel state dicts convert to open_clip image encoders with the same features."""

import open_clip
import pytest
import torch
import transformers
from open_clip.transformer import QuickGELU, VisionTransformer

from mergelab.models.hf_clip import convert_clip_vision_state_dict, is_clip_vision_state_dict

WIDTH, LAYERS, HEADS, PATCH, IMAGE, EMBED = 64, 2, 4, 8, 32, 16
PREFIX = "vision_model."


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init (LayerNorm 1/0, zero biases) so swaps would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _vision_config(**overrides):
    cfg = dict(
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        patch_size=PATCH,
        image_size=IMAGE,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    cfg.update(overrides)
    return transformers.CLIPVisionConfig(**cfg)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(_vision_config()).float().eval()
    _perturb(model, seed=1)
    return model


@pytest.fixture(scope="module")
def hf_state(hf_model):
    """The state dict without the prefix, as transformers 5's CLIPVisionModel has it."""
    state = {k.removeprefix(PREFIX): v for k, v in hf_model.state_dict().items()}
    assert "embeddings.class_embedding" in state
    return state


def _open_clip_visual() -> VisionTransformer:
    return VisionTransformer(
        image_size=IMAGE,
        patch_size=PATCH,
        width=WIDTH,
        layers=LAYERS,
        heads=HEADS,
        mlp_ratio=4.0,
        output_dim=EMBED,
        act_layer=QuickGELU,
    )


def _projection(seed: int = 2, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(width, EMBED, generator=torch.Generator().manual_seed(seed)) / width**0.5


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _old_format(state):
    """As FusionBench's checkpoints were saved: prefixed, with the position_ids buffer."""
    old = {PREFIX + k: v for k, v in state.items()}
    old[PREFIX + "embeddings.position_ids"] = torch.arange((IMAGE // PATCH) ** 2 + 1)[None]
    return old


@pytest.mark.parametrize("layout", ["unprefixed", "fusionbench"])
def test_converted_encoder_matches_hf_features(hf_model, hf_state, layout):
    state = hf_state if layout == "unprefixed" else _old_format(hf_state)
    projection = _projection()
    converted = convert_clip_vision_state_dict(state, projection)

    visual = _open_clip_visual().eval()
    assert list(converted) == list(visual.state_dict())  # same keys, in open_clip's order
    visual.load_state_dict(converted, strict=True)

    x = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = visual(x)
        theirs = hf_model(pixel_values=x).pooler_output @ projection
    assert ours.shape == (3, EMBED)
    assert _rel_err(ours, theirs) < 1e-5


def test_in_proj_is_q_k_v_concatenated(hf_state):
    converted = convert_clip_vision_state_dict(hf_state, _projection())
    weight = converted["transformer.resblocks.1.attn.in_proj_weight"]
    bias = converted["transformer.resblocks.1.attn.in_proj_bias"]
    for i, p in enumerate("qkv"):
        rows = slice(i * WIDTH, (i + 1) * WIDTH)
        assert torch.equal(weight[rows], hf_state[f"encoder.layers.1.self_attn.{p}_proj.weight"])
        assert torch.equal(bias[rows], hf_state[f"encoder.layers.1.self_attn.{p}_proj.bias"])
    assert converted["ln_pre.weight"] is hf_state["pre_layrnorm.weight"]


def test_projection_is_clip_models_visual_projection_transposed():
    config = transformers.CLIPConfig(
        vision_config=_vision_config().to_dict(),
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        ),
        projection_dim=EMBED,
    )
    torch.manual_seed(0)
    clip = transformers.CLIPModel(config).float().eval()
    _perturb(clip, seed=4)
    state = clip.state_dict()
    vision = {k: v for k, v in state.items() if k.startswith(PREFIX)}
    converted = convert_clip_vision_state_dict(vision, state["visual_projection.weight"].T)

    visual = _open_clip_visual().eval()
    visual.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = clip.visual_projection(clip.vision_model(pixel_values=x).pooler_output)
        ours = visual(x)
    assert _rel_err(ours, theirs) < 1e-5


def test_vit_b_32_quickgelu_layout():
    """Full-size shapes, without weights: HF's default CLIPVisionConfig is OpenAI's ViT-B/32."""
    config = transformers.CLIPVisionConfig()
    assert config.hidden_act == "quick_gelu"
    with torch.device("meta"):
        hf = transformers.CLIPVisionModel(config)
    visual = open_clip.create_model("ViT-B-32-quickgelu", device="meta").visual
    assert isinstance(visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    expected = visual.state_dict()
    converted = convert_clip_vision_state_dict(hf.state_dict(), expected["proj"])
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in expected.items()
    }


def test_detects_the_hf_layout(hf_state):
    assert is_clip_vision_state_dict(hf_state)
    assert is_clip_vision_state_dict(_old_format(hf_state).keys())
    assert not is_clip_vision_state_dict(_open_clip_visual().state_dict())
    assert not is_clip_vision_state_dict(["conv1.weight", "bn1.weight", "layer1.0.conv1.weight"])
    assert not is_clip_vision_state_dict([])


def _raises(state, projection=None, match=""):
    with pytest.raises(ValueError, match=match) as info:
        convert_clip_vision_state_dict(state, _projection() if projection is None else projection)
    return str(info.value)


def test_refuses_other_architectures(hf_state):
    resnet = {
        "conv1.weight": torch.zeros(32, 3, 3, 3),
        "bn1.weight": torch.zeros(32),
        "layer1.0.conv1.weight": torch.zeros(32, 32, 3, 3),
    }
    _raises(resnet, match="unexpected key 'conv1.weight'")
    # an open_clip image encoder is not converted again
    _raises(_open_clip_visual().state_dict(), match="unexpected key 'class_embedding'")
    # a fused-qkv attention, as in other ViTs
    fused = dict(hf_state)
    fused["encoder.layers.1.self_attn.qkv.weight"] = fused.pop(
        "encoder.layers.1.self_attn.q_proj.weight"
    )
    _raises(fused, match=r"unexpected key 'encoder\.layers\.1\.self_attn\.qkv\.weight' \(layer 1\)")
    # a full CLIPModel state dict: the text tower is not part of the image encoder
    mixed = {PREFIX + k: v for k, v in hf_state.items()}
    mixed["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, WIDTH)
    _raises(mixed, match="'text_model.embeddings.token_embedding.weight'")


def test_missing_key_names_key_and_layer(hf_state):
    state = {PREFIX + k: v for k, v in hf_state.items()}
    del state[PREFIX + "encoder.layers.1.self_attn.v_proj.bias"]
    message = _raises(state, match="missing key")
    assert "'vision_model.encoder.layers.1.self_attn.v_proj.bias' (layer 1)" in message
    # a gap in the layers is a missing layer, not a shorter model
    gap = {k: v for k, v in hf_state.items() if not k.startswith("encoder.layers.0.")}
    _raises(gap, match=r"missing key 'encoder\.layers\.0\.layer_norm1\.weight' \(layer 0\)")
    no_head = {k: v for k, v in hf_state.items() if not k.startswith("post_layernorm.")}
    _raises(no_head, match="missing key 'post_layernorm.weight'")


def test_wrong_width_names_key_and_layer():
    torch.manual_seed(0)
    wide = transformers.CLIPVisionModel(_vision_config(hidden_size=2 * WIDTH)).state_dict()
    narrow = transformers.CLIPVisionModel(_vision_config()).state_dict()
    # layer 1 from a wider model: its shapes do not fit the others'
    state = {k: wide[k] if k.startswith("encoder.layers.1.") else v for k, v in narrow.items()}
    message = _raises(state, match=r"'encoder\.layers\.1\.layer_norm1\.weight' \(layer 1\)")
    assert f"expected ({WIDTH},)" in message
    # a whole wider model with the projection of a narrower open_clip model
    _raises(wide, projection=_projection(), match=rf"projection .* expected \({2 * WIDTH}, ")
    # the projection as HF CLIPModel stores it (visual_projection.weight) is transposed
    _raises(narrow, projection=_projection().T, match="transpose")
    # MLP width differing between layers
    state = dict(narrow)
    state["encoder.layers.1.mlp.fc1.weight"] = torch.zeros(2 * WIDTH, WIDTH)
    _raises(state, match=r"'encoder\.layers\.1\.mlp\.fc1\.weight' \(layer 1\) has shape")


def test_mixed_prefix_is_refused(hf_state):
    state = dict(hf_state)
    state[PREFIX + "pre_layrnorm.bias"] = state.pop("pre_layrnorm.bias")
    _raises(state, match="'embeddings.class_embedding' lacks the 'vision_model.' prefix")


def test_the_conversion_cache_is_keyed_by_the_pretrained_projection(hf_model, tmp_path):
    """The same Hugging Face folder with two pretrained models of one architecture: each
    gets its own projection (a cache keyed by the source alone gave the first one's)."""
    from mergelab.models.clip import load_image_encoder

    folder = tmp_path / "finetuned"
    hf_model.save_pretrained(folder)
    for seed in (2, 3, 2):
        pretrained = dict(_open_clip_visual().state_dict()) | {"proj": _projection(seed)}
        encoder = load_image_encoder(folder, pretrained, tmp_path / "cache")
        assert torch.equal(encoder["proj"], pretrained["proj"]), seed
    assert len(list((tmp_path / "cache" / "encoders").glob("*.safetensors"))) == 2


def test_a_cache_entry_of_other_inputs_is_converted_again(hf_model, tmp_path):
    """An entry under the right name whose recorded inputs differ (another conversion,
    an older mergelab) is never used."""
    from mergelab.engine.checkpoints import save_state_dict
    from mergelab.models.clip import load_image_encoder

    folder = tmp_path / "finetuned"
    hf_model.save_pretrained(folder)
    pretrained = dict(_open_clip_visual().state_dict()) | {"proj": _projection(2)}
    first = load_image_encoder(folder, pretrained, tmp_path / "cache")
    [entry] = (tmp_path / "cache" / "encoders").glob("*.safetensors")
    stale = {key: torch.zeros_like(first[key]) for key in first}
    save_state_dict(stale, entry, metadata={"source": str(folder)}, overwrite=True)
    again = load_image_encoder(folder, pretrained, tmp_path / "cache")
    assert torch.equal(again["proj"], pretrained["proj"])


def test_a_sharded_folder_converts_to_the_encoder_its_single_file_gives(hf_model, tmp_path):
    """A fine-tuned CLIPVisionModel saved by ``save_pretrained`` in several shards (with
    model.safetensors.index.json) is read whole: the same open_clip encoder as from one
    model.safetensors, every tensor equal."""
    from mergelab.models.clip import load_image_encoder

    hf_model.save_pretrained(tmp_path / "single")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 2
    pretrained = dict(_open_clip_visual().state_dict()) | {"proj": _projection()}
    single = load_image_encoder(tmp_path / "single", pretrained, tmp_path / "cache")
    sharded = load_image_encoder(tmp_path / "sharded", pretrained, tmp_path / "cache")
    assert list(sharded) == list(single)
    assert all(torch.equal(sharded[key], single[key]) for key in single)
