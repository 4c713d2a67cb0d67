"""Every merge method against the literal formulas of tests/naive.py, on random models.

Integer-valued float32 models make every sum and product exact and produce many ties
(equal Ω, equal |τ|, τ = 0), so masks must be identical and merged weights equal bit
for bit. A randn family checks the same methods within float rounding.
"""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import naive
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    FACTORS,
    LAMBDA_GRID,
    QUANTILES,
    assert_states_close,
    assert_states_equal,
    families,
    make_family,
    written_model,
)

from mergelab import (
    DEFAULT_LAMBDAS,
    ModelPool,
    TallMasks,
    consensus_merge,
    task_arithmetic,
    trust_region,
    trust_region_vector,
)
from mergelab.engine import trust_region_streamed
from mergelab.engine.trust_region import gradient_checkpoints

TIES_SHARES = st.one_of(st.none(), st.sampled_from([0.2, 0.5, 1.0, 0.01, 0.37]))
LAMBDA_LISTS = st.one_of(
    st.just(list(LAMBDA_GRID)),
    st.lists(
        st.sampled_from([*LAMBDA_GRID, 0.05, 1.0, 1.5, 3.0]), min_size=1, max_size=5, unique=True
    ),
)


def assert_unchanged(family, before) -> None:
    pretrained, finetuned, gradients = before
    assert_states_equal(family.pretrained, pretrained)
    for task in finetuned:
        assert_states_equal(family.finetuned[task], finetuned[task])
        assert_states_equal(family.gradients[task], gradients[task])


def test_default_lambda_grid_is_the_papers():
    assert tuple(DEFAULT_LAMBDAS) == (0.2, 0.3, 0.4, 0.5, 0.6)


# --- Task Arithmetic ---------------------------------------------------------------------


@given(family=families(min_tasks=1), factor=FACTORS)
def test_task_arithmetic_single_factor_matches_naive(family, factor):
    before = family.snapshot()
    merged = task_arithmetic(family.pretrained, family.finetuned, scaling_factor=factor)
    assert isinstance(merged, dict)
    assert_states_equal(merged, naive.task_arithmetic(family.pretrained, family.finetuned, factor))
    assert_unchanged(family, before)


@given(family=families(min_tasks=1), factors=st.lists(FACTORS, min_size=1, max_size=4))
def test_task_arithmetic_factor_list_matches_naive(family, factors):
    before = family.snapshot()
    merged = task_arithmetic(family.pretrained, family.finetuned, scaling_factor=factors)
    assert isinstance(merged, list) and len(merged) == len(factors)
    for model, factor in zip(merged, factors, strict=True):
        expected = naive.task_arithmetic(family.pretrained, family.finetuned, factor)
        assert_states_equal(model, expected)
    assert_unchanged(family, before)


def test_task_arithmetic_streamed_in_blocks_matches_naive_on_real_floats():
    """Parameters of several of the engine's blocks, summed on threads: the naive formula
    to the bit."""
    family = make_family(3, [(400, 700), (1000,), (3, 5)], 4, integer=False)
    merged = task_arithmetic(family.pretrained, family.finetuned, scaling_factor=0.3)
    assert_states_equal(merged, naive.task_arithmetic(family.pretrained, family.finetuned, 0.3))


# --- Trust region ------------------------------------------------------------------------


@given(family=families(), q=QUANTILES, with_gradients=st.booleans())
def test_trust_region_vector_matches_naive(family, q, with_gradients):
    gradients = family.gradients if with_gradients else None
    pool = ModelPool(family.pretrained, family.finetuned)
    result = trust_region_vector(pool, threshold_quantile=q, gradient_stats=gradients)
    delta, mask, threshold, _ = naive.trust_region_parts(
        family.pretrained, family.finetuned, q, gradients
    )

    assert result.threshold == threshold
    assert list(result.delta) == family.merged_keys
    for key in family.merged_keys:
        assert torch.equal(result.delta[key], delta[key]), key
        assert result.kept[key] == int(mask[key].sum()), key
    density = result.density()
    assert list(density) == family.merged_keys
    for key in family.merged_keys:
        assert math.isclose(density[key], int(mask[key].sum()) / mask[key].numel(), rel_tol=1e-6)
    kept = sum(int(m.sum()) for m in mask.values())
    assert math.isclose(result.kept_fraction, kept / family.num_merged)
    rank = naive.quantile_rank(q, family.num_merged)
    if rank == family.num_merged:
        assert kept == family.num_merged  # q = 1 keeps everything
    else:
        # at most r coordinates lie strictly below the r-th smallest value
        assert kept <= rank


@given(family=families(), q=QUANTILES, with_gradients=st.booleans(), missed=st.booleans())
def test_trust_region_parameter_by_parameter_matches_naive(family, q, with_gradients, missed):
    """The path that writes models to files (StreamedTrustRegion), as ``mergelab merge``
    writes: the floor's one pass writing Σ τ, the coordinates the threshold drops set
    back to θ0 in place; or, the floor patched above every Ω (the threshold then lies
    below it), the two-pass radix select and the model written again."""
    gradients = family.gradients if with_gradients else None
    pool = ModelPool(family.pretrained, family.finetuned)
    opened = gradient_checkpoints(pool, gradients)
    high = mock.patch.object(trust_region_streamed, "conflict_floor", return_value=math.inf)
    with high if missed else contextlib.nullcontext():
        streamed = trust_region_streamed.StreamedTrustRegion(pool, q, opened)
        model = written_model(pool, streamed)
    delta, _, expected_threshold, _ = naive.trust_region_parts(
        family.pretrained, family.finetuned, q, gradients
    )
    assert streamed.threshold == expected_threshold
    assert_states_equal(model, naive.assemble(family.pretrained, delta, 1.0))


@given(
    family=families(),
    q=QUANTILES,
    with_gradients=st.booleans(),
    factors=st.one_of(FACTORS, st.lists(FACTORS, min_size=1, max_size=3)),
)
def test_trust_region_matches_naive(family, q, with_gradients, factors):
    gradients = family.gradients if with_gradients else None
    before = family.snapshot()
    merged = trust_region(
        family.pretrained,
        family.finetuned,
        scaling_factor=factors,
        threshold_quantile=q,
        gradient_stats=gradients,
    )
    assert isinstance(merged, list) == isinstance(factors, list)
    models, factors = (merged, factors) if isinstance(factors, list) else ([merged], [factors])
    assert len(models) == len(factors)
    for model, factor in zip(models, factors, strict=True):
        expected = naive.trust_region(family.pretrained, family.finetuned, factor, q, gradients)
        assert_states_equal(model, expected)
    assert_unchanged(family, before)


@given(family=families(), factor=FACTORS)
def test_trust_region_with_q_one_is_task_arithmetic(family, factor):
    for gradients in (None, family.gradients):
        merged = trust_region(
            family.pretrained,
            family.finetuned,
            scaling_factor=factor,
            threshold_quantile=1.0,
            gradient_stats=gradients,
        )
        assert_states_equal(merged, task_arithmetic(family.pretrained, family.finetuned, factor))


# --- TALL masks ----------------------------------------------------------------------------


def naive_mtl(family, ties):
    if ties is None:
        return naive.multitask_vector(family.pretrained, family.finetuned)
    return naive.ties_multitask_vector(family.pretrained, family.finetuned, ties)


@given(family=families(), lambdas=LAMBDA_LISTS, ties=TIES_SHARES)
def test_tall_masks_match_naive(family, lambdas, ties):
    before = family.snapshot()
    masks = TallMasks.build(family.pretrained, family.finetuned, lambdas=lambdas, ties=ties)
    mtl = naive_mtl(family, ties)
    expected = naive.tall_masks(family.pretrained, family.finetuned, lambdas, mtl)

    assert masks.tasks == family.tasks
    assert masks.lambdas == list(lambdas)
    for key in family.merged_keys:
        assert torch.equal(masks.multitask_vector(key), mtl[key]), key
    for task in family.tasks:
        for lam in lambdas:
            for key in family.merged_keys:
                got = masks.mask(task, lam, key)
                assert got.dtype == torch.bool and got.shape == family.pretrained[key].shape
                assert torch.equal(got, expected[task][lam][key]), (task, lam, key)
            density = masks.density(task, lam)
            assert list(density) == family.merged_keys
            for key, share in density.items():
                want = expected[task][lam][key]
                assert math.isclose(share, int(want.sum()) / want.numel(), rel_tol=1e-6)
    assert_unchanged(family, before)


@given(family=families(), ties=TIES_SHARES, data=st.data())
def test_tall_retrieve_matches_naive(family, ties, data):
    masks = TallMasks.build(family.pretrained, family.finetuned, ties=ties)
    mtl = naive_mtl(family, ties)
    expected_masks = naive.tall_masks(family.pretrained, family.finetuned, LAMBDA_GRID, mtl)
    task = data.draw(st.sampled_from(family.tasks), label="task")
    lam = data.draw(st.sampled_from(LAMBDA_GRID), label="lambda")

    retrieved = masks.retrieve(family.pretrained, task, lam)
    expected = naive.retrieve(family.pretrained, mtl, expected_masks[task][lam])
    assert_states_equal(retrieved, expected)

    # without lam, the λ chosen for the task is used
    scores = {t: {v: float(v == lam) for v in LAMBDA_GRID} for t in family.tasks}
    masks.choose_lambdas(scores)
    assert_states_equal(masks.retrieve(family.pretrained, task), expected)

    # retrieved into another task's model, whose tensors are overwritten
    other = data.draw(st.sampled_from(family.tasks), label="reused task")
    previous = masks.retrieve(family.pretrained, other, LAMBDA_GRID[0])
    reused = masks.retrieve(family.pretrained, task, lam, reuse=previous)
    assert_states_equal(reused, expected)
    assert all(reused[key] is previous[key] for key in previous)


@given(family=families(), alpha=FACTORS, data=st.data())
def test_consensus_matches_naive(family, alpha, data):
    T = len(family.tasks)
    k = data.draw(st.sampled_from([0, 1, 2, T, T + 1]), label="k")
    per_task = {t: data.draw(st.sampled_from(LAMBDA_GRID), label=t) for t in family.tasks}
    masks = TallMasks.build(family.pretrained, family.finetuned)
    merged = masks.consensus(family.pretrained, k=k, scaling_factor=alpha, lambdas=per_task)

    mtl = naive.multitask_vector(family.pretrained, family.finetuned)
    all_masks = naive.tall_masks(family.pretrained, family.finetuned, LAMBDA_GRID, mtl)
    chosen = {t: all_masks[t][per_task[t]] for t in family.tasks}
    assert_states_equal(merged, naive.consensus(family.pretrained, mtl, chosen, k, alpha))
    if k == 0:  # keeps everything: Task Arithmetic on τMTL
        assert_states_equal(merged, task_arithmetic(family.pretrained, family.finetuned, alpha))
    if k > T:  # keeps nothing: the pretrained model
        assert_states_equal(merged, family.pretrained)

    # the chosen λ are used when none are given
    masks.choose_lambdas({t: {v: float(v == per_task[t]) for v in LAMBDA_GRID} for t in chosen})
    assert_states_equal(masks.consensus(family.pretrained, k=k, scaling_factor=alpha), merged)


@given(
    family=families(),
    alpha=FACTORS,
    tall_lambda=st.sampled_from([*LAMBDA_GRID, 0.1, 1.0, 2.5]),
    data=st.data(),
)
def test_consensus_merge_matches_naive(family, alpha, tall_lambda, data):
    T = len(family.tasks)
    k = data.draw(st.sampled_from([0, 1, 2, T, T + 1]), label="k")
    merged = consensus_merge(
        family.pretrained, family.finetuned, k=k, scaling_factor=alpha, tall_lambda=tall_lambda
    )
    mtl = naive.multitask_vector(family.pretrained, family.finetuned)
    masks = naive.tall_masks(family.pretrained, family.finetuned, [tall_lambda], mtl)
    chosen = {t: masks[t][tall_lambda] for t in family.tasks}
    assert_states_equal(merged, naive.consensus(family.pretrained, mtl, chosen, k, alpha))


@given(
    num_tasks=st.integers(2, 5),
    lambdas=st.lists(
        st.sampled_from([*LAMBDA_GRID, 0.1, 0.8]), min_size=1, max_size=6, unique=True
    ),
    data=st.data(),
)
def test_choose_lambdas_best_score_first_of_the_grid_on_ties(num_tasks, lambdas, data):
    pretrained = {"w": torch.zeros(3)}
    finetuned = {f"t{i}": {"w": torch.full((3,), float(i + 1))} for i in range(num_tasks)}
    masks = TallMasks.build(pretrained, finetuned, lambdas=lambdas)
    score = st.one_of(st.integers(0, 2).map(float), st.floats(0, 1))
    # scores in an arbitrary λ order, so insertion order cannot decide ties
    scores = {
        task: {lam: data.draw(score) for lam in data.draw(st.permutations(lambdas))}
        for task in finetuned
    }
    chosen = masks.choose_lambdas(scores)
    assert chosen == naive.choose_lambdas(scores, lambdas)
    assert masks.chosen == chosen


# --- float inputs ------------------------------------------------------------------------


def _patch(expected: dict, actual: dict, ambiguous: dict) -> dict:
    """``expected`` with the coordinates that rounding may decide either way from ``actual``."""
    out = dict(expected)
    for key, where in ambiguous.items():
        out[key] = torch.where(where, actual[key], expected[key])
    return out


@given(family=families(integer=False, max_tasks=4), q=QUANTILES, factor=FACTORS, data=st.data())
def test_float_models_match_naive_within_rounding(family, q, factor, data):
    pre, fts = family.pretrained, family.finetuned
    keys = family.merged_keys
    taus = naive.task_vectors(pre, fts)
    scale = max(pre[k].abs().max().item() for k in keys) + abs(factor) * sum(
        max(t[k].abs().max().item() for k in keys) for t in taus.values()
    )

    merged = task_arithmetic(pre, fts, scaling_factor=factor)
    assert_states_close(merged, naive.task_arithmetic(pre, fts, factor), scale)

    for gradients in (None, family.gradients):
        merged = trust_region(
            pre, fts, scaling_factor=factor, threshold_quantile=q, gradient_stats=gradients
        )
        expected = naive.trust_region(pre, fts, factor, q, gradients)
        _, _, threshold, omega = naive.trust_region_parts(pre, fts, q, gradients)
        top = max(o.abs().max().item() for o in omega.values())
        ambiguous = {k: (omega[k] - threshold).abs() <= 1e-5 * top for k in keys}
        assert_states_close(merged, _patch(expected, merged, ambiguous), scale)

    masks = TallMasks.build(pre, fts)
    mtl = naive.multitask_vector(pre, fts)
    for key in keys:
        torch.testing.assert_close(masks.multitask_vector(key), mtl[key], rtol=1e-6, atol=1e-6)
    ambiguous_of = {}
    for task, model in fts.items():
        for lam in LAMBDA_GRID:
            margin = {
                k: (pre[k] - model[k]).abs() - lam * (pre[k] + mtl[k] - model[k]).abs()
                for k in keys
            }
            ambiguous_of[task, lam] = {k: margin[k].abs() <= 1e-5 * scale for k in keys}
    task = data.draw(st.sampled_from(family.tasks), label="task")
    lam = data.draw(st.sampled_from(LAMBDA_GRID), label="lambda")
    expected_masks = naive.tall_masks(pre, fts, LAMBDA_GRID, mtl)
    for key in keys:
        clear = ~ambiguous_of[task, lam][key]
        assert torch.equal(masks.mask(task, lam, key)[clear], expected_masks[task][lam][key][clear])
    retrieved = masks.retrieve(pre, task, lam)
    expected = naive.retrieve(pre, mtl, expected_masks[task][lam])
    assert_states_close(retrieved, _patch(expected, retrieved, ambiguous_of[task, lam]), scale)

    k = data.draw(st.sampled_from([0, 1, 2, len(fts)]), label="k")
    merged = masks.consensus(pre, k=k, scaling_factor=factor, lambdas=dict.fromkeys(fts, lam))
    chosen = {t: expected_masks[t][lam] for t in fts}
    expected = naive.consensus(pre, mtl, chosen, k, factor)
    any_ambiguous = {k_: torch.stack([ambiguous_of[t, lam][k_] for t in fts]).any(0) for k_ in keys}
    assert_states_close(merged, _patch(expected, merged, any_ambiguous), scale)
