"""CLIP's zero-shot classification logits: the one formula every loop uses (evaluation,
fine-tuning, gradient statistics and the benchmarks).

logits = logit_scale · normalise(image features) · headᵀ, in float32, with the head's rows
the normalised class embeddings of :mod:`mergelab.models.heads` and logit_scale the
model's exp(logit_scale) (100 for OpenAI's CLIP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def zero_shot_logits(
    features: torch.Tensor, head: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """[batch, classes] logits from [batch, dim] image features and a [classes, dim] head."""
    return logit_scale * F.normalize(features.float(), dim=-1) @ head.T
