"""The second streaming path: whole parameters, one after another, on a chosen device.

The block path (:mod:`mergelab.engine.pool`) hands a rule flat blocks of 2¹⁷ coordinates,
which suits rules that are element-wise. A rule that needs a parameter's whole matrix (an
SVD: Task Singular Vectors, isotropic merging) or that is worth running on an accelerator
gets, here, the T task vectors of one parameter stacked as [T, *shape], in float32 (or
float64 for a float64 model) on ``device``, and returns that parameter's merged task
vector δ. Parameters are read one at a time, so memory stays at δ (one model, on the
CPU) plus T + 1 times the largest parameter, flat in the number of layers.

The task vectors are read into one reused CPU buffer and subtracted there (θt − θ0 in the
model's dtype promoted to float32, as on the block path), so a CPU run and a CUDA run
hand the rule the same numbers; only the rule's own arithmetic runs on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from mergelab.engine.pool import ModelPool
from mergelab.engine.streaming import StateDict, progress
from mergelab.engine.workspace import Workspace, empty, release_freed_heap
from mergelab.errors import BadValue
from mergelab.merging.finite import all_finite
from mergelab.merging.task_arithmetic import ordered_sum

# (key, τ stacked as [T, *shape] on the device) -> the same, transformed (DARE's drop,
# the trust region's mask); and -> that parameter's merged task vector δ [*shape]
Transform = Callable[[str, torch.Tensor], torch.Tensor]
Rule = Callable[[str, torch.Tensor], torch.Tensor]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when present, else the CPU; a CUDA device that is not
    there is refused by name before any model is read."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadValue(f"device {str(device)!r}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise BadValue(f"device {str(device)!r}: mergelab merges on 'cpu' or 'cuda'")
    return device


class TaskVectors:
    """The pool's task vectors, one whole parameter at a time, on ``device``, each through
    ``transforms`` in order; non-finite values refused naming the task and the key."""

    def __init__(
        self,
        pool: ModelPool,
        device: str | torch.device | None = None,
        transforms: Sequence[Transform] = (),
    ):
        self.pool = pool
        self.device = resolve_device(device)
        self.transforms = list(transforms)
        self._workspace = Workspace()
        self._checked: set[str] = set()  # a second pass reads the same values

    def __call__(self, key: str) -> torch.Tensor:
        """τ of ``key`` stacked as [T, *shape]: a view of a reused buffer on the CPU (valid
        until the next call), a new tensor on another device."""
        pool = self.pool
        spec = pool.specs[key]
        taus = pool.read_task_vectors(key, slice(0, spec.numel), self._workspace)
        taus = taus.view(len(pool.tasks), *spec.shape)
        if key not in self._checked:
            if not all_finite(taus):
                pool.check_finite(key, taus, taus.sum(0))  # names the task
            self._checked.add(key)
        taus = taus.to(self.device)
        for transform in self.transforms:
            taus = transform(key, taus)
        return taus

    def walk(self, desc: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, τ of key) over every merged parameter, with a progress bar."""
        for key in progress(self.pool.merged_keys, desc):
            yield key, self(key)


def merged_vector(task_vectors: TaskVectors, rule: Rule, desc: str = "merge") -> StateDict:
    """δ[key] = rule(key, τ of key) for every merged parameter, on the CPU in the compute
    dtype; a δ that is not finite is refused naming the key (a rule's overflow or a
    degenerate SVD, whose inputs were finite)."""
    pool = task_vectors.pool
    delta: StateDict = {}
    for key, taus in task_vectors.walk(desc):
        spec = pool.specs[key]
        merged = rule(key, taus)
        if tuple(merged.shape) != spec.shape:
            raise BadValue(
                f"the merge rule gave {key!r} the shape {tuple(merged.shape)}, "
                f"the model has {spec.shape}"
            )
        check_merged_finite(key, merged)
        out = empty(spec.shape, pool.compute_dtype(key))
        delta[key] = out.copy_(merged)
        del merged, taus
        release_freed_heap()  # the rule's temporaries, before the next parameter's
    return delta


def check_merged_finite(key: str, merged: torch.Tensor) -> None:
    """A merged δ that is not finite, from finite task vectors: a rule's overflow."""
    if not all_finite(merged):
        raise BadValue(f"merging {key!r} gives NaN or Inf values: task vectors too large")


def summed_vector(task_vectors: TaskVectors, desc: str = "sum") -> StateDict:
    """δ = Σt τt of the (transformed) task vectors: Task Arithmetic after DARE's drop."""
    return merged_vector(task_vectors, lambda key, taus: ordered_sum(taus), desc)
