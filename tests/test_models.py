"""Fine-tuned image encoders in each of their usual open_clip forms, read and cached."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import mirror

from mergelab.models.clip import load_image_encoder


@pytest.fixture(scope="module")
def visual(tmp_path_factory):
    _, weights = mirror.write_tiny_clip(tmp_path_factory.mktemp("clip"))
    return mirror.pretrained_visual(weights)


@pytest.mark.parametrize("prefix", ["", "visual.", "model.visual."])
def test_open_clip_state_dicts_with_any_known_prefix(visual, tmp_path, prefix):
    finetuned = mirror.finetune(visual, 7)
    extra = {"model.logit_scale": torch.tensor(4.6)} if prefix.startswith("model.") else {}
    torch.save({prefix + k: v for k, v in finetuned.items()} | extra, tmp_path / "task.pt")
    encoder = load_image_encoder(tmp_path / "task.pt", visual, tmp_path / "cache")
    assert set(encoder) == set(visual)
    for key, value in finetuned.items():
        assert torch.equal(encoder[key], value), key
    # converted once, then read from the cache
    assert list((tmp_path / "cache" / "encoders").glob("task-*.safetensors"))


def test_a_checkpoint_of_something_else_is_refused(visual, tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match=r"resnet\.pt"):
        load_image_encoder(tmp_path / "resnet.pt", visual, tmp_path / "cache")
