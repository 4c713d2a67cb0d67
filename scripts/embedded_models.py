"""The embedded benchmark's image encoders, for the scripts that study its merges: built
(or read from the cache) and loaded as state dicts."""

from __future__ import annotations

from pathlib import Path

import torch

from mergelab.embedded.build import EmbeddedBenchmark
from mergelab.embedded.preset import MODEL_NAME
from mergelab.embedded.scenes import TASKS
from mergelab.models.clip import load_clip, load_image_encoder

StateDict = dict[str, torch.Tensor]


def embedded_models(preset: str | None) -> tuple[Path, StateDict, dict[str, StateDict]]:
    """The benchmark's folder, θ0's image encoder and each task's fine-tuned one, in the
    benchmark's task order."""
    benchmark = EmbeddedBenchmark(preset)
    root = benchmark.ensure()
    clip = load_clip(
        MODEL_NAME, str(benchmark.asset("pretrained")), model_config=benchmark.asset("model_config")
    )
    pretrained = clip.visual_state_dict()
    finetuned = {
        t: load_image_encoder(benchmark.asset(f"finetuned/{t}"), pretrained) for t in TASKS
    }
    return root, pretrained, finetuned
