"""Shared pieces of the SVD-based merges (Task Singular Vectors, isotropic merging), for
one parameter: which parameters take the SVD, the mean the others get, a checked SVD,
and the recombination of concatenated singular components through orthogonalised
singular vectors.

Singular components whose value is negligible (at most ``max(m, n)·eps·‖A‖_F`` of the
matrix A they come from, ``torch.linalg.matrix_rank``'s tolerance with the Frobenius norm
as the scale) carry no direction: their singular vectors are whatever the SVD routine
returned for a zero singular value, different on every LAPACK or cuSOLVER build. The
authors' code keeps them in the concatenation, where they change the orthogonalised
vectors of every other component. Here they are left out, which gives the authors'
result whenever no such component exists (every full-rank task vector) and one
well-defined result, the same on CPU and CUDA, when some do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.errors import BadValue
from mergelab.merging.finite import all_finite


def takes_svd(shape: tuple[int, ...]) -> bool:
    """The authors merge every 2-D parameter through its SVD (for a CLIP image encoder:
    attention and MLP weights, the output projection); biases, LayerNorms, the class and
    position embeddings and the 4-D patch convolution take the mean."""
    return len(shape) == 2


def mean_merge(task_vectors: torch.Tensor) -> torch.Tensor:
    """The mean of τ [T, *shape], as the authors' running mean: m ← m + (τt − m)/t."""
    mean = task_vectors[0].clone()
    for index, tau in enumerate(task_vectors[1:], start=2):
        mean += (tau - mean) / index
    return mean


def task_name(tasks: Sequence[str] | None, index: int) -> str:
    return tasks[index] if tasks is not None else f"#{index}"


def checked_svd(
    matrix: torch.Tensor, label: str, task: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vᵀ (thin) of ``matrix``; a failed or non-finite SVD names the parameter and
    the task it was computed for."""
    culprit = f"parameter {label!r}" + (f", task {task!r}" if task is not None else "")
    try:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError as error:
        error.add_note(f"while taking the SVD of {culprit}, shape {tuple(matrix.shape)}")
        raise
    if not (all_finite(u) and all_finite(s) and all_finite(vh)):
        raise BadValue(f"the SVD of {culprit} gives NaN or Inf values")
    return u, s, vh


def significant(singular_values: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Which components of an SVD of ``source`` carry a direction (see the module)."""
    tolerance = max(source.shape) * torch.finfo(source.dtype).eps * torch.linalg.norm(source)
    return singular_values > tolerance


def orthogonalised(matrix: torch.Tensor, label: str) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows, if wider than tall): U·Vᵀ
    from the SVD of ``matrix`` (the polar factor), as TSV-M and Iso-CTS decorrelate."""
    u, _, vh = checked_svd(matrix, f"{label} (orthogonalising)")
    return u @ vh


def recombined(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, label: str) -> torch.Tensor:
    """orth(U) · diag(S) · orth(Vᵀ) of concatenated components [m, k], [k], [k, n];
    zero components (k = 0) give a zero matrix."""
    if s.numel() == 0:
        return u.new_zeros(u.shape[0], vh.shape[1])
    return (orthogonalised(u, label) * s) @ orthogonalised(vh, label)
