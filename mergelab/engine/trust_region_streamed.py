"""TATR for a model written parameter by parameter (:class:`StreamedTrustRegion`, for
``mergelab merge``): its threshold found while the model is written."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from mergelab.engine.conflict_selection import (
    AboveFloor,
    conflict_block,
    conflict_floor,
    two_pass_trust_region,
)
from mergelab.engine.model_writing import Patch, ProvisionalDeltas, widened_theta0
from mergelab.engine.pool import ModelPool
from mergelab.engine.trust_region import check_threshold_quantile, trust_region_parameter
from mergelab.engine.workspace import BlockWorkers, Workspace, empty
from mergelab.merging.quantile import quantile_rank


class StreamedTrustRegion(ProvisionalDeltas):
    """δ = Σ τt ⊙ 1{Ω < threshold}, a parameter at a time, as
    :func:`~mergelab.engine.trust_region.trust_region_vector` computes it.

    A sample places a floor under the threshold (:func:`conflict_floor`); the first write
    is then the one pass: each parameter's δ = Σ τt, provisional, the coordinates with Ω
    at or above the floor stored with θ0 there (:class:`AboveFloor`). :meth:`settle`
    selects the threshold among them and sets the coordinates it drops to θ0, in place;
    where the threshold lies below the floor (or too many lay above it), two passes find
    it and the model is written again. Reads: the sample (1/16, at most about 2^23
    values) and one pass, or four. ``gradients``: as
    :func:`~mergelab.engine.trust_region.gradient_checkpoints` opens them (None:
    zero-shot)."""

    def __init__(self, pool: ModelPool, threshold_quantile: float, gradients: Mapping | None):
        check_threshold_quantile(threshold_quantile)
        pool.require_tasks(2, "trust-region merging")
        self.pool, self.gradients = pool, gradients
        self._workers = BlockWorkers()
        total = pool.num_merged_params
        self._rank = quantile_rank(threshold_quantile, total)
        self.threshold = math.inf  # everything kept where the rank is past the end
        self._stored: AboveFloor | None = None
        if self._rank < total:
            try:
                floor = conflict_floor(pool, gradients, threshold_quantile, self._workers)
            except BaseException:
                self.close()
                raise
            self._stored = AboveFloor(floor, total)

    def close(self) -> None:
        self._workers.close()

    def __call__(self, key: str) -> torch.Tensor:
        pool, stored = self.pool, self._stored
        if stored is None:
            workers = self._workers
            return trust_region_parameter(pool, key, self.gradients, self.threshold, workers)
        dtype = pool.compute_dtype(key)
        delta = empty((pool.specs[key].numel,), dtype)

        def merge_block(part: slice) -> tuple:
            workspace = self._workers.workspace()
            block = delta[part].numpy()
            omega, theta0 = conflict_block(pool, key, self.gradients, part, workspace, block)
            return stored.find(omega, part.start, theta0)

        stored.add(key, self._workers.run(merge_block, pool.blocks(key)))
        return delta.view(pool.specs[key].shape)

    def settle(self) -> dict[str, Patch] | None:
        """After every parameter's δ was asked for once: the coordinates the threshold
        drops (δ 0 there), or None where the model must be written again."""
        stored, self._stored = self._stored, None
        if stored is None:
            return {}
        threshold = stored.threshold(self._rank, self.pool.num_merged_params)
        if threshold is None:  # below the floor, or too many above it
            found = two_pass_trust_region(self.pool, self.gradients, self._rank, None, Workspace())
            self.threshold = found[0]
            return None
        self.threshold = threshold
        patches = {}
        for key, (positions, theta0) in stored.dropped(threshold).items():
            if positions.size:
                zeros = torch.zeros(positions.size, dtype=self.pool.compute_dtype(key))
                patches[key] = Patch(positions, torch.from_numpy(widened_theta0(theta0)), zeros)
        return patches
