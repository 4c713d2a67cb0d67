"""Zero-shot classification heads from CLIP's text tower, computed once and cached on disk.

For each class, every prompt template is encoded, the embeddings are L2-normalised,
averaged, and normalised again (the task_vectors protocol, src/heads.py). The head is a
[num_classes, embed_dim] matrix; logits = logit_scale.exp() · normalise(image features) ·
headᵀ. Heads stay frozen during fine-tuning and merging.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.nn.functional as F

from mergelab.engine.checkpoints import SafetensorsCheckpoint, save_state_dict
from mergelab.io.cache import cache_root
from mergelab.models.clip import CLIPBundle
from mergelab.tasks import TaskSpec


@torch.no_grad()
def build_head(
    clip: CLIPBundle, task: TaskSpec, device: str | torch.device = "cpu"
) -> torch.Tensor:
    model = clip.model.to(device).eval()
    rows = []
    for classname in task.classnames:
        tokens = clip.tokenizer(task.prompts(classname)).to(device)
        embeddings = F.normalize(model.encode_text(tokens).float(), dim=-1)
        rows.append(F.normalize(embeddings.mean(0), dim=-1))
    return torch.stack(rows).cpu()


def _head_inputs(clip: CLIPBundle, task: TaskSpec) -> str:
    """What a head is computed from, as a SHA-256: the CLIP model and its weights (for a
    local file its size and time), the class names and the prompt templates."""
    key = json.dumps([clip.identity, task.classnames, task.templates]).encode()
    return hashlib.sha256(key).hexdigest()


def zero_shot_head(
    clip: CLIPBundle,
    task: TaskSpec,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The task's head for this CLIP model, from the cache or built and cached now; a
    cached head whose recorded inputs are not these is built again, never used."""
    inputs = _head_inputs(clip, task)
    path = cache_root(cache_dir) / "heads" / f"{task.name}-{inputs[:16]}.safetensors"
    if path.is_file():
        cached = SafetensorsCheckpoint(path)
        if cached.metadata.get("inputs") == inputs:
            return cached["head"]
    head = build_head(clip, task, device)
    metadata = {"task": task.name, "model": clip.identity, "inputs": inputs}
    save_state_dict({"head": head}, path, metadata, True)
    return head
