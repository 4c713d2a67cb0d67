"""A pretrained checkpoint and its fine-tuned copies, checked and walked parameter by parameter."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping

import torch

from mergelab.io.checkpoints import TensorSpec, open_checkpoint, tensor_spec

CheckpointSource = str | os.PathLike | Mapping[str, torch.Tensor]


class ModelPool:
    """θ0 and {task: θt}, with every key, shape and dtype checked before any work.

    Only floating-point tensors are merged (:attr:`merged_keys`); the others (integer
    buffers and the like) are copied from θ0. Checkpoints are read lazily when given as
    ``.safetensors`` paths, so iterating :meth:`task_vectors` over all keys holds one
    parameter of each model at a time.
    """

    def __init__(
        self,
        pretrained: CheckpointSource,
        finetuned: Mapping[str, CheckpointSource],
    ):
        if not finetuned:
            raise ValueError("no fine-tuned models given")
        self.pretrained = open_checkpoint(pretrained)
        self.finetuned = {str(task): open_checkpoint(src) for task, src in finetuned.items()}
        self.specs: dict[str, TensorSpec] = {
            k: tensor_spec(self.pretrained, k) for k in self.pretrained
        }
        for task, checkpoint in self.finetuned.items():
            _check_same_layout(self.specs, checkpoint, f"fine-tuned model {task!r}")
        self.merged_keys = [k for k, s in self.specs.items() if s.dtype.is_floating_point]
        if not self.merged_keys:
            raise ValueError("the pretrained model has no floating-point parameters to merge")

    @property
    def tasks(self) -> list[str]:
        return list(self.finetuned)

    @property
    def num_merged_params(self) -> int:
        return sum(self.specs[k].numel for k in self.merged_keys)

    def require_tasks(self, minimum: int, method: str) -> None:
        if len(self.finetuned) < minimum:
            raise ValueError(
                f"{method} needs at least {minimum} fine-tuned models, got {len(self.finetuned)}"
            )

    def compute_dtype(self, key: str) -> torch.dtype:
        return torch.promote_types(self.specs[key].dtype, torch.float32)

    def pretrained_tensor(self, key: str) -> torch.Tensor:
        return self.pretrained[key].detach().to(self.compute_dtype(key))

    def task_vectors(self, key: str, pretrained: torch.Tensor) -> Iterator[torch.Tensor]:
        """τt = θt − θ0 for each task in order, one at a time, finite or an error naming it."""
        for task, checkpoint in self.finetuned.items():
            tau = checkpoint[key].detach().to(pretrained.dtype) - pretrained
            if not torch.isfinite(tau).all():
                raise ValueError(f"task vector of {task!r} has NaN or Inf values at {key!r}")
            yield tau

    def check_companions(self, stats: Mapping[str, Mapping[str, torch.Tensor]], what: str) -> None:
        """Check per-task tensors (e.g. gradient statistics) cover every merged parameter."""
        if set(stats) != set(self.finetuned):
            raise ValueError(f"{what} are for tasks {sorted(stats)}, the models for {self.tasks}")
        for task, tensors in stats.items():
            for key in self.merged_keys:
                if key not in tensors:
                    raise KeyError(f"{what} of {task!r} lack {key!r}")
                spec = tensor_spec(tensors, key)
                if spec.shape != self.specs[key].shape:
                    raise ValueError(
                        f"{what} of {task!r}: {key!r} has shape {spec.shape}, "
                        f"the model {self.specs[key].shape}"
                    )

    def fingerprint(self) -> str:
        """A short identity of θ0: its layout and a strided sample of every tensor's values."""
        digest = hashlib.sha256()
        for key, spec in self.specs.items():
            digest.update(f"{key}:{spec.shape}:{spec.dtype};".encode())
            flat = self.pretrained[key].reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)].contiguous()
            digest.update(sample.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]


def _check_same_layout(specs: Mapping[str, TensorSpec], checkpoint: Mapping, name: str) -> None:
    keys = set(checkpoint)
    missing = [k for k in specs if k not in keys]
    if missing:
        raise KeyError(f"{name} lacks {missing[0]!r} (and {len(missing) - 1} more keys)")
    extra = [k for k in checkpoint if k not in specs]
    if extra:
        raise KeyError(f"{name} has {extra[0]!r}, which the pretrained model does not")
    for key, spec in specs.items():
        other = tensor_spec(checkpoint, key)
        if other != spec:
            raise ValueError(
                f"{name}: {key!r} is {other.shape} {other.dtype}, "
                f"the pretrained model has {spec.shape} {spec.dtype}"
            )
