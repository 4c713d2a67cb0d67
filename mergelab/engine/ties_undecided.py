"""What a TIES pass cannot merge at once, set aside and settled: the coordinates with an
entry inside its task's threshold range, and those waiting for the majority sign.

A pass that knows each task's threshold only to lie in [low, high) merges every other
coordinate and leaves these NaN (:func:`mergelab.merging.ties.ties_vector`'s
``undecided_from``). Of each such coordinate, only the entries at or above their task's
``low`` are held (:func:`hold`): an entry below it is dropped whatever the exact
threshold, and the rule gives the same bits with a 0 in its place (a dropped entry adds
nothing to any sum). With a keep share of 0.2, that is about a fifth of the T values.
Every magnitude of a task inside its range lies among the held entries, so they alone
pin the exact thresholds (:func:`in_ranges`); the held coordinates' votes complete the
majority sign, and they are merged last (:func:`settle`). Shared by the whole-parameter
passes (:mod:`mergelab.engine.ties`) and the block passes
(:mod:`mergelab.engine.ties_blocks`, :mod:`mergelab.engine.ties_streamed`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from mergelab.engine.workspace import BlockWorkers
from mergelab.merging.compiled import kernels
from mergelab.merging.ties import PENDING, TiesPart, ties_vector

# the entries set aside by a pass, at most this share of the elements of one model (6
# bytes each, with their task; beyond it, the thresholds are pinned by another counting
# pass). ViT-B/32, 20 tasks, a keep share of 0.2: 0.24 (4 % of the coordinates held)
UNDECIDED_BUDGET = 0.5
# held entries settled in one kernel call, at most about this many (an 8 MB copy of float32
# per thread: the runs' copies stay the size one thread's were)
RUN_ENTRIES = 1 << 21


class Held(NamedTuple):
    """Undecided coordinates of one parameter: their flat ``index``, how many entries each
    keeps (``counts``), and those entries, coordinate by coordinate in task order: their
    ``tasks`` and ``values``; and apart, the tasks and float32 magnitudes of the entries
    inside their task's band (``band_tasks``, ``band_magnitudes``), which pin the
    thresholds."""

    key: str
    index: torch.Tensor
    counts: torch.Tensor
    tasks: torch.Tensor
    values: torch.Tensor
    band_tasks: torch.Tensor
    band_magnitudes: torch.Tensor


def hold(
    key: str,
    task_vectors: np.ndarray,
    columns: np.ndarray,
    offset: int,
    lows: Sequence[float],
    highs: Sequence[float],
) -> Held:
    """The coordinates ``offset + columns`` of parameter ``key``, τ there taken from the
    C-contiguous ``task_vectors`` [T, n], each keeping its entries whose float32
    magnitude is at least their task's ``lows``; those below its ``highs`` too are its
    band's."""
    kernel = kernels("ties_kernels").held_entries
    limits = (np.asarray(values, dtype=np.float32) for values in (lows, highs))
    columns = np.asarray(columns, dtype=np.int64)
    arrays = kernel(task_vectors, columns, *limits)
    return Held(key, torch.from_numpy(columns + offset), *map(torch.from_numpy, arrays))


def merge_part(
    taus: torch.Tensor,
    thresholds: Sequence[float],
    undecided_from: Sequence[float],
    majority: int = PENDING,
    disjoint_mean: bool = False,
) -> TiesPart:
    """The TIES rule on τ [T, n]: the compiled kernel on the CPU, the torch rule elsewhere."""
    if taus.device.type != "cpu":
        return ties_vector(taus, thresholds, majority, disjoint_mean, undecided_from)
    taus = taus.contiguous()
    merged = torch.empty(taus.shape[1], dtype=taus.dtype)
    limits = (np.asarray(values, dtype=np.float32) for values in (thresholds, undecided_from))
    kernel = kernels("ties_kernels").ties_merge
    votes, ties = kernel(taus.numpy(), *limits, majority, disjoint_mean, merged.numpy())
    return TiesPart(merged, votes, ties)


def in_ranges(held: Sequence[Held], tasks: int) -> list[torch.Tensor]:
    """Per task, the float32 magnitudes of its held entries inside its band."""
    if not held:
        return [torch.empty(0) for _ in range(tasks)]
    owners = torch.cat([part.band_tasks for part in held]).numpy()
    magnitudes = torch.cat([part.band_magnitudes for part in held]).numpy()
    offsets, grouped = kernels("ties_kernels").group_by_task(owners, magnitudes, tasks)
    return list(torch.from_numpy(grouped).split(np.diff(offsets).tolist()))


def _merged_held(
    held: Sequence[Held],
    tasks: int,
    thresholds: Sequence[float],
    majority: int,
    disjoint_mean: bool,
) -> tuple[list[torch.Tensor], int]:
    """The rule at the exact thresholds over the held coordinates: each part's merged
    values, and their votes. One kernel call for each run of parts of a dtype, their
    arrays side by side (:func:`_runs`); the runs on BlockWorkers threads (ViT-B/32, 20
    tasks: 4 % of the coordinates held, 21 M entries)."""
    kernel = kernels("ties_kernels").ties_merge_held
    limits = np.asarray(thresholds, dtype=np.float32)
    runs = list(_runs(held))
    with BlockWorkers() as workers:

        def merge_run(numbers: list[int]) -> tuple[list[torch.Tensor], int]:
            workspace = workers.workspace()  # the runs' arrays side by side, reused
            arrays = []
            for name in ("counts", "tasks", "values"):
                parts = [getattr(held[number], name) for number in numbers]
                size = sum(part.numel() for part in parts)
                side_by_side = workspace.get(name, (size,), parts[0].dtype).numpy()
                arrays.append(np.concatenate([part.numpy() for part in parts], out=side_by_side))
            out = torch.empty(len(arrays[0]), dtype=held[numbers[0]].values.dtype)
            votes = kernel(*arrays, tasks, limits, majority, disjoint_mean, out.numpy())[0]
            return list(out.split([held[number].index.numel() for number in numbers])), votes

        results = workers.run(merge_run, runs)
    merged: list[torch.Tensor] = [torch.empty(0)] * len(held)
    for numbers, (pieces, _) in zip(runs, results, strict=True):
        for number, piece in zip(numbers, pieces, strict=True):
            merged[number] = piece
    return merged, sum(votes for _, votes in results)


def _runs(held: Sequence[Held]) -> Iterator[list[int]]:
    """The numbers of the parts, in runs of one dtype of about RUN_ENTRIES entries: their
    copies side by side stay small beside the held entries themselves."""
    for dtype in {part.values.dtype for part in held}:
        run, entries = [], 0
        for number, part in enumerate(held):
            if part.values.dtype == dtype:
                run.append(number)
                entries += part.values.numel()
            if entries >= RUN_ENTRIES:
                yield run
                run, entries = [], 0
        if run:
            yield run


def held_votes(held: Sequence[Held], tasks: int, thresholds: Sequence[float]) -> int:
    """The votes of the held coordinates at the exact thresholds (those still waiting for
    the majority sign vote 0)."""
    return _merged_held(held, tasks, thresholds, PENDING, False)[1]


def settled(
    held: Sequence[Held],
    tasks: int,
    thresholds: Sequence[float],
    votes: int,
    disjoint_mean: bool,
) -> tuple[int, list[torch.Tensor]]:
    """With the exact thresholds: the majority sign, elected by ``votes`` (those of every
    decided coordinate) and the held coordinates' votes, and each held part's merged
    values under it."""
    # the votes do not depend on the majority: one call gives them and every value but
    # those of the coordinates waiting for it (NaN), which are merged again
    merged, their_votes = _merged_held(held, tasks, thresholds, PENDING, disjoint_mean)
    votes += their_votes
    majority = (votes > 0) - (votes < 0)
    waiting = [
        (number, values.isnan().nonzero().reshape(-1)) for number, values in enumerate(merged)
    ]
    waiting = [(number, columns) for number, columns in waiting if columns.numel()]
    subsets = [_columns(held[number], columns) for number, columns in waiting]
    again, _ = _merged_held(subsets, tasks, thresholds, majority, disjoint_mean)
    for (number, columns), values in zip(waiting, again, strict=True):
        merged[number][columns] = values
    return majority, merged


def settle(
    delta: Mapping[str, torch.Tensor],
    held: Sequence[Held],
    tasks: int,
    thresholds: Sequence[float],
    votes: int,
    disjoint_mean: bool,
) -> int:
    """:func:`settled`, the held coordinates' values put into ``delta``; returns the
    majority sign."""
    majority, merged = settled(held, tasks, thresholds, votes, disjoint_mean)
    for part, values in zip(held, merged, strict=True):
        # numpy's scatter: torch's index_put costs 0.1 ms a call whatever its size
        delta[part.key].view(-1).numpy()[part.index.numpy()] = values.numpy()
    return majority


def _columns(part: Held, columns: torch.Tensor) -> Held:
    """The part's held coordinates at positions ``columns`` (ascending) alone, with their
    entries (not their band's)."""
    counts = part.counts.numpy().astype(np.int64)
    lengths = counts[columns.numpy()]
    # each chosen coordinate's entries: its first entry's position, then the next ones
    firsts = np.repeat(np.cumsum(counts)[columns.numpy()] - lengths, lengths)
    steps = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    entries = torch.from_numpy(firsts + steps)
    nothing = torch.empty(0)
    return Held(
        part.key,
        part.index[columns],
        part.counts[columns],
        part.tasks[entries],
        part.values[entries],
        nothing,
        nothing,
    )
