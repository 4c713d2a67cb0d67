"""Literal float64 transcriptions of TSV-M, Iso-C and Iso-CTS (REFERENCE.md §5) for one
matrix, in numpy, laid out as the papers write them (the concatenation zero-padded to
min(m, n) components, as the authors' code builds it). Nothing here imports mergelab.

One rule beyond the papers, the one mergelab states in merging/spectral.py: a component
whose singular value is at most max(m, n)·eps32·‖A‖_F (A: the matrix it came from) has
no direction, and is removed from the concatenation before orthogonalising (its value
still counts in Iso-CTS's mean).
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def _svd(a):
    return np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)


def _negligible(s, source):
    return s <= max(source.shape) * EPS32 * np.linalg.norm(source)


def _polar(a):
    u, _, vt = _svd(a)
    return u @ vt


def _combine(u, s, vt, drop):
    """orth(U) diag(s) orth(Vᵀ) with the dropped components removed."""
    keep = ~drop
    if not keep.any():
        return np.zeros((u.shape[0], vt.shape[1]))
    return _polar(u[:, keep]) @ np.diag(s[keep]) @ _polar(vt[keep])


def tsv(taus: np.ndarray) -> np.ndarray:
    """TSV-M of taus [T, m, n]."""
    count, m, n = taus.shape
    full = min(m, n)
    r = full // count
    u_cat = np.zeros((m, full))
    s_cat = np.zeros(full)
    vt_cat = np.zeros((full, n))
    drop = np.ones(full, bool)  # padding: no component
    for t in range(count):
        u, s, vt = _svd(taus[t])
        block = slice(t * r, (t + 1) * r)
        u_cat[:, block] = u[:, :r]
        s_cat[block] = s[:r]
        vt_cat[block] = vt[:r]
        drop[block] = _negligible(s[:r], taus[t])
    return _combine(u_cat, s_cat, vt_cat, drop)


def iso_c(taus: np.ndarray) -> np.ndarray:
    """U · mean(S) · Vᵀ of SVD(Σt τt)."""
    total = np.asarray(taus, np.float64).sum(0)
    u, s, vt = _svd(total)
    keep = ~_negligible(s, total)
    return u[:, keep] @ np.diag(np.full(keep.sum(), s.mean())) @ vt[keep]


def iso_cts(taus: np.ndarray, fraction: float) -> np.ndarray:
    """Iso-CTS with the common share ``fraction`` of the rank."""
    count, m, n = taus.shape
    r = min(m, n)
    k = int(r * fraction)
    k = r - round((r - k) / count) * count
    d = (r - k) // count
    total = np.asarray(taus, np.float64).sum(0)
    u, s, vt = _svd(total)
    uc = u[:, :k]
    u_cat, s_cat, vt_cat, drop = np.zeros((m, r)), np.zeros(r), np.zeros((r, n)), np.ones(r, bool)
    for t in range(count):
        residual = taus[t] - uc @ uc.T @ taus[t]
        ut, st, vtt = _svd(residual)
        block = slice(t * d, (t + 1) * d)
        u_cat[:, block], s_cat[block], vt_cat[block] = ut[:, :d], st[:d], vtt[:d]
        drop[block] = _negligible(st[:d], taus[t])
    common = slice(count * d, count * d + k)
    u_cat[:, common], s_cat[common], vt_cat[common] = uc, s[:k], vt[:k]
    drop[common] = _negligible(s[:k], total)
    flat = np.full(r, s_cat.mean())
    return _combine(u_cat, flat, vt_cat, drop)


def _cut(s, source, keep):
    """1/(relative gap) at the cut after ``keep`` components, and at the negligible
    threshold: where float32 may choose other directions than float64."""
    scale = max(s[0], 1e-300) if len(s) else 1.0
    tolerance = max(source.shape) * EPS32 * np.linalg.norm(source)
    if (np.abs(s - tolerance) < tolerance / 2).any():
        return np.inf
    if 0 < keep < len(s):
        return scale / max(s[keep - 1] - s[keep], 1e-300)
    return 1.0


def _polar_condition(a):
    if a.size == 0:
        return 1.0
    return 1.0 / max(_svd(a)[1].min(), 1e-300)


def condition(taus: np.ndarray, rule: str, fraction: float = 0.8) -> float:
    """How much rounding the rule may amplify on this draw: the inverse relative gaps at
    every cut between kept and dropped singular components, and the inverse smallest
    singular value of the concatenated U and Vᵀ that are orthogonalised; the tests skip
    draws where float32 cannot agree with float64."""
    taus = np.asarray(taus, np.float64)
    count, m, n = taus.shape
    r = min(m, n)
    total = taus.sum(0)
    u, s, vt = _svd(total)
    if rule == "iso_c":
        kept = s[~_negligible(s, total)]
        return max(_cut(s, total, len(kept)), s[0] / kept.min() if len(kept) else 1.0)
    if rule == "tsv":
        k, d, basis = 0, r // count, None
    else:
        k = r - round((r - int(r * fraction)) / count) * count
        d, basis = (r - k) // count, u[:, :k]
    worst = _cut(s, total, k) if k else 1.0
    us, vts = [], []
    for t in range(count):
        tau = taus[t] if basis is None else taus[t] - basis @ basis.T @ taus[t]
        ut, st, vtt = _svd(tau)
        worst = max(worst, _cut(st, taus[t], d))
        keep = ~_negligible(st[:d], taus[t])
        us.append(ut[:, :d][:, keep])
        vts.append(vtt[:d][keep])
    if k:
        keep = ~_negligible(s[:k], total)
        us.append(u[:, :k][:, keep])
        vts.append(vt[:k][keep])
    u_cat, vt_cat = np.concatenate(us, 1), np.concatenate(vts, 0)
    return max(worst, _polar_condition(u_cat), _polar_condition(vt_cat))
