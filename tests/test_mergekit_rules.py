"""mergekit's five per-tensor rules (mergelab.merging.mergekit_rules) against the naive
coordinate loops of naive_mergekit, hand-worked cases, mergekit's own tie-breaking and
random draws, and the settings refused."""

from __future__ import annotations

import math

import naive_mergekit as naive
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.errors import BadValue
from mergelab.merging import mergekit_rules as rules

# multiples of 1/64 in [-8, 8] and weights in eighths: every δ, w·δ and their sums are
# exact in float32, in any order, so the sign votes and zero divisors are decided alike
# here and in the naive loops; many equal magnitudes, exact zeros, weights summing to 0
GRID = st.integers(-512, 512).map(lambda k: k / 64)
EIGHTHS = st.integers(-16, 16).map(lambda k: k / 8)
FLOATS = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
POSITIVE = st.floats(0.0625, 4.0, width=32)
SHAPES = st.sampled_from([(), (1,), (3,), (8,), (1, 1), (2, 3), (3, 4)])
DENSITIES = st.one_of(
    st.just(1.0),
    st.sampled_from([0.5, 0.29, 0.7, 0.9]),
    st.floats(0.0, 1.0, exclude_min=True),
)
LAMBDAS = st.sampled_from([1.0, 0.5, 0.3, -2.0])
TOLERANCE = 1e-5  # of what was summed: a few float32 roundings, summation order aside


@st.composite
def stacks(draw, values=GRID, with_base: bool = True):
    """(base, tensors [T, *shape], T) of float32 values."""
    shape = draw(SHAPES)
    count = draw(st.integers(1, 5))
    size = math.prod(shape)
    models = draw(st.lists(values, min_size=count * size, max_size=count * size))
    tensors = torch.tensor(models, dtype=torch.float32).reshape(count, *shape)
    base_values = (
        draw(st.lists(values, min_size=size, max_size=size)) if with_base else [0.0] * size
    )
    base = torch.tensor(base_values, dtype=torch.float32).reshape(shape)
    return base, tensors, count


def assert_matches(got: torch.Tensor, merge: tuple[torch.Tensor, torch.Tensor]) -> None:
    want, scale = merge
    assert got.dtype == torch.float32 and got.shape == want.shape
    error = (got.double() - want).abs()
    assert bool((error <= TOLERANCE * scale).all()), (got.tolist(), want.tolist())


def kept_by_module(base, tensors, densities):
    """The entries rules.magnitude_mask keeps, checked to be a top-k of each δt."""
    deltas = naive.task_vectors(base, tensors)
    kept = []
    for delta, difference, density in zip(deltas, tensors - base, densities, strict=True):
        mask = rules.magnitude_mask(difference, density).reshape(-1)
        chosen = set(torch.nonzero(mask).reshape(-1).tolist())
        assert density >= 1 or naive.is_top_k(delta, chosen, density)
        kept.append(chosen)
    return kept


# --- properties against the naive loops ---------------------------------------------------


@given(
    stack=stacks(values=st.one_of(GRID, FLOATS), with_base=False),
    data=st.data(),
    normalize=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_linear_matches_naive(stack, data, normalize):
    _, tensors, count = stack
    weights = data.draw(st.lists(st.one_of(EIGHTHS, POSITIVE), min_size=count, max_size=count))
    if normalize and sum(weights) == 0:  # eighths: exact
        with pytest.raises(BadValue, match="sum to 0"):
            rules.linear(tensors, weights, normalize)
        return
    got = rules.linear(tensors, weights, normalize)
    assert_matches(got, naive.linear(tensors, weights, normalize))


@given(
    stack=stacks(values=st.one_of(GRID, FLOATS)),
    data=st.data(),
    normalize=st.booleans(),
    lam=LAMBDAS,
)
@settings(max_examples=150, deadline=None)
def test_task_arithmetic_matches_naive(stack, data, normalize, lam):
    base, tensors, count = stack
    weights = data.draw(st.lists(EIGHTHS, min_size=count, max_size=count))
    got = rules.task_arithmetic(base, tensors, weights, normalize, lam)
    assert_matches(got, naive.task_arithmetic(base, tensors, weights, normalize, lam))


@given(
    stack=stacks(),
    data=st.data(),
    normalize=st.booleans(),
    consensus=st.sampled_from(["sum", "count"]),
    rescale=st.booleans(),
    lam=LAMBDAS,
)
@settings(max_examples=250, deadline=None)
def test_ties_matches_naive(stack, data, normalize, consensus, rescale, lam):
    base, tensors, count = stack
    weights = data.draw(st.lists(EIGHTHS, min_size=count, max_size=count))
    densities = data.draw(st.lists(DENSITIES, min_size=count, max_size=count))
    size = base.numel()
    if any(d < 1 and int(d * size) == 0 for d in densities):
        with pytest.raises(BadValue, match="keeps"):
            rules.ties(base, tensors, weights, densities, normalize, consensus, rescale, lam)
        return
    got = rules.ties(base, tensors, weights, densities, normalize, consensus, rescale, lam)
    kept = kept_by_module(base, tensors, densities)
    want = naive.ties(
        base, tensors, weights, densities, normalize, consensus, rescale, lam, kept=kept
    )
    assert_matches(got, want)


@given(
    stack=stacks(),
    data=st.data(),
    sign_consensus=st.booleans(),
    normalize=st.booleans(),
    rescale=st.booleans(),
    lam=LAMBDAS,
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=250, deadline=None)
def test_dare_matches_naive(stack, data, sign_consensus, normalize, rescale, lam, seed):
    base, tensors, count = stack
    weights = data.draw(st.lists(EIGHTHS, min_size=count, max_size=count))
    densities = data.draw(st.lists(DENSITIES, min_size=count, max_size=count))
    settings_ = (sign_consensus, normalize, rescale, lam)
    got = rules.dare(
        base, tensors, weights, densities, torch.Generator().manual_seed(seed), *settings_
    )
    want = naive.dare(
        base, tensors, weights, densities, torch.Generator().manual_seed(seed), *settings_
    )
    assert_matches(got, want)


@given(stack=stacks(), density=DENSITIES)
@settings(max_examples=100, deadline=None)
def test_magnitude_mask_is_mergekits_argsort(stack, density):
    """sparsify.magnitude's lines, literally: which of equal magnitudes survive is torch's
    non-stable argsort's choice, and the module makes the same call."""
    base, tensors, _ = stack
    delta = tensors[0] - base
    k = int(density * delta.numel())
    if density >= 1 or k == 0:
        return
    mask = torch.zeros_like(delta)
    topk = torch.argsort(delta.abs().view(-1).float(), descending=True)[:k]
    mask.view(-1)[topk] = 1
    assert torch.equal(rules.magnitude_mask(delta, density), mask)


def test_equal_magnitudes_at_the_cut_are_left_to_argsort():
    """Why the tie-break is delegated to torch.argsort: on CPU (torch 2.14) it is not a
    stable sort beyond 16 entries, so a 'first index wins' rule could pick other entries."""
    delta = torch.tensor([1.0, -1.0] * 20)
    mask = rules.magnitude_mask(delta, 0.5)
    assert int(mask.sum()) == 20
    expected = torch.zeros(40)
    expected[torch.argsort(delta.abs(), descending=True)[:20]] = 1
    assert torch.equal(mask, expected)


# --- hand-worked cases --------------------------------------------------------------------


def test_linear_by_hand():
    # (1·[1, 2] + 3·[3, 6]) = [10, 20]; normalized by 1 + 3: [2.5, 5]
    tensors = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert rules.linear(tensors, [1, 3]).tolist() == [2.5, 5.0]
    assert rules.linear(tensors, [1, 3], normalize=False).tolist() == [10.0, 20.0]
    # the weights of the listed models only: none is treated as a base
    assert rules.linear(tensors[:1], [2.0]).tolist() == [1.0, 2.0]


def test_task_arithmetic_by_hand():
    # δ1 = [2, 0] − [1, 1] = [1, −1], δ2 = [4, 3] − [1, 1] = [3, 2]
    # Σ w·δ = 0.5·[1, −1] + 1·[3, 2] = [3.5, 1.5]; λ = 2: [1, 1] + [7, 3] = [8, 4]
    base = torch.tensor([1.0, 1.0])
    tensors = torch.tensor([[2.0, 0.0], [4.0, 3.0]])
    assert rules.task_arithmetic(base, tensors, [0.5, 1.0], lambda_=2.0).tolist() == [8, 4]
    # normalize: [3.5, 1.5] / 1.5 = [7/3, 1] → [10/3, 2]
    got = rules.task_arithmetic(base, tensors, [0.5, 1.0], normalize=True)
    assert got.tolist() == pytest.approx([10 / 3, 2.0], rel=1e-6)
    # weights summing to 0: |Σ w| < 1e-8 divides by 1: δ1 − δ2 = [−2, −3] → [−1, −2]
    got = rules.task_arithmetic(base, tensors, [1.0, -1.0], normalize=True)
    assert got.tolist() == [-1.0, -2.0]


def test_ties_by_hand():
    # base 0, density 0.5 of 4 entries: k = int(0.5·4) = 2 per model
    # A = [3, −1, 0.5, 2] keeps |3|, |2|: [3, 0, 0, 2]; B = [−2, −2, 1, 1]: [−2, −2, 0, 0]
    base = torch.zeros(4)
    tensors = torch.tensor([[3.0, -1.0, 0.5, 2.0], [-2.0, -2.0, 1.0, 1.0]])
    half = [0.5, 0.5]
    # w = [1, 1]: Σ = [1, −2, 0, 2], elected [+, −, + (0 elects +), +]; agreeing:
    # [3 (A) / 1, −2 (B) / 1, nobody: 0 / (0 → 1), 2 (A) / 1]
    assert rules.ties(base, tensors, [1, 1], half).tolist() == [3, -2, 0, 2]
    # w = [1, 3]: B weighted [−6, −6, 0, 0], Σ = [−3, −6, 0, 2], elected [−, −, +, +]:
    # [−6 / 3, −6 / 3, 0, 2 / 1]
    assert rules.ties(base, tensors, [1, 3], half).tolist() == [-2, -2, 0, 2]
    # count: votes [+1 − 1 = 0 → +, −1, 0 → +, +1]: [3 / 1, −6 / 3, 0, 2 / 1]
    got = rules.ties(base, tensors, [1, 3], half, consensus="count")
    assert got.tolist() == [3, -2, 0, 2]
    # not normalized, λ = 0.5: sum-elected agreeing entries [−6, −6, 0, 2] · 0.5
    got = rules.ties(base, tensors, [1, 3], half, normalize=False, lambda_=0.5)
    assert got.tolist() == [-3, -3, 0, 1]
    # rescale: A ×‖A‖₁/‖A'‖₁ = 6.5/5 = 1.3 → [3.9, 0, 0, 2.6]; B × 6/4 → [−3, −3, 0, 0]
    # w = [1, 1]: Σ = [0.9, −3, 0, 2.6] → [3.9, −3, 0, 2.6]
    got = rules.ties(base, tensors, [1, 1], half, rescale=True)
    assert got.tolist() == pytest.approx([3.9, -3.0, 0.0, 2.6], rel=1e-6)
    # ‖δ‖₁ = 6e-8 < 1e-7: rescaled_masked_tensor leaves the kept 4e-8 as it is
    tiny = torch.tensor([[4e-8, 2e-8]])
    assert rules.ties(torch.zeros(2), tiny, [1], [0.5], rescale=True).tolist() == [
        pytest.approx(4e-8, rel=1e-6),
        0.0,
    ]
    # density 1 keeps every entry: plain TIES election over A and B
    assert rules.ties(base, tensors, [1, 1], [1, 1]).tolist() == [3, -1.5, 0.75, 1.5]


def test_dare_linear_by_hand():
    # one model, δ = [3, −1], density 0.5, rescaled to ‖δ‖₁ = 4 by outcome of the draw:
    # both kept: [3, −1]; first: [3, 0]·4/3 = [4, 0]; second: [0, −1]·4 = [0, −4];
    # none: ‖·‖₁ = 0 < 1e-7, left at [0, 0]
    by_hand = {(1, 1): [3, -1], (1, 0): [4, 0], (0, 1): [0, -4], (0, 0): [0, 0]}
    base, tensors = torch.zeros(2), torch.tensor([[3.0, -1.0]])
    seen = set()
    for seed in range(32):
        draw = torch.bernoulli(torch.full((2,), 0.5), generator=torch.Generator().manual_seed(seed))
        outcome = tuple(int(v) for v in draw.tolist())
        got = rules.dare(base, tensors, [1.0], [0.5], torch.Generator().manual_seed(seed), False)
        assert got.tolist() == pytest.approx(by_hand[outcome], rel=1e-6)
        seen.add(outcome)
    assert len(seen) == 4
    # no rescale: the kept entries as they are
    got = rules.dare(base, tensors, [2.0], [1.0], torch.Generator(), False, rescale=False)
    assert got.tolist() == [6.0, -2.0]  # density 1: no draw, 2·δ


def test_dare_ties_by_hand():
    # δA = [2], δB = [−3], density 0.5 each, one entry: kept as is (‖·‖₁ ratio 1)
    # both: Σ = −1 elects −, B: −3; A only: 2; B only: −3; none: Σ = 0 elects +, nobody: 0
    by_hand = {(1, 1): -3.0, (1, 0): 2.0, (0, 1): -3.0, (0, 0): 0.0}
    base, tensors = torch.zeros(1), torch.tensor([[2.0], [-3.0]])
    seen = set()
    for seed in range(32):
        generator = torch.Generator().manual_seed(seed)
        outcome = tuple(
            int(torch.bernoulli(torch.full((1,), 0.5), generator=generator)) for _ in range(2)
        )
        got = rules.dare(
            base, tensors, [1, 1], [0.5, 0.5], torch.Generator().manual_seed(seed), True
        )
        assert got.tolist() == [by_hand[outcome]]
        seen.add(outcome)
    assert len(seen) == 4


def test_dare_draws_as_mergekit_from_the_global_generator():
    """mergekit calls torch.bernoulli(full_like(δ, density)) on torch's default generator
    (seeded by --random-seed): the same seed in ``generator`` gives the same merge."""
    base = torch.zeros(3, 5)
    tensors = torch.arange(30, dtype=torch.float32).reshape(2, 3, 5) - 14.5
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        deltas = [
            (t - base) * torch.bernoulli(torch.full_like(t, d))
            for t, d in zip(tensors, [0.3, 0.6], strict=True)
        ]
    rescaled = [
        m * ((t - base).abs().sum() / m.abs().sum()) for m, t in zip(deltas, tensors, strict=True)
    ]
    expected = base + rescaled[0] * 1.0 + rescaled[1] * 0.5
    got = rules.dare(
        base, tensors, [1.0, 0.5], [0.3, 0.6], torch.Generator().manual_seed(1234), False
    )
    assert torch.equal(got, expected)


def test_low_precision_inputs_are_merged_in_float32():
    base = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    tensors = torch.tensor([[1.5, 2.5], [0.5, 3.0]], dtype=torch.float16)
    got = rules.task_arithmetic(base, tensors, [1.0, 1.0])
    assert got.dtype == torch.float32 and got.tolist() == [1.0, 3.5]


# --- settings refused ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda b, t: rules.linear(t, [1.0]), "weights: 1 given for 2"),
        (lambda b, t: rules.linear(t, [1.0, -1.0]), "sum to 0"),
        (lambda b, t: rules.linear(t[:0], []), "T >= 1"),
        (lambda b, t: rules.task_arithmetic(b, t, [1.0, math.nan]), "weight must be finite"),
        (lambda b, t: rules.task_arithmetic(b, t, [1, 1], lambda_=math.inf), "lambda"),
        (lambda b, t: rules.task_arithmetic(b[:1], t, [1, 1]), r"\[T, 1\], got \[2, 2\]"),
        (lambda b, t: rules.task_arithmetic(b.long(), t, [1, 1]), "floating-point"),
        (lambda b, t: rules.ties(b, t, [1, 1], [0.5, 0.0]), "density must be in"),
        (lambda b, t: rules.ties(b, t, [1, 1], [0.5, 1.5]), "density must be in"),
        (lambda b, t: rules.ties(b, t, [1, 1], [0.5, math.nan]), "density must be in"),
        (lambda b, t: rules.ties(b, t, [1, 1], [0.5]), "densities: 1 given for 2"),
        (lambda b, t: rules.ties(b, t, [1, 1], [0.4, 1]), "keeps int"),
        (lambda b, t: rules.ties(b, t, [1, 1], [1, 1], consensus="max"), "consensus"),
        (lambda b, t: rules.dare(b, t, [1, 1], [-0.1, 1], torch.Generator(), True), "density"),
        (lambda b, t: rules.dare(b, t, [1], [1, 1], torch.Generator(), False), "weights"),
    ],
)
def test_bad_settings_raise_bad_value(call, match):
    base, tensors = torch.zeros(2), torch.ones(2, 2)
    with pytest.raises(BadValue, match=match):
        call(base, tensors)
