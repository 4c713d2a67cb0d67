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
import torch
import torchvision
from open_clip.transform import MaybeToTensor
from torchvision.transforms import Compose, Normalize, ToTensor

_IMAGES_IN_CACHE = 4  # 2.4 MB of float32 at 224 px: measured fastest on a 2-core EPYC
# ToTensor, and open_clip's subclass that only adds a pass-through for tensors
_TO_TENSOR = (ToTensor, MaybeToTensor)
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

    def tensors(self, images: np.ndarray) -> torch.Tensor:
        """The tensor steps on a batch of stored images [B, H, W, C], stacked. ``ToTensor``
        then ``Normalize`` (open_clip's) run on the whole batch at once, element for
        element the operations they run on one image (so the same floats), in place;
        any other steps run image by image."""
        steps = self.tensor.transforms
        if len(steps) == 2 and type(steps[0]) in _TO_TENSOR and type(steps[1]) is Normalize:
            pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
            batch = torch.empty(pixels.shape, dtype=torch.get_default_dtype())
            mean = torch.as_tensor(steps[1].mean, dtype=batch.dtype).view(1, -1, 1, 1)
            std = torch.as_tensor(steps[1].std, dtype=batch.dtype).view(1, -1, 1, 1)
            # a few images at a time, so that the four passes find them in the CPU's cache
            for start in range(0, len(batch), _IMAGES_IN_CACHE):
                part = batch[start : start + _IMAGES_IN_CACHE]
                part.copy_(pixels[start : start + _IMAGES_IN_CACHE]).div_(255)  # ToTensor
                part.sub_(mean).div_(std)  # F.normalize's sub_ and div_
            return batch
        return torch.stack([self.tensor(image) for image in images])

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
