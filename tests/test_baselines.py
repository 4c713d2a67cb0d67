"""TIES, DARE, TATR + TIES and TALL masks over another method's τMTL, against the naive
transcriptions of tests/naive.py and tests/naive_baselines.py on random models."""

from __future__ import annotations

import functools

import naive
import naive_baselines
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import FACTORS, LAMBDA_GRID, assert_states_equal, families, make_family

import mergelab
from mergelab.engine.parameterwise import TaskVectors, resolve_device, summed_vector
from mergelab.methods import Dare, Isotropic, TallMasks, TaskArithmetic, Ties, TrustRegion

SHARES = st.sampled_from([1.0, 0.5, 0.2, 0.05])


def _close(actual, expected, scale=1.0):
    for key in expected:
        torch.testing.assert_close(
            actual[key].double(), expected[key].double(), rtol=1e-6, atol=1e-5 * scale, msg=key
        )


@given(family=families(), factor=FACTORS, share=SHARES, mean=st.booleans())
def test_ties_matches_naive(family, factor, share, mean):
    """Integer-valued models: the trimmed sums are exact; the mean rounds once."""
    merged = mergelab.ties(
        family.pretrained, family.finetuned, factor, keep=share, disjoint_mean=mean, device="cpu"
    )
    delta = naive_baselines.ties_merged(family.pretrained, family.finetuned, share, mean)
    expected = naive.assemble(family.pretrained, delta, factor)
    if mean:
        _close(merged, expected)
    else:
        assert_states_equal(merged, expected)


@given(
    family=families(),
    factor=FACTORS,
    p=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
    seed=st.integers(0, 3),
)
def test_dare_matches_naive(family, factor, p, seed):
    """DARE + Task Arithmetic: the naive dropped vectors summed, task by task."""
    merged = mergelab.dare(family.pretrained, family.finetuned, factor, p, seed, device="cpu")
    assert_states_equal(merged, _naive_dare(family, factor, p, seed))


def _naive_dare(family, factor: float, p: float, seed: int):
    dropped = naive_baselines.dropped_task_vectors(family.pretrained, family.finetuned, p, seed)
    delta = {}
    for key in naive.merged_keys(family.pretrained):
        parts = [dropped[t][key] for t in dropped]
        delta[key] = parts[0].clone()
        for part in parts[1:]:
            delta[key] = delta[key] + part
    return naive.assemble(family.pretrained, delta, factor)


def test_dare_streamed_in_blocks_matches_naive():
    """A parameter of several of the engine's blocks (the CPU path drops and sums block by
    block, on threads), real floats: the naive whole-parameter drop and sum, to the bit,
    and the whole-parameter path's δ too."""
    family = make_family(1, [(400, 700), (3,)], 3, integer=False)
    assert 2 * mergelab.ModelPool(family.pretrained, family.finetuned).chunk < 400 * 700
    merged = mergelab.dare(family.pretrained, family.finetuned, 0.3, 0.5, 2)
    assert_states_equal(merged, _naive_dare(family, 0.3, 0.5, 2))
    pool = mergelab.ModelPool(family.pretrained, family.finetuned)
    whole = TaskVectors(pool, "cpu", [mergelab.engine.dare.DareDrop(pool.tasks, 0.5, 2)])
    streamed = mergelab.dare_vector(pool, 0.5, 2)
    assert_states_equal(streamed, summed_vector(whole))


@given(family=families(), p=st.sampled_from([0.5, 0.75]), share=SHARES)
def test_dare_ties_is_ties_over_the_dropped_models(family, p, share):
    """The naive TIES of the dropped vectors, given as models over a zero θ0 (so that
    τ = θ − 0 is exact). The rescaling 1/(1 − p) is a power of two, so the dropped
    integer-valued vectors and their sums stay exact. With p = 0.1 hypothesis found a
    coordinate whose dropped entries (4, 4, 1, −3, −6)/0.9 sum to 0 exactly, to −4.8e-7 in
    float32 and to 0 in float64: the elected sign there is rounding's choice, not the
    rule's."""
    pool = mergelab.ModelPool(family.pretrained, family.finetuned)
    delta = mergelab.dare_vector(pool, p, 0, ties=share, device="cpu")
    dropped = naive_baselines.dropped_task_vectors(family.pretrained, family.finetuned, p, 0)
    zero = {key: torch.zeros_like(value) for key, value in dropped[family.tasks[0]].items()}
    _close(delta, naive.ties_multitask_vector(zero, dropped, share))


def test_dare_drops_at_the_rate_and_keeps_the_expected_value():
    family = make_family(0, [(400, 500)], 2, integer=False)
    pool = mergelab.ModelPool(family.pretrained, family.finetuned)
    taus = naive.task_vectors(family.pretrained, family.finetuned)
    for p in (0.3, 0.9):
        dropped = mergelab.TaskVectors(pool, "cpu", [mergelab.engine.dare.DareDrop(pool.tasks, p)])
        values = dropped("blocks.0.weight")
        for row, task in zip(values, pool.tasks, strict=True):
            kept = row != 0
            assert abs(kept.float().mean().item() - (1 - p)) < 0.01
            tau = taus[task]["blocks.0.weight"]
            assert torch.equal(row[kept], tau[kept] / (1 - p))


def test_dare_masks_do_not_depend_on_task_order():
    family = make_family(1, [(6, 7), (5,)], 3, integer=False)
    reordered = dict(reversed(list(family.finetuned.items())))
    drop = mergelab.engine.dare.DareDrop
    for key in ("blocks.0.weight", "blocks.1.weight"):
        forward = mergelab.TaskVectors(
            mergelab.ModelPool(family.pretrained, family.finetuned),
            "cpu",
            [drop(list(family.finetuned), 0.5)],
        )(key).clone()
        backward = mergelab.TaskVectors(
            mergelab.ModelPool(family.pretrained, reordered), "cpu", [drop(list(reordered), 0.5)]
        )(key)
        assert torch.equal(forward, backward.flip(0))


@given(family=families(), q=st.sampled_from([0.99, 0.9, 0.5]), share=SHARES, grads=st.booleans())
@settings(max_examples=40)
def test_trust_region_ties_is_ties_over_the_masked_models(family, q, share, grads):
    """TATR + TIES: the trust region's mask applied to every task vector, then TIES."""
    gradients = family.gradients if grads else None
    pool = mergelab.ModelPool(family.pretrained, family.finetuned)
    tatr = mergelab.trust_region_vector(pool, q, gradients)
    mask = mergelab.engine.trust_region.TrustRegionMask(pool, tatr.threshold, gradients)
    delta = mergelab.ties_merged_vector(mergelab.TaskVectors(pool, "cpu", [mask]), share)
    masked = naive_baselines.masked_models(family.pretrained, family.finetuned, q, gradients)
    expected = naive.ties_multitask_vector(family.pretrained, masked, share)
    assert_states_equal(delta, expected)


@given(
    family=families(),
    lambdas=st.sampled_from([LAMBDA_GRID, (0.5,), (0.3, 1.0)]),
    share=SHARES,
)
def test_tall_masks_over_any_multitask_vector(family, lambdas, share):
    """TALL's masks of a given τMTL (here TIES's, exact on integer models) are the naive
    masks of that τMTL."""
    pool = mergelab.ModelPool(family.pretrained, family.finetuned)
    mtl = mergelab.ties_merged_vector(mergelab.TaskVectors(pool, "cpu"), share)
    masks = mergelab.TallMasks.build(
        family.pretrained,
        family.finetuned,
        lambdas,
        multitask=mtl,
        multitask_settings={"method": "ties"},
    )
    expected = naive.tall_masks(family.pretrained, family.finetuned, lambdas, mtl)
    assert masks.multitask == {"method": "ties"}
    for task in family.tasks:
        for lam in lambdas:
            for key in mtl:
                assert torch.equal(masks.mask(task, lam, key), expected[task][lam][key])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Ties(keep=0), "keep"),
        (lambda: Ties(keep=1.5), "keep"),
        (lambda: Dare(drop_rate=1.0), "drop_rate"),
        (lambda: Dare(drop_rate=[0.5, -0.1]), "drop_rate"),
        (lambda: Dare(ties=0), "keep"),
        (lambda: Isotropic(common_subspace=1.5), "1.5"),
        (lambda: TrustRegion(ties=2.0), "keep"),
        (lambda: TallMasks(multitask=TallMasks()), "does not merge into one task vector"),
        (lambda: TallMasks(multitask=TrustRegion(threshold_quantile=[0.9, 0.99])), "one"),
    ],
)
def test_bad_settings_refused_when_constructed(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_tall_masks_describe_their_multitask_method():
    described = TallMasks(multitask=Ties(keep=0.2)).describe()
    assert described["multitask"] == {
        "method": "ties",
        "scaling_factor": [0.3],
        "keep": 0.2,
        "disjoint_mean": False,
    }
    assert (
        TallMasks(multitask=TaskArithmetic()).describe()["multitask"]["method"] == "task_arithmetic"
    )


def test_a_missing_cuda_device_is_refused_by_name():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="'cuda:0': CUDA is not available"):
        resolve_device("cuda:0")
    assert resolve_device(None).type == "cpu"


@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
    tasks=st.integers(1, 3),
    p=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
    keys=st.lists(st.integers(0, 2**32 - 1), min_size=3, max_size=3),
    float64=st.booleans(),
)
def test_dare_drop_kernel_and_torch_path_match_the_hash(shape, tasks, p, keys, float64):
    """Both ways of dropping (in place on the CPU, or a mask and torch.where for another
    device) against the transcribed hash of tests/naive_baselines.py."""
    from mergelab.merging.dare import dare_drop, dare_drop_

    dtype = torch.float64 if float64 else torch.float32
    taus = torch.randn(tasks, *shape, generator=torch.Generator().manual_seed(keys[0]))
    taus = taus.to(dtype)
    keys = keys[:tasks]
    numel = taus[0].numel()
    expected = torch.stack(
        [
            torch.where(
                torch.tensor([d / 2**24 >= p for d in naive_baselines.hashed_draws(k, numel)]),
                row.reshape(-1) / (1 - p),
                0.0,
            ).reshape(shape)
            for k, row in zip(keys, taus, strict=True)
        ]
    )
    assert torch.equal(dare_drop(taus, p, keys), expected)
    assert torch.equal(dare_drop_(taus.clone(), p, keys), expected)


@given(
    blocks=st.integers(0, 3),
    size=st.integers(1, 9000),
    key=st.integers(0, 2**32 - 1),
    high=st.booleans(),
)
def test_dare_drop_of_a_block_draws_as_the_whole_parameter(blocks, size, key, high):
    """The fused drop and sum of one task's block of columns from an offset (a block of
    the engine's; θ0 = 0, so τ is θ exactly): the transcribed hash at their own flat
    indices, across 2^32 too."""
    from mergelab.merging.dare import dropped_sum
    from mergelab.merging.dare_kernels import BLOCK

    offset = blocks * BLOCK + (2**32 - 2 * BLOCK if high else 0)
    models = torch.randn(2, size, generator=torch.Generator().manual_seed(key))
    models[0] = 0
    draws = naive_baselines.hashed_draws(key, size, start=offset)
    expected = torch.where(torch.tensor([d / 2**24 >= 0.5 for d in draws]), models[1] / 0.5, 0.0)
    out = torch.empty(size)
    assert dropped_sum(models, 0.5, [key], offset, out=out)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="not a multiple"):
        dropped_sum(models, 0.5, [key], offset + 1, out=out)
    models[1, -1] = float("nan")  # dropped or not, it is seen
    assert not dropped_sum(models, 0.5, [key], offset, out=out)


MERGES_FROM_ROWS = {
    "task_arithmetic": mergelab.task_arithmetic,
    "dare": functools.partial(mergelab.dare, drop_rate=0.999),
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("merge", sorted(MERGES_FROM_ROWS))
def test_a_task_vector_with_nan_or_inf_is_named_even_where_dropped(bad, merge):
    """The CPU paths that sum from the models' rows name the task; DARE at p = 0.999
    drops the bad coordinate from the sum (checked), and still names it."""
    from mergelab.merging.dare import drop_seed, keep_mask

    assert not keep_mask((3000,), 0.999, [drop_seed(0, "b", "w")])[0, 2900]  # DARE drops it
    pretrained = {"w": torch.zeros(3000)}
    finetuned = {"a": {"w": torch.ones(3000)}, "b": {"w": torch.ones(3000)}}
    finetuned["b"]["w"][2900] = bad
    with pytest.raises(ValueError, match="task vector of 'b' has NaN or Inf values at 'w'"):
        MERGES_FROM_ROWS[merge](pretrained, finetuned, 0.3)


def test_a_sum_that_overflows_is_named():
    pretrained = {"w": torch.zeros(3000)}
    finetuned = {task: {"w": torch.ones(3000)} for task in "ab"}
    for task in "ab":
        finetuned[task]["w"][2900] = 3e38  # finite; their sum is not, in float32
    with pytest.raises(ValueError, match=r"merging 'w' overflows torch\.float32"):
        mergelab.task_arithmetic(pretrained, finetuned, 0.3)
