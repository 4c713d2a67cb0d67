"""Isotropic merging (Marczak et al., ICML 2025, arXiv 2502.04959), for one 2-D parameter,
as the authors' ``iso_c`` and ``iso_cts`` (github danielm1405/iso-merging, src/utils/iso.py).

Iso-C: U S Vᵀ = SVD(Σt τt); merged = U · mean(S) · Vᵀ, a flat spectrum.

Iso-CTS: r = min(m, n); a common subspace of k = r − T·round((r − ⌊f·r⌋)/T) directions
(Python's round, as the authors'), the top-k of Σt τt; each task's residual
τt − Uc Ucᵀ τt gives its top (r − k)/T directions; tasks' and common components
concatenated (tasks first, as there), U and Vᵀ orthogonalised as in TSV-M, and every
singular value set to the mean of the r combined ones. Negligible components keep their
(zero) place in the mean but no direction (:mod:`mergelab.merging.spectral`); FusionBench
0.2.33 follows the same steps but takes the SVD in the pool's dtype, failing on fp16/bf16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.errors import BadValue
from mergelab.merging.spectral import checked_svd, recombined, significant, task_name
from mergelab.merging.task_arithmetic import ordered_sum


def check_common_fraction(fraction: float) -> None:
    """Iso-CTS's common share f of each matrix's rank: a number in [0, 1] (0.8 in the
    paper)."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise BadValue(f"common_subspace must be a number in [0, 1], got {fraction!r}")
    if not 0 <= fraction <= 1:
        raise BadValue(f"common_subspace must be in [0, 1], got {fraction}")


def common_space_size(
    shape: tuple[int, ...], num_tasks: int, fraction: float, label: str = "matrix"
) -> tuple[int, int]:
    """(k, directions per task) for a matrix of ``shape``, as the authors round them."""
    rank = min(shape)
    common = int(rank * fraction)
    per_task = round((rank - common) / num_tasks)
    common = rank - per_task * num_tasks
    if common < 0:
        raise BadValue(
            f"parameter {label!r}, shape {shape}: common_subspace {fraction} leaves "
            f"{rank - int(rank * fraction)} task-specific directions, which round to "
            f"{per_task} for each of {num_tasks} tasks, more than its rank {rank}; "
            "use a larger common_subspace"
        )
    return common, per_task


def iso_c_merge(
    task_vectors: torch.Tensor, label: str = "matrix", tasks: Sequence[str] | None = None
) -> torch.Tensor:
    """Iso-C of τ [T, m, n] → [m, n]."""
    total = ordered_sum(task_vectors)
    u, s, vh = checked_svd(total, label)
    keep = significant(s, total)
    return (u[:, keep] * s.mean()) @ vh[keep]


def iso_cts_merge(
    task_vectors: torch.Tensor,
    label: str = "matrix",
    tasks: Sequence[str] | None = None,
    common_fraction: float = 0.8,
) -> torch.Tensor:
    """Iso-CTS of τ [T, m, n] → [m, n] with a common share ``common_fraction``."""
    common, per_task = common_space_size(
        tuple(task_vectors.shape[1:]), task_vectors.shape[0], common_fraction, label
    )
    total = ordered_sum(task_vectors)
    u, s, vh = checked_svd(total, label)
    common_u = u[:, :common]
    # each task's directions are copied out of its SVD as they are found (a boolean
    # index copies), so that one task's full factors are held at a time, not T
    us, ss, vhs = [], [], []
    for index, tau in enumerate(task_vectors):
        if per_task == 0:
            break
        residual = tau - common_u @ (common_u.T @ tau)
        u_t, s_t, vh_t = checked_svd(residual, label, task_name(tasks, index))
        keep = significant(s_t[:per_task], tau)
        us.append(u_t[:, :per_task][:, keep])
        ss.append(s_t[:per_task])
        vhs.append(vh_t[:per_task][keep])
    keep = significant(s[:common], total)
    us.append(common_u[:, keep])
    ss.append(s[:common])
    vhs.append(vh[:common][keep])
    directions = torch.cat(us, 1)
    flat = torch.cat(ss).mean().expand(directions.shape[1])
    return recombined(directions, flat, torch.cat(vhs, 0), label)
