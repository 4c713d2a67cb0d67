"""TSV-M, Iso-C and Iso-CTS for one matrix, in float32, against the float64 numpy
transcriptions of tests/naive_spectral.py, on random, rank-deficient and tiny matrices;
a hand-worked case; the engine's per-parameter dispatch over whole models."""

from __future__ import annotations

import naive_spectral
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import families

import mergelab
from mergelab.merging.isotropic import common_space_size, iso_c_merge, iso_cts_merge
from mergelab.merging.spectral import checked_svd
from mergelab.merging.task_singular_vectors import tsv_merge

RULES = {
    "tsv": (tsv_merge, naive_spectral.tsv),
    "iso_c": (iso_c_merge, naive_spectral.iso_c),
    "iso_cts": (
        lambda taus, **kw: iso_cts_merge(taus, common_fraction=0.8, **kw),
        lambda taus: naive_spectral.iso_cts(taus, 0.8),
    ),
}


@st.composite
def task_matrices(draw) -> torch.Tensor:
    """T float32 matrices [T, m, n]; some rank-deficient (a product of thin factors)."""
    count = draw(st.integers(2, 5))
    rows, cols = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    rank = draw(st.one_of(st.none(), st.integers(1, max(1, min(rows, cols) - 1))))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if rank is None:
        return torch.randn(count, rows, cols, generator=generator)
    left = torch.randn(count, rows, rank, generator=generator)
    return left @ torch.randn(count, rank, cols, generator=generator)


def _agree(actual: torch.Tensor, expected: np.ndarray, scale: float) -> None:
    error = np.linalg.norm(actual.double().numpy() - expected)
    assert error <= 2e-4 * scale * max(1.0, np.linalg.norm(expected)), error


@pytest.mark.parametrize("rule", sorted(RULES))
@given(taus=task_matrices())
@settings(max_examples=120)
def test_rule_matches_the_naive_transcription(rule, taus):
    """float32 against float64, where the rule is well-conditioned: the polar factors
    amplify rounding by the condition the naive helper measures."""
    ours, naive = RULES[rule]
    cond = naive_spectral.condition(taus.double().numpy(), rule)
    assume(cond < 1e3)
    expected = naive(taus.double().numpy())
    _agree(ours(taus, label="w"), expected, cond)


def test_hand_worked_diagonal_case():
    """τ1 = diag(4, 1), τ2 = diag(0, 2) (T = 2, m = n = 2).
    TSV-M keeps ⌊2/2⌋ = 1 component per task: e1·4·e1ᵀ and e2·2·e2ᵀ, already orthogonal,
    so δ = diag(4, 2). Iso-C: Σ = diag(4, 3), mean singular value 3.5, δ = diag(3.5, 3.5).
    Iso-CTS with f = 0.5: k = 2 − 2·round((2 − 1)/2) = 2 (Python rounds 0.5 to 0), the
    common space is all of Σ's, δ = diag(3.5, 3.5)."""
    taus = torch.tensor([[[4.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 2.0]]])
    torch.testing.assert_close(tsv_merge(taus), torch.diag(torch.tensor([4.0, 2.0])))
    torch.testing.assert_close(iso_c_merge(taus), 3.5 * torch.eye(2))
    assert common_space_size((2, 2), 2, 0.5) == (2, 0)
    torch.testing.assert_close(iso_cts_merge(taus, common_fraction=0.5), 3.5 * torch.eye(2))


def test_hand_worked_task_specific_subspaces():
    """τ1 = diag(3, 0, 0, 0), τ2 = diag(0, 0, 1, 0) with f = 0.5: r = 4, k = 4 − 2·1 = 2,
    so Σ's top 2 directions (e1, e3) are common and each residual is zero: the task
    components are negligible, the mean over all 4 singular values is (3+1+0+0)/4 = 1,
    and δ = e1e1ᵀ + e3e3ᵀ."""
    taus = torch.zeros(2, 4, 4)
    taus[0, 0, 0], taus[1, 2, 2] = 3.0, 1.0
    assert common_space_size((4, 4), 2, 0.5) == (2, 1)
    torch.testing.assert_close(
        iso_cts_merge(taus, common_fraction=0.5), torch.diag(torch.tensor([1.0, 0, 1, 0]))
    )


def test_a_matrix_narrower_than_the_task_count_merges_to_zero_in_tsv():
    taus = torch.randn(5, 3, 7)
    assert torch.equal(tsv_merge(taus), torch.zeros(3, 7))


def test_a_subspace_too_small_for_the_tasks_names_the_parameter():
    """r = 3, f = 0: 3 directions over 2 tasks round to 2 each, 4 > 3."""
    with pytest.raises(ValueError, match=r"'blocks.0.weight'.*larger common_subspace"):
        iso_cts_merge(torch.randn(2, 3, 3), label="blocks.0.weight", common_fraction=0.0)


def test_a_non_finite_svd_names_parameter_and_task():
    matrix = torch.full((3, 3), float("inf"))
    with pytest.raises((ValueError, torch.linalg.LinAlgError), match=r"'w'.*'mnist'"):
        checked_svd(matrix, "w", "mnist")


@given(family=families(integer=False), rule=st.sampled_from(["tsv", "iso_c", "iso_cts"]))
@settings(max_examples=20, deadline=None)
def test_engine_takes_the_svd_of_matrices_and_the_mean_of_the_rest(family, rule):
    """Whole models: each 2-D parameter as the naive rule gives it, every other the mean."""
    pool = mergelab.ModelPool(family.pretrained, family.finetuned)
    if rule == "tsv":
        delta = mergelab.tsv_vector(pool, "cpu")
    else:
        delta = mergelab.isotropic_vector(pool, 0.8 if rule == "iso_cts" else None, "cpu")
    naive = RULES[rule][1]
    for key in family.merged_keys:
        taus = torch.stack(
            [family.finetuned[t][key] - family.pretrained[key] for t in family.tasks]
        )
        if taus.dim() != 3:
            torch.testing.assert_close(delta[key], taus.mean(0), rtol=1e-5, atol=1e-6, msg=key)
            continue
        cond = naive_spectral.condition(taus.double().numpy(), rule)
        assume(cond < 1e3)
        _agree(delta[key], naive(taus.double().numpy()), cond)
