"""Slow, literal transcriptions of mergekit's linear, task_arithmetic, ties, dare_linear and
dare_ties (arcee-ai/mergekit: merge_methods/linear.py, merge_methods/
generalized_task_arithmetic.py, sparsify.py), to compare mergelab.merging.mergekit_rules
against. Nothing here imports mergelab.

Coordinate by coordinate in Python floats: the task vectors are rounded to float32 as
mergekit computes them (θt − θbase in the tensors' dtype), the weights too; products of
two float32 values are then exact in Python floats and the sums near exact. Top-k by
sorting a Python list. Each rule returns ``(merged, scale)``: the merged tensor (float64,
base's shape) and per coordinate the size of what went into it, |θbase| + |λ|·Σ|terms| /
|divisor|, the yardstick of a comparison's rounding tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Merge = tuple[torch.Tensor, torch.Tensor]
EPS32 = float(np.float32(1e-7))  # rescaled_masked_tensor's eps, compared in float32


def _flat(tensor: torch.Tensor) -> list[float]:
    return [float(v) for v in tensor.to(torch.float32).reshape(-1).tolist()]


def _f32(value: float) -> float:
    return float(np.float32(value))


def _shaped(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(like.shape)


def task_vectors(base: torch.Tensor, tensors: torch.Tensor) -> list[list[float]]:
    """δt = θt − θbase, each difference rounded to float32."""
    b = _flat(base)
    return [
        [float(np.float32(x) - np.float32(y)) for x, y in zip(_flat(model), b, strict=True)]
        for model in tensors
    ]


def top_k(delta: Sequence[float], density: float) -> set[int]:
    """Indices of the k = int(density·n) largest |δ|, by a (stable) sort of the list."""
    k = int(density * len(delta))
    if k == 0:
        raise ValueError("k = 0")
    order = sorted(range(len(delta)), key=lambda i: abs(delta[i]), reverse=True)
    return set(order[:k])


def is_top_k(delta: Sequence[float], kept: set[int], density: float) -> bool:
    """Whether ``kept`` is one of the k-sets of largest magnitudes (equal ones may swap)."""
    k = int(density * len(delta))
    dropped = [abs(delta[i]) for i in range(len(delta)) if i not in kept]
    smallest_kept = min((abs(delta[i]) for i in kept), default=float("inf"))
    return len(kept) == k and all(m <= smallest_kept for m in dropped)


def draw_kept(delta: Sequence[float], density: float, generator: torch.Generator) -> set[int]:
    """sparsify.bernoulli's draw, one per model: the draw is torch's own by definition."""
    p = torch.full((len(delta),), density, dtype=torch.float32)
    draws = torch.bernoulli(p, generator=generator).tolist()
    return {i for i, kept in enumerate(draws) if kept == 1.0}


def sparsified(delta: Sequence[float], kept: set[int], rescale: bool) -> list[float]:
    """δ on ``kept``, 0 elsewhere; times ‖δ‖₁/‖kept δ‖₁ when ``rescale`` (unless a norm
    is below 1e-7)."""
    out = [v if i in kept else 0.0 for i, v in enumerate(delta)]
    before = sum(abs(v) for v in delta)
    after = sum(abs(v) for v in out)
    if rescale and before >= EPS32 and after >= EPS32:
        out = [v * (before / after) for v in out]
    return out


def linear(tensors: torch.Tensor, weights: Sequence[float], normalize: bool) -> Merge:
    """Σt wt·θt, over Σt wt when normalizing (ZeroDivisionError when that is 0)."""
    w = [_f32(v) for v in weights]
    models = [_flat(model) for model in tensors]
    merged, scale = [], []
    for j in range(len(models[0])):
        terms = [w[t] * models[t][j] for t in range(len(models))]
        divisor = sum(w) if normalize else 1.0
        merged.append(sum(terms) / divisor)
        scale.append(sum(abs(v) for v in terms) / abs(divisor))
    return _shaped(merged, tensors[0]), _shaped(scale, tensors[0])


def _mix(
    base: torch.Tensor,
    deltas: list[list[float]],
    weights: Sequence[float],
    consensus: str | None,
    normalize: bool,
    lam: float,
) -> Merge:
    w = [_f32(v) for v in weights]
    b = _flat(base)
    merged, scale = [], []
    for j in range(len(b)):
        terms = [w[t] * deltas[t][j] for t in range(len(deltas))]
        if consensus is None:
            used = list(range(len(terms)))
            divisor = sum(w)
            divisor = 1.0 if abs(divisor) < 1e-8 else divisor
        else:
            if consensus == "sum":
                positive = sum(terms) >= 0
            else:
                positive = sum((v > 0) - (v < 0) for v in terms) >= 0
            used = [t for t, v in enumerate(terms) if (v > 0 if positive else v < 0)]
            divisor = sum(w[t] for t in used)
            divisor = 1.0 if divisor == 0 else divisor
        if not normalize:
            divisor = 1.0
        total = sum(terms[t] for t in used)
        merged.append(b[j] + lam * (total / divisor))
        scale.append(abs(b[j]) + abs(lam) * sum(abs(terms[t]) for t in used) / abs(divisor))
    return _shaped(merged, base), _shaped(scale, base)


def task_arithmetic(
    base: torch.Tensor,
    tensors: torch.Tensor,
    weights: Sequence[float],
    normalize: bool,
    lam: float,
) -> Merge:
    return _mix(base, task_vectors(base, tensors), weights, None, normalize, lam)


def ties(
    base: torch.Tensor,
    tensors: torch.Tensor,
    weights: Sequence[float],
    densities: Sequence[float],
    normalize: bool,
    consensus: str,
    rescale: bool,
    lam: float,
    kept: Sequence[set[int] | None] | None = None,
) -> Merge:
    """``kept``: per model the indices kept where equal magnitudes straddle the cut (torch's
    choice in mergekit); by default this module's own sort."""
    deltas = task_vectors(base, tensors)
    trimmed = []
    for t, (delta, density) in enumerate(zip(deltas, densities, strict=True)):
        if density >= 1:
            trimmed.append(delta)
            continue
        chosen = kept[t] if kept is not None and kept[t] is not None else top_k(delta, density)
        trimmed.append(sparsified(delta, chosen, rescale))
    return _mix(base, trimmed, weights, consensus, normalize, lam)


def dare(
    base: torch.Tensor,
    tensors: torch.Tensor,
    weights: Sequence[float],
    densities: Sequence[float],
    generator: torch.Generator,
    sign_consensus: bool,
    normalize: bool,
    rescale: bool,
    lam: float,
) -> Merge:
    deltas = task_vectors(base, tensors)
    dropped = [
        delta if density >= 1 else sparsified(delta, draw_kept(delta, density, generator), rescale)
        for delta, density in zip(deltas, densities, strict=True)
    ]
    return _mix(base, dropped, weights, "sum" if sign_consensus else None, normalize, lam)
