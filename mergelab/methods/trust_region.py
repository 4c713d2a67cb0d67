"""Trust-region merging, TATR ("Task Arithmetic in Trust Region", openreview q3ztjJRQuJ):
θ = θ0 + λ Σi τi ⊙ 1{Ω < threshold}, the most conflicting coordinates dropped; or the
masked task vectors TIES-merged (TATR + TIES)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from mergelab.engine.parameterwise import TaskVectors
from mergelab.engine.pool import ModelPool
from mergelab.engine.streaming import StateDict, as_factor_list
from mergelab.engine.ties import ties_merged_vector
from mergelab.engine.trust_region import (
    TrustRegionMask,
    check_threshold_quantile,
    gradient_checkpoints,
    trust_region_vector,
)
from mergelab.engine.trust_region_streamed import StreamedTrustRegion
from mergelab.errors import MissingFile
from mergelab.io.gradient_statistics import load_task_statistics
from mergelab.merging.ties import check_keep_fraction
from mergelab.methods.base import MergeContext, ScaledMethod, save_task_vector

log = logging.getLogger(__name__)


class TrustRegion(ScaledMethod):
    """TATR: θ = θ0 + λ Σi τi ⊙ 1{Ω < threshold}; zero-shot (Ω from |τ|) without statistics.

    Args:
        scaling_factor: λ; a list scores every value and picks on validation when the data
            module's test_splits has ``val``.
        threshold_quantile: the quantile q of the conflict Ω; the top 1 − q is dropped. A
            list scores every q (with every λ) and picks on validation.
        gradient_stats: the folder of per-task gradient statistics that ``mergelab fit`` with
            mergelab.lightning.gradient_stats.GradientStatistics wrote (checked against the
            pretrained model); null for zero-shot TATR (conflicts from |τ|, no data). Under
            that fit, TATR is built with the statistics just computed when fit ends.
        ties: null sums the masked task vectors; a share TIES-merges them instead, each
            keeping that share of its largest magnitudes (the TATR paper's "TATR + TIES",
            with 0.2).
    """

    min_tasks = 2

    def __init__(
        self,
        scaling_factor: float | list[float] = 0.3,
        threshold_quantile: float | list[float] = 0.99,
        gradient_stats: str | None = None,
        ties: float | None = None,
    ):
        quantiles = as_factor_list(threshold_quantile, "threshold_quantile")
        for quantile in quantiles:
            check_threshold_quantile(quantile)
            if quantile == 1:
                log.warning("TATR threshold_quantile=1 drops no coordinate: Task Arithmetic")
        if gradient_stats is not None and not Path(gradient_stats).is_dir():
            raise MissingFile(
                f"gradient_stats: no folder {gradient_stats} (mergelab fit with "
                "GradientStatistics writes it)"
            )
        if ties is not None:
            check_keep_fraction(ties)
        self.scaling_factor = as_factor_list(scaling_factor, "scaling_factor")
        self.threshold_quantile = threshold_quantile
        self.gradient_stats = gradient_stats
        self.quantiles = quantiles
        self.ties = ties

    def grid(self) -> list[dict]:
        if len(self.quantiles) == 1:
            return [{}]
        return [{"threshold_quantile": q} for q in self.quantiles]

    def merged_task_vector(
        self,
        pool: ModelPool,
        context: MergeContext,
        output: Path | None,
        threshold_quantile: float | None = None,
    ) -> StateDict:
        """δ = mask ⊙ Σ τt at quantile ``threshold_quantile`` (the only one given, by
        default), saved to ``output`` when given; the threshold and each parameter's mask
        density logged."""
        [quantile] = self.quantiles if threshold_quantile is None else [threshold_quantile]
        gradients: Mapping | None = None
        if self.gradient_stats is not None:
            gradients = load_task_statistics(self.gradient_stats, pool.tasks, pool.fingerprint())
        merged = trust_region_vector(pool, quantile, gradients)
        log.info("TATR at q=%g kept %.4f%% of coordinates", quantile, 100 * merged.kept_fraction)
        prefix = "trust_region" if len(self.quantiles) == 1 else f"trust_region/q={quantile!r}"
        metrics = {f"{prefix}/threshold": merged.threshold}
        metrics |= {f"{prefix}/density/{k}": v for k, v in merged.density().items()}
        context.log_metrics(metrics)
        delta = merged.delta
        if self.ties is not None:
            mask = TrustRegionMask(pool, merged.threshold, gradient_checkpoints(pool, gradients))
            delta = ties_merged_vector(TaskVectors(pool, context.device, [mask]), self.ties)
        settings = self.describe() | {"threshold_quantile": quantile, "threshold": merged.threshold}
        save_task_vector(delta, pool, output, settings)
        return delta

    @contextlib.contextmanager
    def parameter_deltas(
        self, pool: ModelPool, context: MergeContext, threshold_quantile: float | None = None
    ) -> Iterator[Callable[[str], torch.Tensor]]:
        """Without TIES, each parameter's δ as it is asked for, the threshold found as the
        model is written (:class:`StreamedTrustRegion`): memory flat in the model's size."""
        if self.ties is not None:
            with super().parameter_deltas(pool, context) as delta_of:
                yield delta_of
            return
        [quantile] = self.quantiles if threshold_quantile is None else [threshold_quantile]
        gradients = None
        if self.gradient_stats is not None:
            stats = load_task_statistics(self.gradient_stats, pool.tasks, pool.fingerprint())
            gradients = gradient_checkpoints(pool, stats)
        streamed = StreamedTrustRegion(pool, quantile, gradients)
        try:
            yield streamed
        finally:
            streamed.close()
        log.info("TATR at q=%g: threshold %.6g", quantile, streamed.threshold)
