"""A pretrained checkpoint and its fine-tuned copies, checked and walked parameter by parameter."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

import numpy as np
import torch

from mergelab.engine.checkpoints import LazyCheckpoint, TensorSpec, read_into, tensor_spec
from mergelab.engine.model_files import open_checkpoint
from mergelab.engine.tensor_selection import STRICT, TensorSelection, select_tensors
from mergelab.engine.workspace import Workspace
from mergelab.errors import BadValue, MissingKey

CheckpointSource = str | os.PathLike | Mapping[str, torch.Tensor]

# Columns per block: T + 1 rows of 2**17 float32 values (4.7 MB for 8 tasks) stay in the
# cache while a rule's few elementwise passes run over them, instead of streaming through
# memory; halving it to fit a core's 1 MB L2 made the Python calls per block cost more than
# they saved (TALL masks of a ViT-B/32: 0.47 s at 2**16, 0.40 s at 2**17, 0.42 s at 2**18).
CHUNK = 1 << 17


# A sample that places a quantile of a whole model's values (TIES's thresholds, TATR's
# floor) holds at most about this many of them, however large the model: its precision
# rests on how many values it holds, not on their share. ViT-B/32's 1/16 is 5.5 M; a
# Llama-shaped model of 1.5 G parameters in bf16, 8 tasks, from storage: TIES's sample
# 4.4 -> 1.3 s at 1/179 of it, TATR's 2.9 -> 1.2 s (scripts/bench_model_merge.py).
SAMPLE_MOST = 1 << 23


def sample_every(total: int, every: int) -> int:
    """One value in how many that a sample of a model of ``total`` values takes: ``every``,
    or one in more where that would hold over :data:`SAMPLE_MOST`."""
    return max(every, -(-total // SAMPLE_MOST))


def flat_blocks(numel: int, size: int, every: int = 1) -> list[slice]:
    """Slices of ``size`` elements over ``numel`` (the last one shorter), every ``every``-th."""
    return [slice(start, min(start + size, numel)) for start in range(0, numel, size * every)]


class ModelPool:
    """θ0 and {task: θt}, with every key, shape and dtype checked before any work.

    Only floating-point tensors are merged (:attr:`merged_keys`); the others (integer
    buffers and the like, and what ``selection`` excludes) are copied from θ0, each with
    its reason in :attr:`copied`. Checkpoints are read lazily when given as
    ``.safetensors`` paths, so iterating :meth:`task_vectors` over all keys holds one
    parameter of each model at a time.
    """

    chunk = CHUNK  # columns per block of blocks(); a multiple of 8

    def __init__(
        self,
        pretrained: CheckpointSource,
        finetuned: Mapping[str, CheckpointSource],
        selection: TensorSelection = STRICT,
    ):
        if not finetuned:
            raise BadValue("no fine-tuned models given")
        self.pretrained = open_checkpoint(pretrained)
        self.finetuned = {str(task): open_checkpoint(src) for task, src in finetuned.items()}
        self.specs: dict[str, TensorSpec] = {
            k: tensor_spec(self.pretrained, k) for k in self.pretrained
        }
        self.selection = selection
        self.merged_keys, self.copied = select_tensors(self.specs, self.finetuned, selection)
        if not self.merged_keys:
            raise BadValue("the pretrained model has no floating-point parameters to merge")

    @property
    def tasks(self) -> list[str]:
        return list(self.finetuned)

    @property
    def num_merged_params(self) -> int:
        return sum(self.specs[k].numel for k in self.merged_keys)

    def require_tasks(self, minimum: int, method: str) -> None:
        if len(self.finetuned) < minimum:
            raise BadValue(
                f"{method} needs at least {minimum} fine-tuned models, got {len(self.finetuned)}"
            )

    def compute_dtype(self, key: str) -> torch.dtype:
        return torch.promote_types(self.specs[key].dtype, torch.float32)

    def blocks(self, key: str, every: int = 1) -> list[slice]:
        """Flat slices of :attr:`chunk` columns over one parameter (every ``every``-th only)."""
        return flat_blocks(self.specs[key].numel, self.chunk, every)

    def read_models(self, key: str, part: slice, workspace: Workspace) -> torch.Tensor:
        """θ0, θ1, …, θT [:, part] stacked as [T + 1, part size] in the compute dtype, in a
        view of ``workspace`` (overwritten by its next use): for kernels that form τ as they
        go (:meth:`read_task_vectors` forms it first)."""
        # contiguous, so that the rows of τ are too (compiled kernels vectorise over them)
        return self._read_rows(key, part, workspace, "models", self.compute_dtype(key))

    def read_stored_models(self, key: str, part: slice, workspace: Workspace) -> torch.Tensor:
        """:meth:`read_models` in the dtype the models store ``key`` in (every model's is
        θ0's), not converted: for kernels that widen each entry as they read it."""
        return self._read_rows(key, part, workspace, "stored models", self.specs[key].dtype)

    def _read_rows(
        self, key: str, part: slice, workspace: Workspace, name: str, dtype: torch.dtype
    ) -> torch.Tensor:
        """Every model's ``key`` [part] as rows of the ``workspace`` buffer ``name``."""
        sources = [self.pretrained, *self.finetuned.values()]
        block = workspace.get(name, (len(sources), part.stop - part.start), dtype)
        for row, checkpoint in zip(block, sources, strict=True):
            read_into(checkpoint, key, row, part.start, part.stop)
        return block

    @contextlib.contextmanager
    def reading_ahead(self, pieces: Sequence[tuple[str, slice]]) -> Iterator[None]:
        """Every model's data of ``pieces`` (merged keys and flat slices) asked of the
        operating system ahead of use, on a thread of its own while the block inside
        reads them: a sample scattered over the files, which their sequential read-ahead
        does not foresee (1.5 G parameters, 8 tasks, from storage: TIES's sample 7.3 s →
        4.7 s; scripts/bench_model_merge.py)."""
        sources = [self.pretrained, *self.finetuned.values()]
        lazy = [source for source in sources if isinstance(source, LazyCheckpoint)]

        def ask() -> None:
            for key, part in pieces:
                for source in lazy:
                    source.read_ahead(key, part.start, part.stop)

        with ThreadPoolExecutor(1) as asking:
            asked = asking.submit(ask)
            yield
            asked.result()

    def read_task_vectors(self, key: str, part: slice, workspace: Workspace) -> torch.Tensor:
        """τ[:, part], τ = θt − θ0 stacked as [T, part size], in a view of ``workspace``
        (overwritten by its next use). Callers check what they reduce it to with
        :meth:`check_finite`."""
        return subtract_pretrained(self.read_models(key, part, workspace))

    def task_vector_chunks(
        self, key: str, workspace: Workspace
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """(flat slice, τ[:, slice]) over one parameter, block by block (see
        :meth:`read_task_vectors`)."""
        for part in self.blocks(key):
            yield part, self.read_task_vectors(key, part, workspace)

    def check_finite(self, key: str, taus: torch.Tensor, summary: torch.Tensor) -> None:
        """Raise, naming the task, if ``summary`` (a reduction over the task vectors ``taus``
        that any NaN or Inf in them makes non-finite) is not finite. One sum of it decides
        in the common case (in numpy, which starts no threads); the element-wise checks run
        only when that sum is not finite."""
        if not _sums_to_finite(summary):
            self._refuse(key, taus, summary.dtype)

    def check_finite_from_models(
        self, key: str, models: torch.Tensor, summary: torch.Tensor | None, finite: bool
    ) -> None:
        """:meth:`check_finite` for a ``summary`` computed from :meth:`read_models`' rows:
        τ is formed, in their place, only to name the task when the summary is not finite
        or ``finite`` is False (a kernel saw a NaN or Inf that its summary hides; without a
        summary, ``finite`` alone decides)."""
        if not (finite and (summary is None or _sums_to_finite(summary))):
            self._refuse(key, subtract_pretrained(models), models.dtype)

    def check_finite_summary(
        self, key: str, part: slice, summary: torch.Tensor, workspace: Workspace
    ) -> None:
        """:meth:`check_finite` for a ``summary`` of block ``part`` computed without τ at
        hand (from :meth:`read_stored_models`): τ is read again, only to name the task,
        where the summary is not finite."""
        if not _sums_to_finite(summary):
            self.refuse_block(key, part, workspace)

    def refuse_block(self, key: str, part: slice, workspace: Workspace) -> NoReturn:
        """Raise, naming the task, for a block ``part`` that a kernel found not finite
        from rows that no longer hold τ (or never did: stored rows): τ is read again."""
        taus = self.read_task_vectors(key, part, workspace)
        self._refuse(key, taus, taus.dtype)

    def _refuse(self, key: str, taus: torch.Tensor, dtype: torch.dtype) -> NoReturn:
        for task, row in zip(self.tasks, taus, strict=True):
            if not torch.isfinite(row).all():
                raise BadValue(f"task vector of {task!r} has NaN or Inf values at {key!r}")
        raise BadValue(f"merging {key!r} overflows {dtype}: task vectors too large")

    def check_companions(self, stats: Mapping[str, Mapping[str, torch.Tensor]], what: str) -> None:
        """Check per-task tensors (e.g. gradient statistics) cover every merged parameter."""
        if set(stats) != set(self.finetuned):
            raise BadValue(f"{what} are for tasks {sorted(stats)}, the models for {self.tasks}")
        for task, tensors in stats.items():
            for key in self.merged_keys:
                if key not in tensors:
                    raise MissingKey(f"{what} of {task!r} lack {key!r}")
                spec = tensor_spec(tensors, key)
                if spec.shape != self.specs[key].shape:
                    raise BadValue(
                        f"{what} of {task!r}: {key!r} has shape {spec.shape}, "
                        f"the model {self.specs[key].shape}"
                    )

    def fingerprint(self) -> str:
        """A short identity of θ0 (see :func:`fingerprint`)."""
        return fingerprint(self.pretrained)


def subtract_pretrained(models: torch.Tensor) -> torch.Tensor:
    """τ = θt − θ0 of rows stacked as [T + 1, n] (θ0 first), in their place: rows 1..T.

    The subtraction runs in numpy (the same IEEE result as torch), single-threaded, so
    that :class:`~mergelab.engine.workspace.BlockWorkers` threads can call it side by side.
    """
    rows = models.numpy()
    with np.errstate(over="ignore", invalid="ignore"):  # the callers refuse what is not finite
        np.subtract(rows[1:], rows[0], out=rows[1:])
    return models[1:]


def _sums_to_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor is finite, decided in the common case by one numpy sum."""
    with np.errstate(all="ignore"):  # overflow to Inf is what the check looks for
        return bool(np.isfinite(tensor.numpy().sum()) or torch.isfinite(tensor).all())


def fingerprint(checkpoint: Mapping[str, torch.Tensor]) -> str:
    """A short identity of a state dict: its layout and a strided sample of every tensor's
    values (a file's tensors read into one reused buffer)."""
    digest = hashlib.sha256()
    workspace = Workspace()
    for key in checkpoint:
        spec = tensor_spec(checkpoint, key)
        digest.update(f"{key}:{spec.shape}:{spec.dtype};".encode())
        if isinstance(checkpoint, LazyCheckpoint):
            buffer = workspace.get("fingerprint", (spec.numel,), spec.dtype)
            flat = checkpoint.read_into(key, buffer)
        else:
            flat = checkpoint[key].detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].contiguous()
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
