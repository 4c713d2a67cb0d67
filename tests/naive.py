"""Slow, literal transcriptions of the merge rules of REFERENCE.md §1, to compare against.

Nothing here imports mergelab: every rule is written from its formula, over whole state
dicts, in the most direct way (TATR's Ω as the double sum over i and j ≠ i, quantiles by
sorting the concatenation of every parameter, TALL masks from the θ's, TIES coordinate
by coordinate). State dicts are ``{key: tensor}``; models of tasks are ``{task: state
dict}``. Only floating-point keys of θ0 are merged; the others are copied from θ0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import torch

StateDict = dict[str, torch.Tensor]


def merged_keys(pretrained: Mapping[str, torch.Tensor]) -> list[str]:
    return [key for key, value in pretrained.items() if value.is_floating_point()]


def task_vectors(pretrained: StateDict, finetuned: Mapping[str, StateDict]) -> dict[str, StateDict]:
    """τt = θt − θ0 for every task and merged key."""
    return {
        task: {key: model[key] - pretrained[key] for key in merged_keys(pretrained)}
        for task, model in finetuned.items()
    }


def assemble(pretrained: StateDict, delta: StateDict, scaling: float) -> StateDict:
    """θ0 + scaling·δ on the merged keys; every other key copied from θ0."""
    return {
        key: pretrained[key] + scaling * delta[key] if key in delta else pretrained[key].clone()
        for key in pretrained
    }


def _total(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total = total + tensor
    return total


def quantile_rank(q: float, n: int) -> int:
    """r = ⌊q·n⌋ with q read as the decimal it is written as."""
    return math.floor(Fraction(repr(float(q))) * n)


def flatten(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([value.reshape(-1) for value in state.values()])


# --- Task Arithmetic ---------------------------------------------------------------------


def multitask_vector(pretrained: StateDict, finetuned: Mapping[str, StateDict]) -> StateDict:
    """τMTL = Σt τt, unscaled."""
    taus = task_vectors(pretrained, finetuned)
    return {key: _total([taus[t][key] for t in taus]) for key in merged_keys(pretrained)}


def task_arithmetic(pretrained: StateDict, finetuned: Mapping[str, StateDict], lam: float):
    """θ = θ0 + λ Σt τt."""
    return assemble(pretrained, multitask_vector(pretrained, finetuned), lam)


# --- Trust region (TATR) -----------------------------------------------------------------


def conflict(
    gradients: Mapping[str, StateDict], taus: Mapping[str, StateDict], keys: Sequence[str]
) -> StateDict:
    """Ω = Σi Σj≠i ḡi ⊙ |τj|, the literal double loop."""
    omega = {}
    for key in keys:
        total = torch.zeros_like(taus[next(iter(taus))][key])
        for i in taus:
            for j in taus:
                if j != i:
                    total = total + gradients[i][key] * taus[j][key].abs()
        omega[key] = total
    return omega


def trust_region_threshold(omega: StateDict, q: float) -> float:
    """The r-th smallest (0-based) Ω over the whole model, r = ⌊q·n⌋; +inf when r = n."""
    values = torch.sort(flatten(omega)).values
    rank = quantile_rank(q, values.numel())
    return math.inf if rank == values.numel() else values[rank].item()


def trust_region_parts(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    q: float,
    gradients: Mapping[str, StateDict] | None = None,
):
    """(δ = Σi τi ⊙ mask, mask, threshold, Ω); ḡi = |τi| without gradient statistics."""
    taus = task_vectors(pretrained, finetuned)
    keys = merged_keys(pretrained)
    if gradients is None:
        gradients = {t: {key: taus[t][key].abs() for key in keys} for t in taus}
    omega = conflict(gradients, taus, keys)
    threshold = trust_region_threshold(omega, q)
    mask = {key: omega[key] < threshold for key in keys}
    delta = {key: _total([torch.where(mask[key], taus[t][key], 0.0) for t in taus]) for key in keys}
    return delta, mask, threshold, omega


def trust_region(pretrained, finetuned, lam, q, gradients=None) -> StateDict:
    """θ = θ0 + λ Σi (τi ⊙ 1{Ω < threshold})."""
    delta = trust_region_parts(pretrained, finetuned, q, gradients)[0]
    return assemble(pretrained, delta, lam)


# --- TIES τMTL ---------------------------------------------------------------------------


def ties_threshold(tau: StateDict, share: float) -> float:
    """Smallest kept |τ| when keeping the top ⌊share·n⌋ of n, as in the TIES code."""
    magnitudes = torch.sort(flatten(tau).abs()).values
    n = magnitudes.numel()
    kept = quantile_rank(share, n)
    return -math.inf if kept == n else magnitudes[n - kept - 1].item()


def ties_multitask_vector(
    pretrained: StateDict, finetuned: Mapping[str, StateDict], share: float
) -> StateDict:
    """Trim each τt to |τ| ≥ its threshold, elect signs (the majority sign where the sum is
    exactly 0), sum the agreeing entries: the TIES reference code's resolve_sign and
    disjoint_merge ("dis-sum")."""
    taus = task_vectors(pretrained, finetuned)
    thresholds = {t: ties_threshold(taus[t], share) for t in taus}
    trimmed = {}  # key -> one list of trimmed entries per coordinate
    for key in merged_keys(pretrained):
        rows = {}
        for t in taus:
            flat = taus[t][key].reshape(-1).tolist()
            rows[t] = [v if abs(v) >= thresholds[t] else 0.0 for v in flat]
        trimmed[key] = [[rows[t][i] for t in taus] for i in range(len(rows[t]))]
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    majority = sign(sum(sign(sum(entries)) for key in trimmed for entries in trimmed[key]))
    result = {}
    for key, coordinates in trimmed.items():
        out = []
        for entries in coordinates:
            elected = sign(sum(entries)) or majority
            agreeing = [v for v in entries if (v > 0 if elected > 0 else v < 0)]
            out.append(sum(agreeing))
        shape, dtype = pretrained[key].shape, pretrained[key].dtype
        result[key] = torch.tensor(out, dtype=torch.float64).to(dtype).reshape(shape)
    return result


# --- TALL masks and consensus ------------------------------------------------------------


def tall_masks(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    lambdas: Sequence[float],
    mtl: StateDict | None = None,
) -> dict[str, dict[float, dict[str, torch.Tensor]]]:
    """masks[task][λ][key] = |θ0 − θt| > λ·|θmt − θt|, θmt = θ0 + τMTL, from the θ's."""
    if mtl is None:
        mtl = multitask_vector(pretrained, finetuned)
    keys = merged_keys(pretrained)
    theta_mt = {key: pretrained[key] + mtl[key] for key in keys}
    return {
        task: {
            lam: {
                key: (pretrained[key] - model[key]).abs() > lam * (theta_mt[key] - model[key]).abs()
                for key in keys
            }
            for lam in lambdas
        }
        for task, model in finetuned.items()
    }


def retrieve(pretrained: StateDict, mtl: StateDict, mask: StateDict) -> StateDict:
    """θ̂t = θ0 + mt ⊙ τMTL."""
    return assemble(pretrained, {k: torch.where(mask[k], mtl[k], 0.0) for k in mtl}, 1.0)


def consensus(
    pretrained: StateDict, mtl: StateDict, masks: Mapping[str, StateDict], k: int, alpha: float
) -> StateDict:
    """θ0 + α·(1{Σt mt ≥ k} ⊙ τMTL), ``masks`` = {task: {key: mask}}."""
    delta = {}
    for key in mtl:
        votes = torch.zeros(mtl[key].shape, dtype=torch.int64)
        for task_masks in masks.values():
            votes = votes + task_masks[key].to(torch.int64)
        delta[key] = torch.where(votes >= k, mtl[key], 0.0)
    return assemble(pretrained, delta, alpha)


def choose_lambdas(
    scores: Mapping[str, Mapping[float, float]], lambdas: Sequence[float]
) -> dict[str, float]:
    """Per task, the λ of the best score; the first of the grid among equal best scores
    (the TALL reference code's strict ``>`` scan over its grid, find_optimal_mask)."""
    chosen = {}
    for task, by_lambda in scores.items():
        best = None
        for lam in lambdas:
            if best is None or by_lambda[lam] > by_lambda[best]:
                best = lam
        chosen[task] = best
    return chosen
