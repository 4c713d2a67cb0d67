"""Never silent: a fine-tuned checkpoint is converted completely or refused (naming the
source and the key) and cached only once it passed; non-finite weights are refused on
the fine-tuned path too; degenerate settings the rules allow run with a warning that says
what they reduce to."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import mirror

from mergelab import ModelPool
from mergelab.methods import Consensus, Finetuned, MergeContext, TrustRegion
from mergelab.models.clip import load_image_encoder


@pytest.fixture(scope="module")
def visual(tmp_path_factory) -> dict[str, torch.Tensor]:
    _, weights = mirror.write_tiny_clip(tmp_path_factory.mktemp("clip"))
    return mirror.pretrained_visual(weights)


def cached(cache: Path) -> list[Path]:
    return list((cache / "encoders").glob("*")) if (cache / "encoders").exists() else []


def test_an_extra_tensor_is_refused_and_not_cached(visual, tmp_path):
    state = {f"visual.{k}": v for k, v in mirror.finetune(visual, 1).items()}
    state["visual.extra_scale"] = torch.ones(3)
    save_file(state, tmp_path / "clip_with_extra.safetensors")
    with pytest.raises(KeyError, match=r"clip_with_extra.*'extra_scale'"):
        load_image_encoder(tmp_path / "clip_with_extra.safetensors", visual, tmp_path / "cache")
    assert not cached(tmp_path / "cache")


def test_a_layer_the_architecture_lacks_is_refused(visual, tmp_path):
    deeper = dict(mirror.finetune(visual, 2))
    layers = mirror.TINY_CONFIG["vision_cfg"]["layers"]
    for key, value in list(deeper.items()):
        if key.startswith("transformer.resblocks.0."):
            deeper[key.replace(".0.", f".{layers}.", 1)] = value.clone()
    folder = tmp_path / "deeper_hf"
    folder.mkdir()
    save_file(mirror.open_clip_to_hf(deeper, layers + 1), folder / "model.safetensors")
    with pytest.raises(KeyError, match=rf"deeper_hf.*'transformer\.resblocks\.{layers}\."):
        load_image_encoder(folder, visual, tmp_path / "cache")
    assert not cached(tmp_path / "cache")


def context(pretrained, finetuned) -> MergeContext:
    pool = ModelPool(pretrained, finetuned)
    return MergeContext(list(finetuned), lambda: pretrained, lambda: pool)


def test_nan_in_a_finetuned_model_is_refused_when_scored_as_it_is():
    pretrained = {"w": torch.zeros(4), "b": torch.zeros(2)}
    nan = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    finetuned = {"a": {"w": torch.ones(4), "b": torch.ones(2)}, "b": {"w": nan, "b": torch.ones(2)}}
    variants = Finetuned().variants(context(pretrained, finetuned))
    assert torch.equal(variants.for_task("a")["finetuned"]["w"], torch.ones(4))
    with pytest.raises(ValueError, match=r"'b' has NaN or Inf at 'w'"):
        variants.for_task("b")


def test_degenerate_settings_run_with_a_warning_naming_what_they_reduce_to(caplog):
    with caplog.at_level(logging.WARNING, logger="mergelab"):
        TrustRegion(threshold_quantile=1.0)
        Consensus(k=[0, 3], tall_lambda=0.5).check_tasks(["a", "b"])
    messages = [record.getMessage() for record in caplog.records]
    assert any("threshold_quantile=1 drops no coordinate: Task Arithmetic" in m for m in messages)
    assert any("k=0 keeps every coordinate" in m for m in messages)
    assert any("k=3 > 2 tasks keeps no coordinate: every model is θ0" in m for m in messages)


@pytest.mark.parametrize(
    "name, content",
    [("random.pt", b"\x00\x13garbage" * 10), ("notes.pt", b"these are my notes\n")],
)
def test_an_unreadable_checkpoint_names_its_file(visual, tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name}: not a readable PyTorch checkpoint"):
        load_image_encoder(tmp_path / name, visual, tmp_path / "cache")


def test_a_truncated_safetensors_file_names_its_file(visual, tmp_path):
    save_file(mirror.finetune(visual, 3), tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors: not a readable safetensors file"):
        load_image_encoder(tmp_path / "cut.safetensors", visual, tmp_path / "cache")


def test_a_missing_path_is_not_taken_for_a_hub_id(visual, tmp_path):
    missing = tmp_path / "runs" / "mnist.safetensors"
    with pytest.raises(FileNotFoundError, match=r"mnist\.safetensors'?: no such file"):
        load_image_encoder(missing, visual, tmp_path / "cache")
