"""Merge methods over whole models: the streaming orchestration around ``mergelab.merging``.

Every single-model method yields a merged task vector δ, parameter by parameter, and
:func:`build_models` turns it into θ0 + λ·δ for each scaling factor λ (Task Arithmetic:
δ = Σ τt; trust region: δ = mask ⊙ Σ τt; consensus: δ = mcons ⊙ τMTL). Each model is
built from the untouched θ0, so a list of factors gives independent models.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergelab.io.checkpoints import (
    SafetensorsWriter,
    check_writable,
    open_checkpoint,
    tensor_spec,
)
from mergelab.merging.quantile import RadixSelect, quantile_rank
from mergelab.merging.task_arithmetic import apply_task_vector, task_vector_sum
from mergelab.merging.trust_region import conflict, trust_region_mask
from mergelab.pool import CheckpointSource, ModelPool

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


def _progress(items: Sequence, desc: str) -> Iterable:
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


def build_models(
    pretrained: Mapping[str, torch.Tensor],
    merged_keys: Iterable[str],
    delta_of: Callable[[str], torch.Tensor],
    scaling_factors: Sequence[float],
    outputs: Sequence[Path | None],
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
    desc: str = "merge",
) -> list[StateDict | Path]:
    """θ0 + λ·δ for each λ, streamed key by key into memory or into safetensors files.

    ``delta_of(key)`` gives the merged task vector δ of a key in ``merged_keys``, which is
    computed once for all λ; the other keys of θ0 are copied.
    """
    merged = frozenset(merged_keys)
    specs = {key: tensor_spec(pretrained, key) for key in pretrained}
    sinks: list = []
    try:
        for path in outputs:
            sinks.append(
                {} if path is None else SafetensorsWriter(path, specs, metadata, overwrite)
            )
        for key in _progress(list(specs), desc):
            theta0 = pretrained[key].detach()
            if key in merged:
                delta = delta_of(key)
                for sink, factor in zip(sinks, scaling_factors, strict=True):
                    sink[key] = apply_task_vector(theta0, delta, factor)
            else:
                for sink in sinks:
                    sink[key] = theta0.clone()
        results = [sink if isinstance(sink, dict) else sink.close() for sink in sinks]
    except BaseException:
        for sink in sinks:
            if isinstance(sink, SafetensorsWriter):
                sink.abort()
        raise
    return results


def single_or_list(results: list, scaling_factor) -> StateDict | list:
    return results[0] if is_single(scaling_factor) else results


# --- Task Arithmetic -------------------------------------------------------------------


def task_arithmetic_delta(pool: ModelPool, key: str) -> torch.Tensor:
    """δ = Σt τt of one merged parameter."""
    return task_vector_sum(pool.task_vectors(key, pool.pretrained_tensor(key)))


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
    delta_of = functools.partial(task_arithmetic_delta, pool)
    results = build_models(
        pool.pretrained,
        pool.merged_keys,
        delta_of,
        factors,
        outputs,
        overwrite,
        desc="task arithmetic",
    )
    return single_or_list(results, scaling_factor)


# --- Trust region ----------------------------------------------------------------------


@dataclass
class TrustRegionVector:
    """The masked task-vector sum mask ⊙ Σ τt and what the mask kept."""

    delta: StateDict
    threshold: float
    kept: dict[str, int] = field(default_factory=dict)

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


def _conflict_and_sum(pool: ModelPool, key: str, gradients) -> tuple[torch.Tensor, torch.Tensor]:
    """Ω (in float32, where the threshold is selected and compared) and Σ τt of one parameter."""
    pretrained = pool.pretrained_tensor(key)
    tau_sum = torch.zeros_like(pretrained)

    def pairs():
        for task, tau in zip(pool.tasks, pool.task_vectors(key, pretrained), strict=True):
            tau_sum.add_(tau)
            if gradients is None:
                yield tau.abs(), tau
                continue
            grad = gradients[task][key].detach().to(tau.dtype)
            if not torch.isfinite(grad).all():
                raise ValueError(f"gradient statistics of {task!r} have NaN or Inf at {key!r}")
            yield grad, tau

    omega = conflict(pairs()).to(torch.float32)
    return omega, tau_sum


def trust_region_vector(
    pool: ModelPool,
    threshold_quantile: float = 0.99,
    gradient_stats: Mapping[str, CheckpointSource] | None = None,
) -> TrustRegionVector:
    """The trust-region merged task vector, found in two streamed passes over the models.

    Ω (see :func:`mergelab.merging.trust_region.conflict`) is computed per parameter
    and never held for the whole model. Pass one counts Ω into a radix histogram; pass
    two pins the exact threshold, the ⌊q·n⌋-th smallest Ω (0-based) over all n merged
    coordinates, and builds δ. Coordinates with Ω strictly below the threshold are kept,
    so ties at the threshold are dropped; with distinct values exactly ⌊q·n⌋ are kept.
    q = 1 keeps everything (plain Task Arithmetic). Coordinates in the threshold's
    histogram bucket are settled after pass two from their stored Ω values; should they
    be unusually many, their parameters are recomputed instead.
    """
    if not 0 < threshold_quantile <= 1:
        raise ValueError(f"threshold_quantile must be in (0, 1], got {threshold_quantile}")
    pool.require_tasks(2, "trust-region merging")
    gradients = _gradient_checkpoints(pool, gradient_stats)
    total = pool.num_merged_params
    rank = quantile_rank(threshold_quantile, total)
    if rank >= total:
        delta = {key: task_arithmetic_delta(pool, key) for key in pool.merged_keys}
        return TrustRegionVector(delta, math.inf, {k: d.numel() for k, d in delta.items()})

    select = RadixSelect(rank, total)
    for key in _progress(pool.merged_keys, "trust region: conflicts"):
        select.observe(_conflict_and_sum(pool, key, gradients)[0])
    select.next_pass()

    delta: StateDict = {}
    kept: dict[str, int] = {}
    undecided: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    revisit: list[str] = []
    budget = max(total // 16, 1 << 20)  # stored coordinates of the threshold's bucket
    for key in _progress(pool.merged_keys, "trust region: merge"):
        omega, tau_sum = _conflict_and_sum(pool, key, gradients)
        buckets = select.observe(omega).reshape(omega.shape)
        delta[key] = tau_sum.masked_fill_(buckets > select.bucket, 0)
        kept[key] = int((buckets < select.bucket).sum())
        index = (buckets.reshape(-1) == select.bucket).nonzero().squeeze(1)
        if index.numel() and budget >= index.numel():
            budget -= index.numel()
            undecided[key] = (index, omega.reshape(-1)[index])
        elif index.numel():
            revisit.append(key)
    threshold = select.value

    for key, (index, omega) in undecided.items():
        keep = trust_region_mask(omega, threshold)
        delta[key].view(-1)[index[~keep]] = 0
        kept[key] += int(keep.sum())
    for key in revisit:
        omega, tau_sum = _conflict_and_sum(pool, key, gradients)
        keep = trust_region_mask(omega, threshold)
        delta[key] = tau_sum.masked_fill_(~keep, 0)
        kept[key] = int(keep.sum())
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
        pool.pretrained, pool.merged_keys, merged.delta.__getitem__, factors, outputs, overwrite
    )
    return single_or_list(results, scaling_factor)
