"""Merge methods over whole models: the streaming orchestration around ``mergelab.merging``.

Every single-model method yields a merged task vector δ, parameter by parameter, and
:func:`build_models` turns it into θ0 + λ·δ for each scaling factor λ (Task Arithmetic:
δ = Σ τt; trust region: δ = mask ⊙ Σ τt; consensus: δ = mcons ⊙ τMTL). Each model is
built from the untouched θ0, so a list of factors gives independent models. A model
computed otherwise (TALL retrieval: θ0 + mt ⊙ τMTL) is streamed by :func:`fill_model`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mergelab.io.checkpoints import (
    SafetensorsCheckpoint,
    SafetensorsWriter,
    TensorSpec,
    check_writable,
    open_checkpoint,
    read_into,
    tensor_spec,
)
from mergelab.merging.quantile import RadixSelect, quantile_rank
from mergelab.merging.task_arithmetic import apply_task_vector, task_vector_sum
from mergelab.merging.trust_region import conflict, trust_region_mask, zero_shot_conflict
from mergelab.pool import CheckpointSource, ModelPool, check_same_layout, flat_blocks
from mergelab.workspace import BlockWorkers, Workspace, empty

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


def progress(items: Sequence, desc: str) -> Iterable:
    """A progress bar over parameters (shown on a terminal only)."""
    return tqdm(items, desc=desc, unit="param", leave=False, disable=None)


def is_single(value) -> bool:
    """One number (numpy scalars included) rather than a list of them."""
    return isinstance(value, numbers.Real)


def as_factor_list(scaling_factor: float | Sequence[float], name: str) -> list[float]:
    factors = [scaling_factor] if is_single(scaling_factor) else list(scaling_factor)
    if not factors:
        raise ValueError(f"{name}: no values given")
    for value in factors:
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    return [float(v) for v in factors]


def output_paths(output, count: int, overwrite: bool) -> list[Path | None]:
    """One output path (or None for in-memory) per model, checked before any work."""
    if output is None:
        return [None] * count
    paths = [output] if isinstance(output, (str, os.PathLike)) else list(output)
    if len(paths) != count:
        raise ValueError(f"{count} models to build but {len(paths)} output paths given")
    resolved = [Path(p).resolve() for p in paths]
    duplicate = next((p for p in resolved if resolved.count(p) > 1), None)
    if duplicate is not None:
        raise ValueError(f"output path {duplicate} is given twice")
    return [check_writable(p, overwrite) for p in paths]


@contextlib.contextmanager
def _model_sinks(
    outputs: Sequence[Path | None],
    specs: Mapping[str, TensorSpec],
    metadata: Mapping[str, str] | None,
    overwrite: bool,
) -> Iterator[list[StateDict | SafetensorsWriter]]:
    """One sink per output: a dict to fill, or a writer, whose temporary file is removed
    if anything fails before the caller closes it."""
    sinks: list = []
    try:
        for path in outputs:
            sinks.append(
                {} if path is None else SafetensorsWriter(path, specs, metadata, overwrite)
            )
        yield sinks
    except BaseException:
        for sink in sinks:
            if isinstance(sink, SafetensorsWriter):
                sink.abort()
        raise


def _closed(sinks: Sequence[StateDict | SafetensorsWriter]) -> list[StateDict | Path]:
    return [sink if isinstance(sink, dict) else sink.close() for sink in sinks]


def build_models(
    pretrained: Mapping[str, torch.Tensor],
    merged_keys: Iterable[str],
    delta_of: Callable[[str], torch.Tensor],
    scaling_factors: Sequence[float],
    outputs: Sequence[Path | None],
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
    desc: str = "merge",
    consume: bool = False,
) -> list[StateDict | Path]:
    """θ0 + λ·δ for each λ, streamed key by key into memory or into safetensors files.

    ``delta_of(key)`` gives the merged task vector δ of a key in ``merged_keys``, which is
    computed once for all λ; the other keys of θ0 are copied. The last model is built in
    the storage of δ if ``consume`` allows overwriting it, else of θ0 where θ0 was read
    from a file (a tensor of our own), so that no further tensor is allocated.
    """
    merged = frozenset(merged_keys)
    specs = {key: tensor_spec(pretrained, key) for key in pretrained}
    with _model_sinks(outputs, specs, metadata, overwrite) as sinks:
        last = len(sinks) - 1
        own_pretrained = isinstance(pretrained, SafetensorsCheckpoint)
        for key in progress(list(specs), desc):
            theta0 = pretrained[key].detach()
            if key in merged:
                delta = delta_of(key)
                for i, (sink, factor) in enumerate(zip(sinks, scaling_factors, strict=True)):
                    reuse = None
                    if i == last and isinstance(sink, dict):
                        reuse = delta if consume else theta0 if own_pretrained else None
                    sink[key] = apply_task_vector(theta0, delta, factor, out=reuse)
            else:
                for sink in sinks:
                    sink[key] = theta0.clone()
        return _closed(sinks)


def fill_model(
    pretrained: Mapping[str, torch.Tensor],
    merged_keys: Iterable[str],
    fill_block: Callable[[str, torch.Tensor, slice, Workspace], None],
    block_size: int,
    output: Path | None,
    overwrite: bool = False,
    desc: str = "merge",
    reuse: StateDict | None = None,
) -> StateDict | Path:
    """One model, block by block: ``fill_block(key, out, part, workspace)`` writes the flat
    elements ``part`` (``block_size`` of them, a multiple of 8, the last block shorter) of
    a merged parameter into ``out``, the parameter flat in θ0's dtype, using ``workspace``
    for its scratch; the other keys of θ0 are copied.

    In memory, the blocks of all parameters are shared out among BlockWorkers threads at
    once (one hand-over per thread instead of one per parameter), into new tensors or
    those of ``reuse``: a state dict of θ0's layout (contiguous CPU tensors, e.g. a model
    built before). To a file, parameter by parameter into one reused buffer, in the order
    the writer takes them.
    """
    merged = frozenset(merged_keys)
    specs = {key: tensor_spec(pretrained, key) for key in pretrained}
    if reuse is not None:
        _check_reusable(specs, reuse, output)

    def fill(item: tuple[str, torch.Tensor, slice]) -> None:
        key, flat, part = item
        fill_block(key, flat, part, workers.workspace())

    with BlockWorkers() as workers, _model_sinks([output], specs, None, overwrite) as [sink]:
        if isinstance(sink, dict):
            for key, spec in specs.items():
                sink[key] = reuse[key] if reuse is not None else empty(spec.shape, spec.dtype)
                if key not in merged:
                    read_into(pretrained, key, sink[key].view(-1))
            items = [
                (key, sink[key].view(-1), part)
                for key in specs
                if key in merged
                for part in flat_blocks(specs[key].numel, block_size)
            ]
            workers.run(fill, items)
        else:
            workspace = Workspace()
            for key in progress(list(specs), desc):
                out = workspace.get("model", specs[key].shape, specs[key].dtype)
                if key in merged:
                    parts = flat_blocks(specs[key].numel, block_size)
                    workers.run(fill, [(key, out.view(-1), part) for part in parts])
                else:
                    read_into(pretrained, key, out.view(-1))
                sink[key] = out
        [result] = _closed([sink])
        return result


def _check_reusable(specs: Mapping[str, TensorSpec], reuse: StateDict, output) -> None:
    if output is not None:
        raise ValueError("reuse writes the model into tensors in memory, not to an output file")
    check_same_layout(specs, reuse, "the model to reuse")
    for key, tensor in reuse.items():
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.requires_grad:
            raise ValueError(
                f"the model to reuse: {key!r} must be a contiguous CPU tensor without grad"
            )


def single_or_list(results: list, scaling_factor) -> StateDict | list:
    return results[0] if is_single(scaling_factor) else results


# --- Task Arithmetic -------------------------------------------------------------------


def task_arithmetic_delta(pool: ModelPool, key: str, workers: BlockWorkers) -> torch.Tensor:
    """δ = Σt τt of one merged parameter (a new tensor), its blocks spread over ``workers``."""
    delta = empty((pool.specs[key].numel,), pool.compute_dtype(key))

    def sum_block(part: slice) -> None:
        taus = pool.read_task_vectors(key, part, workers.workspace())
        pool.check_finite(key, taus, task_vector_sum(taus, out=delta[part]))

    workers.run(sum_block, pool.blocks(key))
    return delta.view(pool.specs[key].shape)


def task_arithmetic_vector(pool: ModelPool) -> StateDict:
    """δ = Σt τt for every merged parameter (the merged model is θ0 + λ·δ)."""
    with BlockWorkers() as workers:
        return {key: task_arithmetic_delta(pool, key, workers) for key in pool.merged_keys}


def task_arithmetic(
    pretrained: CheckpointSource,
    finetuned: Mapping[str, CheckpointSource],
    scaling_factor: float | Sequence[float] = 0.3,
    output=None,
    overwrite: bool = False,
):
    """θ = θ0 + λ Σt τt. A list of λ gives a list of independent models.

    ``output``: None to return state dicts, or one path (a list of paths for a list of
    λ) to write safetensors files and return their paths.
    """
    pool = ModelPool(pretrained, finetuned)
    factors = as_factor_list(scaling_factor, "scaling_factor")
    outputs = output_paths(output, len(factors), overwrite)
    with BlockWorkers() as workers:
        results = build_models(
            pool.pretrained,
            pool.merged_keys,
            functools.partial(task_arithmetic_delta, pool, workers=workers),
            factors,
            outputs,
            overwrite,
            desc="task arithmetic",
            consume=True,
        )
    return single_or_list(results, scaling_factor)


# --- Trust region ----------------------------------------------------------------------


@dataclass
class TrustRegionVector:
    """The masked task-vector sum mask ⊙ Σ τt and what the mask kept."""

    delta: StateDict
    threshold: float
    kept: dict[str, int]

    def density(self) -> dict[str, float]:
        """Share of coordinates kept, per parameter."""
        return {key: self.kept[key] / self.delta[key].numel() for key in self.delta}

    @property
    def kept_fraction(self) -> float:
        return sum(self.kept.values()) / sum(t.numel() for t in self.delta.values())


def _gradient_checkpoints(pool: ModelPool, gradient_stats) -> dict[str, Mapping] | None:
    if gradient_stats is None:
        return None
    stats = {task: open_checkpoint(src) for task, src in gradient_stats.items()}
    pool.check_companions(stats, "gradient statistics")
    return stats


def _conflict_block(
    pool: ModelPool, key: str, gradients, part: slice, workspace: Workspace
) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ block, Ω in float32) of the flat slice ``part`` of one parameter; τ is a view of
    ``workspace``. In numpy, so that BlockWorkers threads can run blocks side by side."""
    taus = pool.read_task_vectors(key, part, workspace)
    scratch = workspace.get("scratch", taus.shape, taus.dtype)
    if gradients is None:
        omega = zero_shot_conflict(taus, scratch)
    else:
        grads = workspace.get("gradients", taus.shape, taus.dtype)
        for task, row in zip(pool.tasks, grads, strict=True):
            read_into(gradients[task], key, row, part.start, part.stop)
            with np.errstate(all="ignore"):
                if not np.isfinite(row.numpy().sum()) and not np.isfinite(row.numpy()).all():
                    raise ValueError(f"gradient statistics of {task!r} have NaN or Inf at {key!r}")
        omega = conflict(grads, taus, scratch)
    omega = torch.from_numpy(omega.numpy().astype(np.float32, copy=False))
    pool.check_finite(key, taus, omega)
    return taus, omega


def _conflict_chunks(
    pool: ModelPool, key: str, gradients, workspace: Workspace
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(flat slice, τ block, Ω in float32) over one parameter, block by block."""
    for part in pool.blocks(key):
        yield part, *_conflict_block(pool, key, gradients, part, workspace)


def _select(values: torch.Tensor, rank: int) -> float:
    """The ``rank``-th smallest (0-based) of a tensor, by radix select in slices (so that
    the temporaries stay small)."""
    select = RadixSelect(rank, values.numel())
    for _ in range(2):
        for part in values.split(1 << 20):
            select.observe(part)
        if select.bucket is None:
            select.next_pass()
    return select.value


# Share of each parameter's chunks whose Ω estimates where the threshold will fall.
SAMPLE_EVERY = 16


def _conflict_floor(pool: ModelPool, gradients, q: float, workers: BlockWorkers) -> float:
    """A value of Ω that the threshold is all but certain to exceed: the sample quantile
    at 1 − 3(1 − q), so that about 3(1 − q) of all coordinates lie at or above it."""
    sample, size = [], 0  # (key, block, where its Ω goes in the sample)
    for key in pool.merged_keys:
        for part in pool.blocks(key, SAMPLE_EVERY):
            sample.append((key, part, slice(size, size + part.stop - part.start)))
            size += part.stop - part.start
    values = torch.empty(size)

    def observe(item: tuple[str, slice, slice]) -> None:
        key, part, where = item
        omega = _conflict_block(pool, key, gradients, part, workers.workspace())[1]
        values.numpy()[where] = omega.numpy()  # numpy: torch's copy would start threads

    workers.run(observe, sample)
    low = max(0.0, 1 - 3 * (1 - q))
    return _select(values, min(quantile_rank(low, size), size - 1))


def _one_pass_trust_region(
    pool: ModelPool, gradients, rank: int, floor: float, delta: StateDict, workers: BlockWorkers
) -> tuple[float, dict[str, int]] | None:
    """δ and the exact threshold from one pass, or None if that needs a second one.

    Every coordinate with Ω ≥ ``floor`` is stored (index and Ω); all others are kept.
    When the wanted rank falls among the stored ones, they alone decide the threshold.
    """
    total = pool.num_merged_params
    budget = max(total // 16, 1 << 20)
    # preallocated (pages are touched only as filled): many small kept tensors between the
    # per-block temporaries would fragment the heap
    positions = torch.empty(budget, dtype=torch.int64)
    omegas = torch.empty(budget, dtype=torch.float32)
    ranges: dict[str, tuple[int, int]] = {}
    count = 0

    def merge_block(key: str, part: slice) -> tuple[np.ndarray, np.ndarray]:
        """δ of the block, and the positions and Ω of its coordinates at or above the floor."""
        taus, omega = _conflict_block(pool, key, gradients, part, workers.workspace())
        task_vector_sum(taus, out=delta[key].view(-1)[part])
        above = np.flatnonzero(omega.numpy() >= floor)
        return above + part.start, omega.numpy()[above]

    for key in progress(pool.merged_keys, "trust region: merge"):
        first = count
        for index, values in workers.run(functools.partial(merge_block, key), pool.blocks(key)):
            if count + index.size > budget:
                return None
            positions[count : count + index.size] = torch.from_numpy(index)
            omegas[count : count + index.size] = torch.from_numpy(values)
            count += index.size
        ranges[key] = (first, count)
    below = total - count
    if rank < below:
        return None
    threshold = _select(omegas[:count], rank - below)
    kept = {}
    for key, (first, last) in ranges.items():
        drop = positions[first:last][~trust_region_mask(omegas[first:last], threshold)]
        delta[key].view(-1)[drop] = 0
        kept[key] = pool.specs[key].numel - drop.numel()
    return threshold, kept


def _two_pass_trust_region(
    pool: ModelPool, gradients, rank: int, delta: StateDict, workspace: Workspace
) -> tuple[float, dict[str, int]]:
    """δ and the exact threshold by radix select over two passes: the first counts Ω into
    buckets, the second keeps what lies below the threshold's bucket, drops what lies
    above, and stores the coordinates inside it (or recomputes their parameter, should
    they be unusually many) to settle once the threshold is pinned."""
    total = pool.num_merged_params
    select = RadixSelect(rank, total)
    for key in progress(pool.merged_keys, "trust region: conflicts"):
        for _, _, omega in _conflict_chunks(pool, key, gradients, workspace):
            select.observe(omega)
    select.next_pass()
    kept: dict[str, int] = {}
    undecided: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    revisit: list[str] = []
    budget = max(total // 64, 1 << 20)
    for key in progress(pool.merged_keys, "trust region: merge"):
        flat = delta[key].view(-1)
        kept[key] = 0
        for part, taus, omega in _conflict_chunks(pool, key, gradients, workspace):
            buckets = select.observe(omega)
            block = task_vector_sum(taus, out=flat[part])
            block.masked_fill_(buckets > select.bucket, 0)
            kept[key] += int((buckets < select.bucket).sum())
            inside = (buckets == select.bucket).nonzero().squeeze(1)
            if inside.numel() and key not in revisit and budget >= inside.numel():
                budget -= inside.numel()
                undecided.setdefault(key, []).append((inside + part.start, omega[inside]))
            elif inside.numel() and key not in revisit:
                revisit.append(key)
    threshold = select.value
    for key in revisit:
        undecided.pop(key, None)
        flat, kept[key] = delta[key].view(-1), 0
        for part, taus, omega in _conflict_chunks(pool, key, gradients, workspace):
            keep = trust_region_mask(omega, threshold)
            task_vector_sum(taus, out=flat[part]).masked_fill_(~keep, 0)
            kept[key] += int(keep.sum())
    for key, parts in undecided.items():
        for index, omega in parts:
            keep = trust_region_mask(omega, threshold)
            delta[key].view(-1)[index[~keep]] = 0
            kept[key] += int(keep.sum())
    return threshold, kept


def trust_region_vector(
    pool: ModelPool,
    threshold_quantile: float = 0.99,
    gradient_stats: Mapping[str, CheckpointSource] | None = None,
) -> TrustRegionVector:
    """The trust-region merged task vector, streamed block by block over the models.

    Ω (see :mod:`mergelab.merging.trust_region`) is never held for the whole model. The
    threshold is the ⌊q·n⌋-th smallest Ω (0-based) over all n merged coordinates,
    compared in float32, found exactly without a sort: a sample of 1/16 of the blocks
    places a floor well below it; one pass then builds δ = Σ τ and stores only the
    coordinates with Ω above the floor (about 4(1 − q) of them), among which the
    threshold is selected and the dropped coordinates zeroed. Should the floor turn out
    too high, or too many coordinates lie above it, a two-pass radix select over the
    models takes over. Kept means Ω strictly below the threshold, so ties at the
    threshold are dropped; with distinct values exactly ⌊q·n⌋ are kept. q = 1 keeps
    everything (plain Task Arithmetic).
    """
    if not 0 < threshold_quantile <= 1:
        raise ValueError(f"threshold_quantile must be in (0, 1], got {threshold_quantile}")
    pool.require_tasks(2, "trust-region merging")
    gradients = _gradient_checkpoints(pool, gradient_stats)
    total = pool.num_merged_params
    rank = quantile_rank(threshold_quantile, total)
    if rank >= total:
        delta = task_arithmetic_vector(pool)
        return TrustRegionVector(delta, math.inf, {k: d.numel() for k, d in delta.items()})

    # δ is allocated before any transient tensor so that the allocator does not interleave
    # them: freed transients would otherwise leave the heap fragmented around δ
    delta: StateDict = {
        key: empty(pool.specs[key].shape, pool.compute_dtype(key)) for key in pool.merged_keys
    }
    with BlockWorkers() as workers:
        floor = _conflict_floor(pool, gradients, threshold_quantile, workers)
        found = _one_pass_trust_region(pool, gradients, rank, floor, delta, workers)
    if found is None:
        log.info("trust region: the sampled floor missed; selecting in two passes")
        found = _two_pass_trust_region(pool, gradients, rank, delta, Workspace())
    threshold, kept = found
    result = TrustRegionVector(delta, threshold, kept)
    log.info(
        "trust region: threshold %.6g at quantile %g, %.4f%% of coordinates kept",
        threshold,
        threshold_quantile,
        100 * result.kept_fraction,
    )
    return result


def trust_region(
    pretrained: CheckpointSource,
    finetuned: Mapping[str, CheckpointSource],
    scaling_factor: float | Sequence[float] = 0.3,
    threshold_quantile: float = 0.99,
    gradient_stats: Mapping[str, CheckpointSource] | None = None,
    output=None,
    overwrite: bool = False,
):
    """TATR: θ = θ0 + λ Σi τi ⊙ 1{Ω < threshold}; zero-shot (ḡi = |τi|) without statistics.

    ``gradient_stats`` maps each task to its average absolute per-sample gradients
    (a state dict or a safetensors path with the merged keys). A list of λ gives a list
    of independent models; ``output`` as in :func:`task_arithmetic`.
    """
    pool = ModelPool(pretrained, finetuned)
    factors = as_factor_list(scaling_factor, "scaling_factor")
    outputs = output_paths(output, len(factors), overwrite)
    merged = trust_region_vector(pool, threshold_quantile, gradient_stats)
    results = build_models(
        pool.pretrained,
        pool.merged_keys,
        merged.delta.__getitem__,
        factors,
        outputs,
        overwrite,
        desc="trust region: models",
        consume=True,
    )
    return single_or_list(results, scaling_factor)
