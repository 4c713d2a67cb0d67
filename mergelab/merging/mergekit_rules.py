"""mergekit's ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear`` and ``dare_ties``,
one parameter at a time: pure functions over stacked tensors, no files, no models.

Transcribed from github arcee-ai/mergekit (commit a6e4028, v0.1.4 and later):
mergekit/merge_methods/linear.py (LinearMergeTask), generalized_task_arithmetic.py
(GTATask, get_task_vectors, get_mask), registry.py (names to settings), sparsify.py
(magnitude, bernoulli, rescaled_masked_tensor) and docs/merge_methods.md.

``linear`` reads ``weight`` per model and ``normalize`` (default true): Σt wt·θt, divided by
Σt wt when normalizing, with no guard (mergekit writes inf/NaN for weights summing to 0;
here that is a BadValue). Only the models given are averaged: a mergekit config that also
names a ``base_model`` adds the base to the inputs (plan.py normalize_config; its weight is
the global ``weight`` if set, else None and the merge fails): pass it among ``tensors``.

The task methods are one GeneralizedTaskArithmeticMerge with these settings (registry.py):

    method           sparsify   consensus  normalize  rescale
    task_arithmetic  -          -          false      false (read, unused)
    ties             magnitude  sum        true       false
    dare_linear      random     -          false      true
    dare_ties        random     sum        false      true

Each reads ``weight`` per model (required), ``density`` per model (default 1.0, unused by
task_arithmetic), and globally ``normalize``, ``rescale``, ``lambda`` (1.0) and ``int8_mask``
(false; the 0/1 mask's dtype only, no effect on values). ``epsilon`` and ``gamma`` belong
to della and breadcrumbs. The consensus is fixed per method: ``count`` exists in get_mask
but no registered method uses it, and a config's ``consensus_method`` is ignored (the
legacy script's ``--naive-count`` sets it to no effect). Per parameter, in order:

1. δt = θt.to(base dtype) − θbase. The base is skipped if listed among the models (its
   weight counts nowhere); a model of another shape is skipped with a warning (embeddings
   are cropped), here a BadValue; no models left returns the base.
2. Sparsify each δt on its own, unweighted, only where density < 1 (density ≥ 1 returns δt
   untouched: no draw, no rescale).
   magnitude: k = int(density·numel), Python's truncation of the float product (0.29·100
   keeps 28); k = 0 is an AssertionError (here a BadValue); kept: torch.argsort(|δt|,
   descending=True)[:k], a non-stable sort, so which of equal magnitudes at the cut survive
   is torch's choice (torch 2.14 CPU: index order up to 16 entries, not beyond; CUDA may
   differ): the same call here, on the input's device, picks the same ones.
   random: mask = torch.bernoulli(torch.full_like(δt, density)), from the device's default
   generator (seeded only by ``--random-seed``); here from ``generator``, one draw of δ's
   shape per model with density < 1, in model order. mergekit draws bf16 in bf16 (p rounded:
   0.3 → 0.30078125) and CPU fp16 in float32.
   rescale (true → RescaleNorm.l1, for ties too): δ' = (δ·m)·(‖δ‖₁ / ‖δ·m‖₁), left as δ·m
   when either norm is below 1e-7. Not the DARE paper's 1/density: mergekit ≤ 0.0.6 did
   that; v0.1.0 (commit a2dda31) switched to matching the L1 norm.
3. Wt = wt·δ't, the weights in δ's dtype.
4. Consensus (ties, dare_ties): elected sign s = +1 where Σt Wt ≥ 0 (``sum``; an exact 0
   elects +), or where Σt sign(Wt) ≥ 0 (``count``); else −1. The vote is on the weighted
   deltas, so a negative weight flips a model's vote. Mask mt = sign(Wt) == s: entries at 0
   (pruned) never agree. mixed = Σt mt·Wt, divisor = Σt wt·mt, exactly 0 → 1.
   Without consensus: mixed = Σt Wt, divisor = Σt wt over every model, |divisor| < 1e-8 → 1.
5. normalize: mixed / divisor. 6. λ ≠ 1: mixed·λ. 7. (θbase + mixed).to(base dtype).

Precision: mergekit computes in the dtype the tensors are loaded in (the config's ``dtype``,
else the checkpoint's), with no promotion beyond argsort's ``.float()`` on CPU and CPU fp16
draws. Here everything is float32 (bf16/fp16/fp64 cast first), returned as float32 for the
caller to cast: bit for bit mergekit with ``dtype: float32`` on the same device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mergelab.errors import BadValue

RESCALE_EPS = 1e-7  # sparsify.rescaled_masked_tensor: norms below this are not matched
SUM_EPS = 1e-8  # GTATask without consensus: |Σ w| below this divides by 1
CONSENSUS = ("sum", "count")


def _float32(tensor: Tensor, name: str) -> Tensor:
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        kind = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
        raise BadValue(f"{name} must be a floating-point tensor, got {kind}")
    return tensor.to(torch.float32)


def _weights(weights: Sequence[float], count: int, like: Tensor) -> Tensor:
    """The weights as mergekit holds them: float32, shaped [T, 1, ...] against [T, *shape]."""
    if len(weights) != count:
        raise BadValue(f"weights: {len(weights)} given for {count} tensors")
    for weight in weights:
        if not math.isfinite(weight):
            raise BadValue(f"weight must be finite, got {weight}")
    values = torch.tensor([float(w) for w in weights], dtype=torch.float32, device=like.device)
    return values.reshape(count, *([1] * (like.dim() - 1)))


def _task_vectors(
    base: Tensor,
    tensors: Tensor,
    weights: Sequence[float],
    lambda_: float,
    densities: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(θbase, δ = θt − θbase stacked, weights) in float32, the settings checked."""
    base, tensors = _float32(base, "base"), _float32(tensors, "tensors")
    if tensors.dim() == 0 or tensors.shape[1:] != base.shape:
        raise BadValue(
            f"tensors must be [T, *base.shape] = [T, {', '.join(map(str, base.shape))}], "
            f"got {list(tensors.shape)}"
        )
    w = _weights(weights, tensors.shape[0], tensors)
    if not math.isfinite(lambda_):
        raise BadValue(f"lambda must be finite, got {lambda_}")
    if densities is not None and len(densities) != tensors.shape[0]:
        raise BadValue(f"densities: {len(densities)} given for {tensors.shape[0]} tensors")
    for density in densities or ():
        if not 0 < density <= 1:  # NaN fails too
            raise BadValue(f"density must be in (0, 1], got {density}")
    return base, tensors - base, w


def linear(tensors: Tensor, weights: Sequence[float], normalize: bool = True) -> Tensor:
    """mergekit ``linear``: Σt wt·θt, over Σt wt when ``normalize``."""
    tensors = _float32(tensors, "tensors")
    if tensors.dim() == 0 or tensors.shape[0] == 0:
        raise BadValue(f"linear needs tensors of shape [T >= 1, ...], got {list(tensors.shape)}")
    w = _weights(weights, tensors.shape[0], tensors)
    merged = (w * tensors).sum(dim=0)
    if not normalize:
        return merged
    total = w.sum(dim=0)
    if bool((total == 0).any()):  # mergekit divides anyway and writes inf/NaN
        raise BadValue(f"linear with normalize: weights {list(weights)} sum to 0")
    return merged / total


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """sparsify.magnitude's 0/1 mask: the k = int(density·numel) largest |δ| by
    torch.argsort (non-stable, as mergekit: its choice among equal magnitudes)."""
    if density >= 1:
        return torch.ones_like(delta)
    k = int(density * delta.numel())
    if k <= 0:
        raise BadValue(
            f"density {density} keeps int({density}·{delta.numel()}) = 0 entries "
            "(mergekit refuses: 'not gonna zero out the whole tensor')"
        )
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.argsort(delta.abs().reshape(-1), descending=True)[:k]] = 1
    return mask.reshape(delta.shape)


def random_mask(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """sparsify.bernoulli's mask: 1 with probability ``density``, from ``generator``; no draw
    (all ones) at density ≥ 1, as mergekit returns before drawing."""
    if density >= 1:
        return torch.ones_like(delta)
    full = torch.full_like(delta, density, dtype=torch.float32)
    return torch.bernoulli(full, generator=generator)


def masked(delta: Tensor, mask: Tensor, rescale: bool) -> Tensor:
    """rescaled_masked_tensor with RescaleNorm.l1 (or None): δ·m times ‖δ‖₁/‖δ·m‖₁."""
    kept = delta * mask
    if not rescale:
        return kept
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def _combine(
    base: Tensor,
    deltas: Tensor,
    w: Tensor,
    consensus: str | None,
    normalize: bool,
    lambda_: float,
) -> Tensor:
    """GTATask.execute from the sparsified deltas on."""
    weighted = deltas * w
    if consensus is not None:
        signs = weighted.sign()
        votes = weighted.sum(dim=0) if consensus == "sum" else signs.sum(dim=0)
        elected = (votes >= 0).to(torch.float32) * 2 - 1
        agree = (signs == elected).to(torch.float32)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < SUM_EPS] = 1
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed


def task_arithmetic(
    base: Tensor,
    tensors: Tensor,
    weights: Sequence[float],
    normalize: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """mergekit ``task_arithmetic``: θbase + λ·Σt wt·δt (over Σt wt when ``normalize``)."""
    base, deltas, w = _task_vectors(base, tensors, weights, lambda_)
    if deltas.shape[0] == 0:  # get_task_vectors found no model besides the base
        return base
    return _combine(base, deltas, w, None, normalize, lambda_)


def ties(
    base: Tensor,
    tensors: Tensor,
    weights: Sequence[float],
    densities: Sequence[float],
    normalize: bool = True,
    consensus: str = "sum",
    rescale: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """mergekit ``ties``: magnitude top-k per δt, sign election, agreeing entries summed
    (over the agreeing weights when ``normalize``), times λ, added to the base."""
    if consensus not in CONSENSUS:
        raise BadValue(f"consensus must be one of {CONSENSUS}, got {consensus!r}")
    base, deltas, w = _task_vectors(base, tensors, weights, lambda_, densities)
    if deltas.shape[0] == 0:
        return base
    kept = [
        masked(d, magnitude_mask(d, float(p)), rescale) if p < 1 else d
        for d, p in zip(deltas, densities, strict=True)
    ]
    return _combine(base, torch.stack(kept), w, consensus, normalize, lambda_)


def dare(
    base: Tensor,
    tensors: Tensor,
    weights: Sequence[float],
    densities: Sequence[float],
    generator: torch.Generator,
    sign_consensus: bool,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
) -> Tensor:
    """mergekit ``dare_ties`` (``sign_consensus``, by sum) or ``dare_linear``: each δt keeps
    a Bernoulli(density) draw from ``generator``, L1-rescaled when ``rescale``."""
    base, deltas, w = _task_vectors(base, tensors, weights, lambda_, densities)
    if deltas.shape[0] == 0:
        return base
    kept = [
        masked(d, random_mask(d, float(p), generator), rescale) if p < 1 else d
        for d, p in zip(deltas, densities, strict=True)
    ]
    consensus = "sum" if sign_consensus else None
    return _combine(base, torch.stack(kept), w, consensus, normalize, lambda_)
