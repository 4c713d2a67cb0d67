"""Sizes of the embedded benchmark: the miniature CLIP, its data and its training budgets.

A preset is data: everything the build produces is a function of it (and of the
generator's version), so its hash names the cache folder. ``default`` is what
``mergelab embedded`` builds; ``test`` is the same generator at a size that builds in
about 20 seconds, for the test suite.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass

from mergelab.errors import MissingKey

# Bump when the scenes, the captions or the build's recipe change what a preset yields:
# the cache folder's name changes with it, so old assets are never mixed with new ones.
GENERATOR_VERSION = 5  # 5: built with kernels that do not depend on the CPU
PRESET_ENV = "MERGELAB_EMBEDDED_PRESET"
MODEL_NAME = "mergelab-scenes"


@dataclass(frozen=True)
class Preset:
    """One size of the embedded benchmark.

    Images are ``image_size`` pixels square, cut into ``patch_size`` patches. The
    miniature CLIP is pretrained contrastively for ``pretrain_steps`` on
    ``pretrain_pairs`` captioned scenes drawn from all eight tasks' domains; each task
    model is then fine-tuned for ``finetune_steps`` on that task's train split.
    Pretraining starts at ``init_logit_scale``, the scale a trained CLIP ends at (100:
    the clamp of OpenAI's CLIP and of open_clip's training) rather than open_clip's
    1/0.07 for training from scratch. Against its frozen head at a small scale,
    fine-tuning would move the features far to sharpen its logits, and the task vectors
    would interfere far more than real ones do.
    """

    name: str
    seed: int = 0
    image_size: int = 64
    patch_size: int = 16
    vision_width: int = 96
    vision_layers: int = 4
    text_width: int = 64
    text_layers: int = 2
    embed_dim: int = 64
    init_logit_scale: float = 100.0
    train_per_task: int = 1500
    test_per_task: int = 400
    pretrain_pairs: int = 8000
    pretrain_steps: int = 200
    pretrain_batch_size: int = 256
    pretrain_lr: float = 1e-3
    finetune_steps: int = 200
    finetune_batch_size: int = 64
    finetune_lr: float = 1e-4
    finetune_weight_decay: float = 0.1
    finetune_warmup_steps: int = 20

    def model_config(self) -> dict:
        """The open_clip model config (registered as ``MODEL_NAME``)."""
        return {
            "embed_dim": self.embed_dim,
            "init_logit_scale": math.log(self.init_logit_scale),
            "vision_cfg": {
                "image_size": self.image_size,
                "layers": self.vision_layers,
                "width": self.vision_width,
                "patch_size": self.patch_size,
                "head_width": 32,
            },
            "text_cfg": {
                "context_length": 32,
                "vocab_size": 49408,
                "width": self.text_width,
                "heads": max(1, self.text_width // 32),
                "layers": self.text_layers,
            },
        }

    @property
    def key(self) -> str:
        """The cache folder's name: the preset's name and a hash of all it determines."""
        recipe = json.dumps([GENERATOR_VERSION, asdict(self)], sort_keys=True)
        return f"{self.name}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


PRESETS = {
    "default": Preset("default"),
    "test": Preset(
        "test",
        image_size=32,
        vision_width=32,
        vision_layers=1,
        text_width=32,
        text_layers=1,
        embed_dim=32,
        train_per_task=70,  # its validation split (7) holds a sample per class (≤ 6)
        test_per_task=16,
        pretrain_pairs=64,
        pretrain_steps=2,
        pretrain_batch_size=32,
        finetune_steps=2,
        finetune_batch_size=16,
        finetune_warmup_steps=1,
    ),
}


def get_preset(name: str | None = None) -> Preset:
    """A preset by name; by default the one named by $MERGELAB_EMBEDDED_PRESET, else
    ``default``."""
    name = name or os.environ.get(PRESET_ENV) or "default"
    if name not in PRESETS:
        raise MissingKey(
            f"unknown embedded preset {name!r} (from ${PRESET_ENV} or --preset); "
            f"choose from {sorted(PRESETS)}"
        )
    return PRESETS[name]
