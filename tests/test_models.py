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


def test_a_cached_head_of_other_inputs_is_built_again(tmp_path):
    """A head file under the right name whose recorded inputs differ is never used."""
    from mergelab.engine.checkpoints import save_state_dict
    from mergelab.models.clip import load_clip
    from mergelab.models.heads import zero_shot_head
    from mergelab.tasks import load_task

    config, weights = mirror.write_tiny_clip(tmp_path / "clip")
    clip = load_clip(mirror.TINY, str(weights), tmp_path / "cache", str(config))
    task = load_task("mnist")
    head = zero_shot_head(clip, task, tmp_path / "cache")
    [entry] = (tmp_path / "cache" / "heads").glob("*.safetensors")
    save_state_dict({"head": torch.zeros_like(head)}, entry, {"task": "mnist"}, True)
    assert torch.equal(zero_shot_head(clip, task, tmp_path / "cache"), head)
