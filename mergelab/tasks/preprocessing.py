"""An evaluation transform cut in two for the decoded-image cache: the pixel steps (decode,
resize, crop: uint8 images at the model's resolution, stored once) and the tensor steps
(``ToTensor`` and what follows, such as ``Normalize``: run on every read).

``ToTensor`` turns a uint8 H × W × C array into the same tensor as the PIL image it was
taken from, so a cached image gives exactly the tensor an uncached read gives.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np
import PIL
import torchvision
from torchvision.transforms import Compose, ToTensor

# a repr that shows no settings: the object's default, or a function's
_OPAQUE = re.compile(r" at 0x[0-9a-f]+>")


@dataclasses.dataclass(frozen=True)
class CachedPreprocessing:
    """``pixels``: the steps before ``ToTensor``; ``tensor``: it and the steps after;
    ``description``: the pixel steps and the library versions that run them, which key
    the cache."""

    pixels: Compose
    tensor: Compose
    description: str

    @classmethod
    def of(cls, transform: Callable) -> CachedPreprocessing | None:
        """The two halves of a torchvision ``Compose`` that holds a ``ToTensor`` (open_clip's
        transforms are such), or None for any other transform, or one with a pixel step
        whose settings its repr does not show (a cache keyed by it could serve images of
        other settings)."""
        if not isinstance(transform, Compose):
            return None
        steps = list(transform.transforms)
        at = next((i for i, step in enumerate(steps) if isinstance(step, ToTensor)), None)
        if at is None:
            return None
        described = [_describe(step) for step in steps[:at]]
        if None in described:
            return None
        versions = f"Pillow {PIL.__version__}, torchvision {torchvision.__version__}"
        return cls(Compose(steps[:at]), Compose(steps[at:]), "; ".join([*described, versions]))

    def decode(self, image) -> np.ndarray:
        """A PIL image as the cache stores it: uint8, H × W × C."""
        pixels = np.asarray(self.pixels(image))
        return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _describe(step) -> str | None:
    if hasattr(step, "__qualname__"):  # a function: its name, unless it has none of its own
        name = f"{step.__module__}.{step.__qualname__}"
        return None if "<" in name else name  # a lambda or a function defined in one
    text = repr(step)
    return None if _OPAQUE.search(text) else text
