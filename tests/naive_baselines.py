"""Slow, literal transcriptions of DARE and the compositions with TIES (REFERENCE.md §5),
beside tests/naive.py's rules. Nothing here imports mergelab."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import naive
import torch

StateDict = dict[str, torch.Tensor]


def ties_merged(
    pretrained: StateDict, finetuned: Mapping[str, StateDict], share: float, mean: bool
) -> StateDict:
    """TIES's δ, coordinate by coordinate: the disjoint sum (the TALL code's "dis-sum") or
    the disjoint mean (the TIES paper's "dis-mean": the sum over the count that agree)."""
    total = naive.ties_multitask_vector(pretrained, finetuned, share)
    if not mean:
        return total
    taus = naive.task_vectors(pretrained, finetuned)
    thresholds = {t: naive.ties_threshold(taus[t], share) for t in taus}
    result = {}
    for key, summed in total.items():
        counts = []
        flat = summed.reshape(-1).tolist()
        for i, value in enumerate(flat):
            entries = [
                taus[t][key].reshape(-1)[i].item()
                for t in taus
                if abs(taus[t][key].reshape(-1)[i].item()) >= thresholds[t]
            ]
            agreeing = [v for v in entries if v != 0 and (v > 0) == (value > 0)]
            counts.append(max(1, len(agreeing)) if value != 0 else 1)
        count = torch.tensor(counts, dtype=summed.dtype).reshape(summed.shape)
        result[key] = summed / count
    return result


def dare_seed(seed: int, task: str, key: str) -> int:
    """The documented key of a task's drop mask of one parameter: the first 4 bytes of
    SHA-256 of "seed NUL task NUL key", little-endian."""
    digest = hashlib.sha256(f"{seed}\0{task}\0{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def dropped_task_vectors(pretrained, finetuned, p, seed) -> dict[str, StateDict]:
    """τt ⊙ mt / (1 − p), computed directly (not as a difference of models)."""
    taus = naive.task_vectors(pretrained, finetuned)
    out = {}
    for task, tau in taus.items():
        out[task] = {}
        for key, value in tau.items():
            draws = hashed_draws(dare_seed(seed, task, key), value.numel())
            keep = torch.tensor([d / 2**24 >= p for d in draws]).reshape(value.shape)
            out[task][key] = torch.where(keep, value / (1 - p), 0.0)
    return out


def hashed_draws(key: int, n: int, start: int = 0) -> list[int]:
    """lowbias32(lowbias32(key ^ (i >> 32)) ^ (i mod 2^32)) >> 8 for i in start..start+n-1,
    with lowbias32 as Chris Wellons published it (Hash Prospector), in Python integers."""
    mask = (1 << 32) - 1

    def lowbias32(h: int) -> int:
        h ^= h >> 16
        h = (h * 0x7FEB352D) & mask
        h ^= h >> 15
        h = (h * 0x846CA68B) & mask
        return h ^ (h >> 16)

    return [
        lowbias32(lowbias32(key ^ (i >> 32)) ^ (i & mask)) >> 8 for i in range(start, start + n)
    ]


def masked_models(pretrained, finetuned, q, gradients=None) -> dict[str, StateDict]:
    """θ0 + τt ⊙ 1{Ω < threshold}: TATR's trust region applied to each task's model."""
    mask = naive.trust_region_parts(pretrained, finetuned, q, gradients)[1]
    taus = naive.task_vectors(pretrained, finetuned)
    return {
        task: dict(pretrained)
        | {key: pretrained[key] + torch.where(mask[key], tau[key], 0.0) for key in tau}
        for task, tau in taus.items()
    }
