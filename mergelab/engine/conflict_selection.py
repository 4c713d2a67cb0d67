"""TATR's conflict Ω, block by block, and the exact selection of its threshold.

Ω (see :mod:`mergelab.merging.trust_region`) is never held for the whole model. The
threshold is the ⌊q·n⌋-th smallest Ω (0-based) over all n merged coordinates, compared in
float32, found exactly without a sort: a sample of the blocks (1/16, at most about 2^23
values: :func:`~mergelab.engine.pool.sample_every`) places a floor well below it
(:func:`conflict_floor`); one pass then builds δ = Σ τ and stores only the coordinates
with Ω above the floor, among which the threshold is selected and the dropped
coordinates zeroed (:func:`one_pass_trust_region`; :class:`AboveFloor`, which
:mod:`mergelab.engine.trust_region_streamed` shares). Should the floor turn out too high, or
too many coordinates lie above it, a two-pass radix select over the models takes over
(:func:`two_pass_trust_region`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch

from mergelab.engine.checkpoints import read_into
from mergelab.engine.model_writing import bfloat16_bits
from mergelab.engine.pool import ModelPool, sample_every, subtract_pretrained
from mergelab.engine.streaming import StateDict, progress
from mergelab.engine.workspace import BlockWorkers, Workspace
from mergelab.errors import BadValue
from mergelab.merging.compiled import kernels
from mergelab.merging.quantile import RadixSelect, quantile_rank
from mergelab.merging.task_arithmetic import task_vector_sum
from mergelab.merging.trust_region import conflict, trust_region_mask, zero_shot_conflict


def conflict_block(
    pool: ModelPool,
    key: str,
    gradients,
    part: slice,
    workspace: Workspace,
    delta: np.ndarray | None = None,
    checked: bool = False,
) -> tuple[torch.Tensor, np.ndarray]:
    """(Ω in float32, θ0's block) of the flat slice ``part`` of one parameter, valid
    until ``workspace``'s next use; δ = Σ τ into ``delta`` when given. Zero-shot
    bfloat16 blocks take one compiled pass from the stored rows
    (:mod:`mergelab.merging.trust_region_kernels`; θ0 then comes as its bits, uint16),
    others numpy (θ0 in the compute dtype); :func:`widened_theta0` gives the compute
    dtype either way. Neither starts threads, so that BlockWorkers threads can run blocks
    side by side. ``checked``: an earlier pass found this block finite (its checks are
    skipped)."""
    if gradients is None and pool.specs[key].dtype == torch.bfloat16:
        models = bfloat16_bits(pool.read_stored_models(key, part, workspace))
        size = models.shape[1]
        omega = workspace.get("omega", (size,), torch.float32)
        if delta is None:
            delta = workspace.get("delta", (size,), torch.float32).numpy()
        kernel = kernels("trust_region_kernels").zero_shot_conflict_and_sum_bfloat16
        kernel(models, omega.numpy(), delta)
        if not checked:
            pool.check_finite_summary(key, part, omega, workspace)
        return omega, models[0]
    models = pool.read_models(key, part, workspace)
    taus = subtract_pretrained(models)  # θ0's row stays
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
    if delta is not None:
        task_vector_sum(taus, out=torch.from_numpy(delta))
    return omega, models[0].numpy()


def _conflict_chunks(
    pool: ModelPool, key: str, gradients, workspace: Workspace, delta: torch.Tensor | None = None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(flat slice, Ω in float32) over one parameter, block by block; δ = Σ τ into the
    flat ``delta`` when given."""
    for part in pool.blocks(key):
        block = None if delta is None else delta[part].numpy()
        yield part, conflict_block(pool, key, gradients, part, workspace, block)[0]


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


# Share of each parameter's chunks whose Ω estimates where the threshold will fall (less
# in a model past 134 M values: :func:`~mergelab.engine.pool.sample_every`).
SAMPLE_EVERY = 16


def conflict_floor(pool: ModelPool, gradients, q: float, workers: BlockWorkers) -> float:
    """A value of Ω that the threshold is all but certain to exceed: the sample quantile
    at 1 − 3(1 − q), so that about 3(1 − q) of all coordinates lie at or above it."""
    every = sample_every(pool.num_merged_params, SAMPLE_EVERY)
    sample, size = [], 0  # (key, block, where its Ω goes in the sample)
    for key in pool.merged_keys:
        for part in pool.blocks(key, every):
            sample.append((key, part, slice(size, size + part.stop - part.start)))
            size += part.stop - part.start
    values = torch.empty(size)

    def observe(item: tuple[str, slice, slice]) -> None:
        key, part, where = item
        omega = conflict_block(pool, key, gradients, part, workers.workspace())[0]
        values.numpy()[where] = omega.numpy()  # numpy: torch's copy would start threads

    with pool.reading_ahead([(key, part) for key, part, _ in sample]):
        workers.run(observe, sample)
    low = max(0.0, 1 - 3 * (1 - q))
    return _select(values, min(quantile_rank(low, size), size - 1))


# the coordinates stored above the floor, at most this share of a model's (about 3(1 − q)
# lie there: :func:`conflict_floor`), or 2^20
STORED_SHARE = 16


class AboveFloor:
    """The coordinates whose Ω is at or above a floor, parameter by parameter (their flat
    positions and Ω, and θ0 there when given), up to 1/:data:`STORED_SHARE` of the
    ``total`` (:attr:`full` beyond: none kept from then on); the threshold of a rank
    among them."""

    def __init__(self, floor: float, total: int):
        self.floor, self.budget = floor, max(total // STORED_SHARE, 1 << 20)
        self.count = 0
        self.full = False
        self._parts: dict[str, list[tuple[np.ndarray, ...]]] = {}

    def find(self, omega: torch.Tensor, start: int, theta0: np.ndarray | None = None):
        """Of a block at flat offset ``start``: (positions, Ω, θ0 there or None)."""
        above = np.flatnonzero(omega.numpy() >= self.floor)
        there = None if theta0 is None else theta0[above]
        return above + start, omega.numpy()[above], there

    def add(self, key: str, found: list[tuple]) -> None:
        """A parameter's blocks' :meth:`find`, in order."""
        self.count += sum(positions.size for positions, _, _ in found)
        self.full = self.full or self.count > self.budget
        if self.full:
            self._parts = {}
        else:
            self._parts[key] = found

    def threshold(self, rank: int, total: int) -> float | None:
        """The ``rank``-th smallest Ω of ``total``, or None where it lies below the floor
        (or too many lay above it)."""
        below = total - self.count
        if self.full or rank < below:
            return None
        omegas = [omega for parts in self._parts.values() for _, omega, _ in parts]
        return _select(torch.from_numpy(np.concatenate(omegas)), rank - below)

    def dropped(self, threshold: float) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """Each parameter's coordinates that ``threshold`` drops: positions, θ0 there."""
        out = {}
        for key, parts in self._parts.items():
            positions, omegas, theta0 = ([part[field] for part in parts] for field in range(3))
            omega = torch.from_numpy(np.concatenate(omegas))
            drop = ~trust_region_mask(omega, threshold).numpy()
            there = None if theta0[0] is None else np.concatenate(theta0)[drop]
            out[key] = np.concatenate(positions)[drop], there
        return out


def one_pass_trust_region(
    pool: ModelPool,
    gradients,
    rank: int,
    floor: float,
    delta: StateDict,
    workers: BlockWorkers,
) -> tuple[float, dict[str, int]] | None:
    """δ and the exact threshold from one pass, or None if that needs a second one.

    Every coordinate with Ω ≥ ``floor`` is stored (index and Ω); all others are kept.
    When the wanted rank falls among the stored ones, they alone decide the threshold.
    """
    total = pool.num_merged_params
    stored = AboveFloor(floor, total)

    def merge_block(key: str, part: slice) -> tuple:
        """δ of the block, and the positions and Ω of its coordinates at or above the floor."""
        block = delta[key].view(-1)[part].numpy()
        omega = conflict_block(pool, key, gradients, part, workers.workspace(), block)[0]
        return stored.find(omega, part.start)

    for key in progress(pool.merged_keys, "trust region: merge"):
        stored.add(key, workers.run(functools.partial(merge_block, key), pool.blocks(key)))
        if stored.full:
            return None
    threshold = stored.threshold(rank, total)
    if threshold is None:
        return None
    kept = {key: pool.specs[key].numel for key in pool.merged_keys}
    for key, (drop, _) in stored.dropped(threshold).items():
        delta[key].view(-1)[torch.from_numpy(drop)] = 0
        kept[key] -= drop.size
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
        for _, omega in _conflict_chunks(pool, key, gradients, workspace):
            select.observe(omega)
    select.next_pass()
    if delta is None:
        for key in progress(pool.merged_keys, "trust region: threshold"):
            for _, omega in _conflict_chunks(pool, key, gradients, workspace):
                select.observe(omega)
        return select.value, {}
    kept: dict[str, int] = {}
    undecided: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    revisit: list[str] = []
    budget = max(total // 64, 1 << 20)
    for key in progress(pool.merged_keys, "trust region: merge"):
        flat = delta[key].view(-1)
        kept[key] = 0
        for part, omega in _conflict_chunks(pool, key, gradients, workspace, flat):
            buckets = select.observe(omega)
            flat[part].masked_fill_(buckets > select.bucket, 0)
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
        for part, omega in _conflict_chunks(pool, key, gradients, workspace, flat):
            keep = trust_region_mask(omega, threshold)
            flat[part].masked_fill_(~keep, 0)
            kept[key] += int(keep.sum())
    for key, parts in undecided.items():
        for index, omega in parts:
            keep = trust_region_mask(omega, threshold)
            delta[key].view(-1)[index[~keep]] = 0
            kept[key] += int(keep.sum())
    return threshold, kept
