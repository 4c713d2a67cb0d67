"""Trust-region merging (TATR) over whole models: θ = θ0 + λ Σi τi ⊙ 1{Ω < threshold}."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mergelab.engine.conflict_selection import (
    conflict_block,
    conflict_floor,
    one_pass_trust_region,
    two_pass_trust_region,
)
from mergelab.engine.model_files import open_checkpoint
from mergelab.engine.pool import CheckpointSource, ModelPool
from mergelab.engine.streaming import StateDict, scaled_models
from mergelab.engine.task_arithmetic import task_arithmetic_vector
from mergelab.engine.workspace import BlockWorkers, Workspace, empty
from mergelab.errors import BadValue
from mergelab.merging.quantile import quantile_rank
from mergelab.merging.trust_region import trust_region_mask

log = logging.getLogger(__name__)


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


def check_threshold_quantile(threshold_quantile: float) -> None:
    if not 0 < threshold_quantile <= 1:
        raise BadValue(f"threshold_quantile must be in (0, 1], got {threshold_quantile}")


def gradient_checkpoints(pool: ModelPool, gradient_stats) -> dict[str, Mapping] | None:
    """Each task's gradient statistics opened and checked against the pool (None: zero-shot)."""
    if gradient_stats is None:
        return None
    stats = {task: open_checkpoint(src) for task, src in gradient_stats.items()}
    pool.check_companions(stats, "gradient statistics")
    return stats


def trust_region_vector(
    pool: ModelPool,
    threshold_quantile: float = 0.99,
    gradient_stats: Mapping[str, CheckpointSource] | None = None,
) -> TrustRegionVector:
    """The trust-region merged task vector, streamed block by block over the models.

    Ω (see :mod:`mergelab.merging.trust_region`) is never held for the whole model. The
    threshold is the ⌊q·n⌋-th smallest Ω (0-based) over all n merged coordinates,
    compared in float32, found exactly without a sort: a sample of the blocks (1/16, at
    most about 2^23 values) places a floor well below it; one pass then builds δ = Σ τ
    and stores only the coordinates with Ω above the floor (about 4(1 − q) of them),
    among which the threshold is selected and the dropped coordinates zeroed. Should
    the floor turn out too high, or too many coordinates lie above it, a two-pass radix
    select over the models takes over. Kept means Ω strictly below the threshold, so
    ties at the threshold are dropped; with distinct values exactly ⌊q·n⌋ are kept.
    q = 1 keeps everything (plain Task Arithmetic).
    """
    check_threshold_quantile(threshold_quantile)
    pool.require_tasks(2, "trust-region merging")
    gradients = gradient_checkpoints(pool, gradient_stats)
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
        floor = conflict_floor(pool, gradients, threshold_quantile, workers)
        found = one_pass_trust_region(pool, gradients, rank, floor, delta, workers)
    if found is None:
        log.info("trust region: the sampled floor missed; selecting in two passes")
        found = two_pass_trust_region(pool, gradients, rank, delta, Workspace())
    threshold, kept = found
    result = TrustRegionVector(delta, threshold, kept)
    log.info(
        "trust region: threshold %.6g at quantile %g, %.4f%% of coordinates kept",
        threshold,
        threshold_quantile,
        100 * result.kept_fraction,
    )
    return result


def trust_region_parameter(
    pool: ModelPool, key: str, gradients: Mapping | None, threshold: float, workers: BlockWorkers
) -> torch.Tensor:
    """δ = Σ τt ⊙ 1{Ω < threshold} of one merged parameter (a new tensor), block by block."""
    delta = empty((pool.specs[key].numel,), pool.compute_dtype(key))
    # a finite threshold was selected over every block, each checked finite then
    checked = math.isfinite(threshold)

    def merge_block(part: slice) -> None:
        block = delta[part].numpy()
        workspace = workers.workspace()
        omega = conflict_block(pool, key, gradients, part, workspace, block, checked)[0]
        block[~trust_region_mask(omega, threshold).numpy()] = 0  # numpy: no torch threads

    workers.run(merge_block, pool.blocks(key))
    return delta.view(pool.specs[key].shape)


class TrustRegionMask:
    """The transform τi ↦ τi ⊙ 1{Ω < threshold} of one whole parameter: TATR's mask applied
    to every task vector before another rule merges them (TATR + TIES). Ω is computed on
    the CPU as the block path computes it, so the mask is the one TATR's threshold was
    selected over."""

    def __init__(self, pool: ModelPool, threshold: float, gradients: Mapping | None = None):
        self.pool = pool
        self.threshold = threshold
        self.gradients = gradients
        self._workspace = Workspace()

    def __call__(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        spec = self.pool.specs[key]
        whole = slice(0, spec.numel)
        omega = conflict_block(self.pool, key, self.gradients, whole, self._workspace)[0]
        keep = trust_region_mask(omega, self.threshold).view(spec.shape)
        return task_vectors * keep.to(task_vectors.device, task_vectors.dtype)


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

    def merged_vector() -> StateDict:
        return trust_region_vector(pool, threshold_quantile, gradient_stats).delta

    return scaled_models(
        pool,
        merged_vector,
        scaling_factor,
        output,
        overwrite,
        desc="trust region: models",
    )
