"""Consensus merging (Wang et al., ICML 2024): keep what at least k tasks' TALL masks keep.

mcons = 1{Σt mt ≥ k}; θ = θ0 + α·(mcons ⊙ τMTL). k = 0 keeps everything (Task
Arithmetic on τMTL); k > T keeps nothing (the pretrained model).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mergelab.errors import BadValue


def consensus_mask(task_masks: Iterable[torch.Tensor], k: int) -> torch.Tensor:
    """1{number of tasks whose mask keeps the coordinate ≥ k} for one parameter."""
    votes = None
    for mask in task_masks:
        votes = mask.to(torch.int32) if votes is None else votes.add_(mask)
    if votes is None:
        raise BadValue("no task masks given")
    return votes >= k
