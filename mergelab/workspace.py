"""Reusable scratch buffers for the per-parameter loops.

A merge touches every parameter of T + 1 models; allocating a fresh [T, *shape] block per
parameter makes the allocator map and fault in new pages every time (tens of MB for a
ViT-B/32 MLP weight), which costs far more than the arithmetic. A :class:`Workspace`
keeps one flat buffer per name, grown to the largest request, and hands out views.
"""

from __future__ import annotations

import math

import torch


class Workspace:
    """Named scratch tensors; a view handed out is valid until the next request of its name."""

    def __init__(self):
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype)
            self._buffers[name, dtype] = buffer
        return buffer[:numel].view(shape)
