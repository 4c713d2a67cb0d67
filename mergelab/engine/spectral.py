"""Task Singular Vectors (TSV-M) and isotropic merging (Iso-C, Iso-CTS) over whole models:
each 2-D parameter merged from the SVDs of its task vectors, whole, on the chosen device;
every other parameter (biases, LayerNorms, the class embedding, the 4-D patch convolution)
by the mean of its task vectors, as the authors' code does
(:mod:`mergelab.merging.task_singular_vectors`, :mod:`mergelab.merging.isotropic`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import torch

from mergelab.engine.parameterwise import TaskVectors, merged_vector
from mergelab.engine.pool import CheckpointSource, ModelPool
from mergelab.engine.streaming import StateDict, scaled_models
from mergelab.merging.isotropic import check_common_fraction, iso_c_merge, iso_cts_merge
from mergelab.merging.spectral import mean_merge, takes_svd
from mergelab.merging.task_singular_vectors import tsv_merge

MatrixRule = Callable[..., torch.Tensor]


def spectral_vector(
    task_vectors: TaskVectors, matrix_rule: MatrixRule, desc: str, **settings
) -> StateDict:
    """δ with ``matrix_rule(τ [T, m, n], label=key, tasks=…, **settings)`` for each 2-D
    parameter and the mean of the task vectors for the others."""
    tasks = task_vectors.pool.tasks

    def rule(key: str, taus: torch.Tensor) -> torch.Tensor:
        if takes_svd(tuple(taus.shape[1:])):
            return matrix_rule(taus, label=key, tasks=tasks, **settings)
        return mean_merge(taus)

    return merged_vector(task_vectors, rule, desc)


def tsv_vector(pool: ModelPool, device: str | torch.device | None = None) -> StateDict:
    """TSV-M's merged task vector δ (θ = θ0 + α·δ)."""
    return spectral_vector(TaskVectors(pool, device), tsv_merge, "TSV-M")


def isotropic_vector(
    pool: ModelPool,
    common_subspace: float | None = None,
    device: str | torch.device | None = None,
) -> StateDict:
    """Iso-C's merged task vector δ, or Iso-CTS's with a common subspace of that share."""
    task_vectors = TaskVectors(pool, device)
    if common_subspace is None:
        return spectral_vector(task_vectors, iso_c_merge, "Iso-C")
    check_common_fraction(common_subspace)
    rule = functools.partial(iso_cts_merge, common_fraction=common_subspace)
    return spectral_vector(task_vectors, rule, "Iso-CTS")


def task_singular_vectors(
    pretrained: CheckpointSource,
    finetuned: Mapping[str, CheckpointSource],
    scaling_factor: float | Sequence[float] = 1.0,
    device: str | torch.device | None = None,
    output=None,
    overwrite: bool = False,
):
    """TSV-M: θ = θ0 + α·δ. A list of α gives a list of independent models; ``output`` as
    in task_arithmetic; ``device``: where the SVDs run (default: CUDA when present)."""
    pool = ModelPool(pretrained, finetuned)
    merged = functools.partial(tsv_vector, pool, device)
    return scaled_models(pool, merged, scaling_factor, output, overwrite, "TSV-M: models")


def isotropic(
    pretrained: CheckpointSource,
    finetuned: Mapping[str, CheckpointSource],
    scaling_factor: float | Sequence[float] = 1.0,
    common_subspace: float | None = None,
    device: str | torch.device | None = None,
    output=None,
    overwrite: bool = False,
):
    """Iso-C (``common_subspace`` None) or Iso-CTS: θ = θ0 + α·δ; as task_singular_vectors."""
    if common_subspace is not None:
        check_common_fraction(common_subspace)
    pool = ModelPool(pretrained, finetuned)
    merged = functools.partial(isotropic_vector, pool, common_subspace, device)
    return scaled_models(pool, merged, scaling_factor, output, overwrite, "isotropic: models")
