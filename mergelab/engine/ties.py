"""TIES over a whole model pool: each task's trimming threshold and the majority sign (the
per-parameter rule is in :mod:`mergelab.merging.ties`)."""

from __future__ import annotations

import math

from mergelab.engine.pool import ModelPool
from mergelab.engine.streaming import progress
from mergelab.engine.workspace import Workspace
from mergelab.merging.quantile import RadixSelect
from mergelab.merging.ties import sign_votes, ties_rank


def ties_thresholds(pool: ModelPool, keep_fraction: float) -> list[float]:
    """Each task's smallest kept magnitude when it keeps its top share over the whole model."""
    total = pool.num_merged_params
    rank = ties_rank(keep_fraction, total)
    if rank < 0:
        return [-math.inf] * len(pool.tasks)
    selects = [RadixSelect(rank, total) for _ in pool.tasks]
    workspace = Workspace()
    for desc in ("TIES: magnitudes", "TIES: thresholds"):
        for key in progress(pool.merged_keys, desc):
            for _, taus in pool.task_vector_chunks(key, workspace):
                pool.check_finite(key, taus, taus.sum(0))
                for select, tau in zip(selects, taus, strict=True):
                    select.observe(tau.abs())
        if selects[0].bucket is None:
            for select in selects:
                select.next_pass()
    return [select.value for select in selects]


def ties_majority(pool: ModelPool, thresholds: list[float]) -> int:
    """The sign of Σ over every merged coordinate of sign(Σt trimmed τt): the sign elected
    where a coordinate's trimmed sum is exactly 0 (one more pass over the models)."""
    votes = 0
    workspace = Workspace()
    for key in progress(pool.merged_keys, "TIES: majority sign"):
        for _, taus in pool.task_vector_chunks(key, workspace):
            votes += sign_votes(taus, thresholds)
    return (votes > 0) - (votes < 0)
