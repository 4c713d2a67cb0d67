"""Task Singular Vectors, TSV-M (Gargiulo et al., CVPR 2025), for one 2-D parameter.

Per task, the top r = ⌊min(m, n)/T⌋ singular components of τt; the T blocks concatenated
into U [m, T·r], S [T·r], Vᵀ [T·r, n]; U and Vᵀ replaced by their polar factors; merged =
U⊥ · diag(S) · V⊥ᵀ. As the authors' ``get_tsv_merge`` / ``compute_and_sum_svd_mem_reduction``
(github AntoAndGar/task_singular_vectors, src/utils/TSVM_utils.py), whose zero padding of
the concatenation to min(m, n) columns changes nothing: padded columns meet a zero
singular value. A matrix with min(m, n) < T keeps no component and merges to zero, as
there. Negligible components are left out (:mod:`mergelab.merging.spectral`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.merging.spectral import checked_svd, recombined, significant, task_name


def tsv_rank(shape: tuple[int, ...], num_tasks: int) -> int:
    """Components kept per task: ⌊min(m, n)/T⌋ (``R // N_tasks`` in the authors' code)."""
    return min(shape) // num_tasks


def tsv_merge(
    task_vectors: torch.Tensor, label: str = "matrix", tasks: Sequence[str] | None = None
) -> torch.Tensor:
    """TSV-M of τ [T, m, n] → [m, n]."""
    rank = tsv_rank(tuple(task_vectors.shape[1:]), task_vectors.shape[0])
    us, ss, vhs = [], [], []
    for index, tau in enumerate(task_vectors):
        if rank == 0:
            break
        u, s, vh = checked_svd(tau, label, task_name(tasks, index))
        keep = significant(s[:rank], tau)
        us.append(u[:, :rank][:, keep])
        ss.append(s[:rank][keep])
        vhs.append(vh[:rank][keep])
    if not ss:
        return task_vectors.new_zeros(task_vectors.shape[1:])
    return recombined(torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0), label)
