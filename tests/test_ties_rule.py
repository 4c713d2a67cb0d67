"""The TIES rule's parts on their own: MagnitudeSelect (the streamed exact per-task
threshold) against torch.kthvalue, the torch rule and the compiled CPU kernel (with
undecided coordinates and a pending majority) against a per-coordinate transcription, and
the engine's fallback when the undecided values exceed their budget."""

from __future__ import annotations

import math

import naive
import naive_baselines
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import FACTORS, assert_states_equal, families, stored_as, written_model

import mergelab
import mergelab.engine.ties_blocks as ties_blocks
import mergelab.engine.ties_streamed as ties_streamed
import mergelab.engine.ties_undecided as ties_undecided
from mergelab.merging.magnitude_kernels import add_magnitude_counts
from mergelab.merging.quantile import MagnitudeSelect
from mergelab.merging.ties import PENDING, ties_vector
from mergelab.merging.ties_kernels import ties_merge, ties_merge_models

# integers and halves: many equal magnitudes, exact sums, both zeros
ENTRIES = st.one_of(st.integers(-4, 4).map(float), st.integers(-9, 9).map(lambda v: v / 2))
ENTRIES = st.one_of(ENTRIES, st.just(-0.0), st.floats(-1e3, 1e3, width=32))


@st.composite
def stacks(draw, max_tasks: int = 5, max_size: int = 40) -> torch.Tensor:
    tasks = draw(st.integers(1, max_tasks))
    size = draw(st.integers(1, max_size))
    values = draw(st.lists(ENTRIES, min_size=tasks * size, max_size=tasks * size))
    return torch.tensor(values, dtype=torch.float32).reshape(tasks, size)


@given(taus=stacks(max_size=300), data=st.data())
def test_magnitude_select_matches_kthvalue(taus, data):
    tasks, size = taus.shape
    rank = data.draw(st.integers(0, size - 1), label="rank")
    kernel = data.draw(st.booleans(), label="kernel")
    cut = data.draw(st.integers(0, size), label="cut")
    select = MagnitudeSelect(rank, size, tasks)
    for part in (taus[:, :cut], taus[:, cut:]):  # any chunking of the stream
        if kernel:
            add_magnitude_counts(part.contiguous().numpy(), select.counts.numpy())
        else:
            select.observe(part)
    select.locate()
    expected = [torch.kthvalue(row.abs(), rank + 1).values.item() for row in taus]
    lows, highs = select.bounds()
    for task in range(tasks):
        assert lows[task] <= expected[task] < highs[task]
        magnitudes = taus[task].abs()
        inside = taus[task][(magnitudes >= lows[task]) & (magnitudes < highs[task])]
        assert select.resolve(task, inside) == expected[task]
    if data.draw(st.booleans(), label="counted apart"):  # as threads count, then add
        select.add_low(select.low_counts(taus[:, cut:].contiguous()))
        select.add_low(select.low_counts(taus[:, :cut].contiguous()))
    else:
        select.observe_low(taus[:, cut:])
        select.observe_low(taus[:, :cut])
    assert select.values() == expected


def test_magnitude_select_refuses_misuse():
    with pytest.raises(ValueError, match="rank"):
        MagnitudeSelect(3, 3, 1)
    select = MagnitudeSelect(0, 3, 1)
    with pytest.raises(RuntimeError, match="locate"):
        select.bounds()
    select.observe(torch.ones(1, 2))
    with pytest.raises(RuntimeError, match="saw"):
        select.locate()  # one value missing
    select.observe(torch.ones(1, 1))
    select.locate()
    with pytest.raises(RuntimeError, match="1 values in the bucket"):
        select.resolve(0, torch.ones(1))  # the bucket holds 3


def _naive_rule(taus, thresholds, undecided_from, majority, mean):
    """Coordinate by coordinate, in Python floats: (merged with None where undecided,
    votes, sign ties), as ties_vector's docstring defines them."""
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    merged, votes, ties = [], 0, 0
    for column in taus.T.tolist():
        magnitudes = [abs(float(np.float32(v))) for v in column]
        limits = list(zip(magnitudes, thresholds, undecided_from, strict=True))
        kept = [v if m >= t else 0.0 for v, (m, t, _) in zip(column, limits, strict=True)]
        open_ = any(u <= m < t for m, t, u in limits)
        total = sum(kept)
        tie = total == 0 and any(v != 0 for v in kept)
        if open_ or (tie and majority == PENDING):
            merged.append(None)
            continue
        elected = sign(total) or (1 if majority > 0 else -1)
        agreeing = [v for v in kept if (v > 0 if elected > 0 else v < 0)]
        merged.append(sum(agreeing) / (len(agreeing) if mean and agreeing else 1))
        votes += sign(total)
        ties += tie
    return merged, votes, ties


@given(
    taus=stacks(),
    data=st.data(),
    majority=st.sampled_from([1, 0, -1, PENDING]),
    mean=st.booleans(),
    float64=st.booleans(),
)
@settings(max_examples=300)
def test_rule_and_kernel_match_the_transcription(taus, data, majority, mean, float64):
    """Thresholds drawn among the magnitudes themselves, so that ties at a threshold and
    entries inside the undecided range are common."""
    tasks = taus.shape[0]
    magnitudes = [*sorted(set(taus.abs().reshape(-1).tolist())), math.inf]
    thresholds = [data.draw(st.sampled_from(magnitudes), label="threshold") for _ in range(tasks)]
    undecided = data.draw(st.booleans(), label="undecided")
    lows = [data.draw(st.sampled_from([m for m in magnitudes if m <= t])) for t in thresholds]
    lows = lows if undecided else thresholds
    if float64:
        taus = taus.double()
    expected, votes, ties = _naive_rule(taus, thresholds, lows, majority, mean)
    part = ties_vector(taus, thresholds, majority, mean, lows)
    out = torch.empty(taus.shape[1], dtype=taus.dtype)
    limits = [np.asarray(v, dtype=np.float32) for v in (thresholds, lows)]
    kernel = ties_merge(taus.numpy(), *limits, majority, mean, out.numpy())
    # from the models' rows: θ0 drawn, θt = θ0 + τt where that is exact in floats
    base = torch.tensor(data.draw(st.lists(ENTRIES, min_size=len(out), max_size=len(out))))
    base = base.to(taus.dtype)
    base = torch.where(((base + taus) - base == taus).all(0), base, 0)
    models = torch.cat([base[None], base + taus])
    from_models, kept = torch.empty_like(out), np.zeros((2, tasks), np.int64)
    size, capacity = len(out), len(out) * tasks + 1
    columns, held_counts = np.empty(size, np.int64), np.empty(size, np.int32)
    owners, band_owners = np.empty(capacity, np.int16), np.empty(capacity, np.int16)
    values, band = np.empty(capacity, taus.numpy().dtype), np.empty(capacity, np.float32)
    *kernel_models, held, _, _, finite = ties_merge_models(
        models.numpy(),
        *limits,
        majority,
        mean,
        from_models.numpy(),
        kept,
        columns,
        held_counts,
        owners,
        values,
        band_owners,
        band,
    )
    assert finite  # the entries are finite, their differences too
    assert columns[:held].tolist() == torch.isnan(from_models).nonzero().reshape(-1).tolist()
    magnitudes = taus.abs().float()
    pairs = list(zip(magnitudes, thresholds, strict=True))
    assert kept.tolist() == [
        [int((m >= t).sum()) for m, t in pairs],
        [int((m > t).sum()) for m, t in pairs],
    ]
    outputs = (part.merged, (part.votes, part.sign_ties)), (out, kernel)
    for merged, counts in (*outputs, (from_models, tuple(kernel_models))):
        assert counts == (votes, ties)
        for got, want in zip(merged.tolist(), expected, strict=True):
            if want is None:
                assert math.isnan(got)
            else:  # integer sums are exact; a mean rounds once
                assert got == pytest.approx(want, rel=1e-6, abs=0)


@given(
    family=families(),
    factor=FACTORS,
    share=st.sampled_from([1.0, 0.5, 0.2, 0.05]),
    budget=st.sampled_from([0, 10]),
)
@settings(max_examples=60)
def test_ties_with_and_without_room_for_undecided_values(family, factor, share, budget):
    """Room for every undecided value (the thresholds pinned from them, the held
    coordinates merged again), or none (a second counting pass pins the thresholds, and
    the parameters with sign ties are read and merged again)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ties_undecided, "UNDECIDED_BUDGET", budget)
        merged = mergelab.ties(family.pretrained, family.finetuned, factor, keep=share)
    delta = naive_baselines.ties_merged(family.pretrained, family.finetuned, share, False)
    assert_states_equal(merged, naive.assemble(family.pretrained, delta, factor))


@pytest.mark.parametrize("budget", [0, 10])  # none, or room for every value
def test_undecided_votes_decide_the_majority(budget):
    """Hand-worked: each task keeps its top half, threshold 1; the coordinates 0 and 1 sum
    to exactly 0 (elected by the majority), coordinate 2's entries lie on the thresholds
    (undecided in the merge pass) and its vote, +1, is the only one: δ = [5, 5, 2, 0]."""
    pretrained = {"w": torch.zeros(4)}
    finetuned = {
        "a": {"w": torch.tensor([5.0, 5.0, 1.0, 0.0])},
        "b": {"w": torch.tensor([-5.0, -5.0, 1.0, 0.0])},
    }
    expected = naive.ties_multitask_vector(pretrained, finetuned, 0.5)
    assert expected["w"].tolist() == [5.0, 5.0, 2.0, 0.0]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ties_undecided, "UNDECIDED_BUDGET", budget)
        pool = mergelab.ModelPool(pretrained, finetuned)
        delta = mergelab.ties_merged_vector(mergelab.TaskVectors(pool, "cpu"), 0.5)
    assert_states_equal(delta, expected)


def _sample_everything(patch: pytest.MonkeyPatch) -> None:
    """The one pass's sample made the whole model, its bands at 0 standard errors (they
    hold: the sample is everything) and never refused as too wide."""
    patch.setattr(ties_blocks, "SAMPLE_EVERY", 1)
    patch.setattr(ties_blocks, "BAND_ERRORS", 0.0)
    patch.setattr(ties_blocks, "WIDEST_BAND", math.inf)


@given(
    family=families(),
    share=st.sampled_from([1.0, 0.5, 0.2, 0.05]),
    budget=st.sampled_from([0, 10]),
    mean=st.booleans(),
    sampled=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
@settings(max_examples=60)
def test_ties_parameter_by_parameter_matches_naive(family, share, budget, mean, sampled, dtype):
    """The path that writes models to files (StreamedTies), as ``mergelab merge`` writes:
    one pass placed by a sample writing a provisional δ, settled in place or written
    again (``sampled``, with room for the undecided values), or thresholds and majority
    from passes over blocks, then each parameter's δ; with and without room for the
    undecided values. The models stored in ``dtype``: bfloat16 rows are widened by the
    one pass's kernel as it reads them, θ0 at the set-aside coordinates from its bits."""
    pretrained = stored_as(family.pretrained, dtype)
    finetuned = {task: stored_as(model, dtype) for task, model in family.finetuned.items()}
    with pytest.MonkeyPatch.context() as patch:
        if sampled:
            _sample_everything(patch)
        patch.setattr(ties_undecided, "UNDECIDED_BUDGET", budget)
        pool = mergelab.ModelPool(pretrained, finetuned)
        streamed = ties_streamed.StreamedTies(pool, share, mean)
        model = written_model(pool, streamed)
    delta = naive_baselines.ties_merged(family.pretrained, family.finetuned, share, mean)
    expected = naive.assemble(family.pretrained, delta, 1.0)
    assert_states_equal(model, stored_as(expected, dtype))


@pytest.mark.parametrize("budget", [0, 10])
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize(
    ("third", "expected"),
    [(1.0, [5, 5, 2, 0.5, 0.5, 0]), (-1.0, [-5, -5, -2, -0.5, -0.5, 0])],
)
def test_streamed_ties_votes_decide_the_majority(budget, sampled, third, expected):
    """Hand-worked, written as ``mergelab merge`` writes it: a = [5, 5, third, 0.5, 0.5,
    0.25], b = [−5, −5, third, −0.5, −0.5, 0.25], keeping the top half (threshold 0.5).
    Coordinates 0, 1, 3 and 4 sum to exactly 0 and take the majority sign, which
    coordinate 2 alone elects (3 and 4 vote 0, 5 is trimmed). Sampled, with room: the
    one pass holds 2, 3 and 4 (an entry inside the band) and decides 0 and 1 under +1;
    the model is corrected in place where the sign is +1, written again where it is −1.
    Without room (budget 0), or unsampled, passes find the thresholds and the sign
    first."""
    pretrained = {"w": torch.zeros(6)}
    finetuned = {
        "a": {"w": torch.tensor([5.0, 5.0, third, 0.5, 0.5, 0.25])},
        "b": {"w": torch.tensor([-5.0, -5.0, third, -0.5, -0.5, 0.25])},
    }
    settled = []
    settle = ties_streamed.StreamedTies.settle
    with pytest.MonkeyPatch.context() as patch:
        if sampled:
            _sample_everything(patch)
        patch.setattr(ties_undecided, "UNDECIDED_BUDGET", budget)
        spy = lambda self: settled.append(settle(self)) or settled[-1]  # noqa: E731
        patch.setattr(ties_streamed.StreamedTies, "settle", spy)
        pool = mergelab.ModelPool(pretrained, finetuned)
        model = written_model(pool, ties_streamed.StreamedTies(pool, 0.5))
    assert model["w"].tolist() == expected
    naive_delta = naive.ties_multitask_vector(pretrained, finetuned, 0.5)
    assert_states_equal(model, naive.assemble(pretrained, naive_delta, 1.0))
    if not sampled or budget == 0:  # the passes first: nothing provisional
        assert settled == [{}]
    elif third > 0:  # corrected in place
        assert settled[0]["w"].positions.tolist() == [2, 3, 4]
        assert settled[0]["w"].delta.tolist() == [2.0, 0.5, 0.5]
    else:
        assert settled == [None]


@pytest.mark.parametrize("share", [1.0, 0.5])  # everything kept, or a threshold to find
def test_streamed_ties_names_a_task_vector_with_nan(share):
    pretrained = {"w": torch.zeros(4)}
    finetuned = {"a": {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}, "b": {"w": torch.ones(4)}}
    finetuned["b"]["w"][2] = float("nan")
    with pytest.raises(ValueError, match="task vector of 'b' has NaN or Inf values at 'w'"):
        ties_streamed.StreamedTies(mergelab.ModelPool(pretrained, finetuned), share)


@pytest.mark.parametrize(("middle", "votes_passes"), [("shared", 1), ("spread", 2)])
def test_counting_passes_take_a_full_bucket_for_one_shared_magnitude(middle, votes_passes):
    """The counting passes (the sample's bands refused) with room for no held entry: each
    task's threshold bucket is taken for one magnitude its entries share, and decided at
    its floor. τ of 16 entries 0.5, 32 in the middle and 16 of 2 (b's rolled), keeping
    the top 32: the threshold is the 16th of the middle. Shared (all 1), the votes pass's
    low counts confirm it is the bucket's floor; spread (1 + k·2⁻²³, one bucket), they
    refute it, and a third pass votes at the exact thresholds. Both give naive's δ."""
    ulps = torch.arange(32.0) * 2**-23 if middle == "spread" else torch.zeros(32)
    values = torch.cat([torch.full((16,), 0.5), 1 + ulps, torch.full((16,), 2.0)])
    pretrained = {"w": torch.zeros(64)}
    # no sum of exactly 0: no coordinate waits for the majority sign
    finetuned = {"a": {"w": values}, "b": {"w": values.roll(7)}}
    calls = []
    votes = ties_streamed.StreamedTies._votes
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ties_streamed, "sampled_bands", lambda *args: None)
        patch.setattr(ties_undecided, "UNDECIDED_BUDGET", 0)
        patch.setattr(
            ties_streamed.StreamedTies,
            "_votes",
            lambda self, *args, **kwargs: calls.append(args) or votes(self, *args, **kwargs),
        )
        streamed = ties_streamed.StreamedTies(mergelab.ModelPool(pretrained, finetuned), 0.5)
    assert len(calls) == votes_passes
    assert calls[0][0] == calls[0][1] == [1.0, 1.0]  # thresholds and undecided_from: floors
    expected = naive.ties_multitask_vector(pretrained, finetuned, 0.5)
    assert_states_equal({"w": streamed("w")}, expected)
