"""TATR's conflict Ω, block by block, and the exact selection of its threshold.

Ω (see :mod:`mergelab.merging.trust_region`) is never held for the whole model. The
threshold is the ⌊q·n⌋-th smallest Ω (0-based) over all n merged coordinates, compared in
float32, found exactly without a sort: a sample of 1/16 of the blocks places a floor well
below it (:func:`conflict_floor`); one pass then builds δ = Σ τ and stores only the
coordinates with Ω above the floor, among which the threshold is selected and the dropped
coordinates zeroed (:func:`one_pass_trust_region`). Should the floor turn out too high, or
too many coordinates lie above it, a two-pass radix select over the models takes over
(:func:`two_pass_trust_region`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch

from mergelab.engine.checkpoints import read_into
from mergelab.engine.pool import ModelPool
from mergelab.engine.streaming import StateDict, progress
from mergelab.engine.workspace import BlockWorkers, Workspace
from mergelab.errors import BadValue
from mergelab.merging.quantile import RadixSelect, quantile_rank
from mergelab.merging.task_arithmetic import task_vector_sum
from mergelab.merging.trust_region import conflict, trust_region_mask, zero_shot_conflict


def conflict_block(
    pool: ModelPool,
    key: str,
    gradients,
    part: slice,
    workspace: Workspace,
    checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ block, Ω in float32) of the flat slice ``part`` of one parameter; τ is a view of
    ``workspace``. In numpy, so that BlockWorkers threads can run blocks side by side.
    ``checked``: an earlier pass found this block finite (its checks are skipped)."""
    taus = pool.read_task_vectors(key, part, workspace)
    scratch = workspace.get("scratch", taus.shape, taus.dtype)
    if gradients is None:
        omega = zero_shot_conflict(taus, scratch)
    else:
        grads = workspace.get("gradients", taus.shape, taus.dtype)
        for task, row in zip(pool.tasks, grads, strict=True):
            read_into(gradients[task], key, row, part.start, part.stop)
            if checked:
                continue
            with np.errstate(all="ignore"):
                if not np.isfinite(row.numpy().sum()) and not np.isfinite(row.numpy()).all():
                    raise BadValue(f"gradient statistics of {task!r} have NaN or Inf at {key!r}")
        omega = conflict(grads, taus, scratch)
    omega = torch.from_numpy(omega.numpy().astype(np.float32, copy=False))
    if not checked:
        pool.check_finite(key, taus, omega)
    return taus, omega


def _conflict_chunks(
    pool: ModelPool, key: str, gradients, workspace: Workspace
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(flat slice, τ block, Ω in float32) over one parameter, block by block."""
    for part in pool.blocks(key):
        yield part, *conflict_block(pool, key, gradients, part, workspace)


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


def conflict_floor(pool: ModelPool, gradients, q: float, workers: BlockWorkers) -> float:
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
        omega = conflict_block(pool, key, gradients, part, workers.workspace())[1]
        values.numpy()[where] = omega.numpy()  # numpy: torch's copy would start threads

    workers.run(observe, sample)
    low = max(0.0, 1 - 3 * (1 - q))
    return _select(values, min(quantile_rank(low, size), size - 1))


def one_pass_trust_region(
    pool: ModelPool,
    gradients,
    rank: int,
    floor: float,
    delta: StateDict | None,
    workers: BlockWorkers,
) -> tuple[float, dict[str, int]] | None:
    """δ (unless ``delta`` is None: the threshold alone) and the exact threshold from one
    pass, or None if that needs a second one.

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
        taus, omega = conflict_block(pool, key, gradients, part, workers.workspace())
        if delta is not None:
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
        if delta is not None:
            delta[key].view(-1)[drop] = 0
        kept[key] = pool.specs[key].numel - drop.numel()
    return threshold, kept


def two_pass_trust_region(
    pool: ModelPool, gradients, rank: int, delta: StateDict | None, workspace: Workspace
) -> tuple[float, dict[str, int]]:
    """δ and the exact threshold by radix select over two passes: the first counts Ω into
    buckets, the second keeps what lies below the threshold's bucket, drops what lies
    above, and stores the coordinates inside it (or recomputes their parameter, should
    they be unusually many) to settle once the threshold is pinned. With ``delta`` None,
    the threshold alone (and no counts of what is kept)."""
    total = pool.num_merged_params
    select = RadixSelect(rank, total)
    for key in progress(pool.merged_keys, "trust region: conflicts"):
        for _, _, omega in _conflict_chunks(pool, key, gradients, workspace):
            select.observe(omega)
    select.next_pass()
    if delta is None:
        for key in progress(pool.merged_keys, "trust region: threshold"):
            for _, _, omega in _conflict_chunks(pool, key, gradients, workspace):
                select.observe(omega)
        return select.value, {}
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
