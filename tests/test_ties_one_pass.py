"""TIES in one pass from the models' rows (engine.ties_blocks.banded_ties_vector): each
task's threshold placed in a band by a sample, the coordinates outside every band merged
at once, the others held and settled; and its way back to the counting passes when the
band misses or the held values exceed their budget. Against the naive transcription."""

from __future__ import annotations

import math

import naive
import naive_baselines
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import assert_states_equal, families, stored_as, written_model

import mergelab
import mergelab.engine.pool as pool_module
import mergelab.engine.ties_blocks as ties_blocks
import mergelab.engine.ties_streamed as ties_streamed
import mergelab.engine.ties_undecided as ties_undecided
from mergelab.engine.workspace import BlockWorkers
from mergelab.merging.ties import ties_rank


def _one_pass(pretrained, finetuned, share, mean=False):
    with BlockWorkers() as workers:
        pool = mergelab.ModelPool(pretrained, finetuned)
        return ties_blocks.banded_ties_vector(pool, share, mean, workers)


@given(
    family=families(),
    share=st.sampled_from([1.0, 0.5, 0.2, 0.05]),
    mean=st.booleans(),
    errors=st.sampled_from([0.0, 8.0]),
    run_entries=st.sampled_from([1, 7, 1 << 22]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
@settings(max_examples=60)
def test_one_pass_matches_naive_when_its_sample_is_everything(
    family, share, mean, errors, run_entries, dtype
):
    """A sample of every coordinate: each band holds its threshold (at 0 standard errors
    too), and with room for the held entries the one pass settles every coordinate, the
    held parts in runs of any length; over models stored in ``dtype`` (bfloat16: the
    kernel widens the stored rows)."""
    pretrained = stored_as(family.pretrained, dtype)
    finetuned = {task: stored_as(model, dtype) for task, model in family.finetuned.items()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ties_undecided, "RUN_ENTRIES", run_entries)
        patch.setattr(ties_blocks, "SAMPLE_EVERY", 1)
        patch.setattr(ties_blocks, "BAND_ERRORS", errors)
        patch.setattr(ties_blocks, "WIDEST_BAND", math.inf)
        patch.setattr(ties_undecided, "UNDECIDED_BUDGET", math.inf)
        delta = _one_pass(pretrained, finetuned, share, mean)
    assert delta is not None
    expected = naive_baselines.ties_merged(family.pretrained, family.finetuned, share, mean)
    assert_states_equal(delta, expected)


@given(family=families(), share=st.sampled_from([1.0, 0.5, 0.2]))
@settings(max_examples=30)
def test_without_room_for_held_values_the_counting_passes_merge(family, share):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ties_blocks, "SAMPLE_EVERY", 1)
        patch.setattr(ties_blocks, "WIDEST_BAND", math.inf)
        patch.setattr(ties_undecided, "UNDECIDED_BUDGET", 0)
        merged = mergelab.ties(family.pretrained, family.finetuned, 0.5, keep=share)
    delta = naive_baselines.ties_merged(family.pretrained, family.finetuned, share, False)
    assert_states_equal(merged, naive.assemble(family.pretrained, delta, 0.5))


def test_held_entries_over_budget_hand_over_to_the_counting_passes():
    """Hand-worked: everything kept (no sample, no band), coordinates 0 and 1 sum to
    exactly 0 and wait for the majority: four held entries, over a budget of none."""
    pretrained = {"w": torch.zeros(4)}
    finetuned = {
        "a": {"w": torch.tensor([5.0, 5.0, 1.0, 0.0])},
        "b": {"w": torch.tensor([-5.0, -5.0, 1.0, 0.0])},
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ties_undecided, "UNDECIDED_BUDGET", math.inf)
        assert _one_pass(pretrained, finetuned, 1.0) is not None
        patch.setattr(ties_undecided, "UNDECIDED_BUDGET", 0)
        assert _one_pass(pretrained, finetuned, 1.0) is None
        merged = mergelab.ties(pretrained, finetuned, 1.0, keep=1.0)
    expected = naive.ties_multitask_vector(pretrained, finetuned, 1.0)
    assert_states_equal(merged, naive.assemble(pretrained, expected, 1.0))


def test_a_band_that_misses_its_threshold_hands_over_to_the_counting_passes():
    """Hand-made: the sample of the one 32-value parameter is its first two coordinates,
    whose entries (0.01) are far below the threshold of the top half (the entries from
    1 to 30): the band from the sample misses it."""
    pretrained = {"w": torch.zeros(32)}
    values = torch.cat([torch.full((2,), 0.01), torch.arange(1.0, 31.0)])
    finetuned = {"a": {"w": values}, "b": {"w": -values.flip(0)}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ties_blocks, "WIDEST_BAND", math.inf)
        assert _one_pass(pretrained, finetuned, 0.5) is None
        merged = mergelab.ties(pretrained, finetuned, 1.0, keep=0.5)
    expected = naive.ties_multitask_vector(pretrained, finetuned, 0.5)
    assert_states_equal(merged, naive.assemble(pretrained, expected, 1.0))


def _noisy_models():
    """Three parameters (one of them 2.3 blocks long, 331,000 values in all) and two
    tasks of float32 noise."""
    gen = torch.Generator().manual_seed(7)
    shapes = {"blocks.0.weight": (300, 1000), "blocks.0.bias": (1000,), "proj": (200, 150)}
    pretrained = {key: torch.randn(shape, generator=gen) for key, shape in shapes.items()}
    finetuned = {
        task: {
            key: value + 0.01 * torch.randn(value.shape, generator=gen)
            for key, value in pretrained.items()
        }
        for task in ("a", "b")
    }
    return pretrained, finetuned


def test_one_pass_on_real_floats_over_several_blocks():
    """Unpatched, on models large enough for its sample, in float32 noise: the one pass
    settles the thresholds and gives the naive transcription's bits (two tasks: every sum
    is one rounding, as in float64 then cast)."""
    pretrained, finetuned = _noisy_models()
    delta = _one_pass(pretrained, finetuned, 0.2)
    assert delta is not None
    assert_states_equal(delta, naive.ties_multitask_vector(pretrained, finetuned, 0.2))


@given(most=st.integers(1 << 12, 1 << 14))
@settings(max_examples=5, deadline=None)
def test_a_large_model_samples_about_sample_most_values(most):
    """Past SAMPLE_MOST · 16 values the sample thins to about SAMPLE_MOST, in fewer pieces
    of the same length, spread over every parameter; TIES gives the naive bits (from the
    one pass, or from the counting passes where so small a sample cannot place a band)."""
    pretrained, finetuned = _noisy_models()
    sampled = []
    count = ties_blocks._sample_counts

    def spy(pool, pieces, workers):
        sampled.extend(pieces)
        return count(pool, pieces, workers)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pool_module, "SAMPLE_MOST", most)
        patch.setattr(ties_blocks, "_sample_counts", spy)
        merged = mergelab.ties(pretrained, finetuned, 1.0, keep=0.2)
    values = sum(part.stop - part.start for _, part in sampled)
    assert most / 2 <= values <= most + len(sampled)  # each piece rounded up
    assert {key for key, _ in sampled} == set(pretrained)
    expected = naive.ties_multitask_vector(pretrained, finetuned, 0.2)
    assert_states_equal(merged, naive.assemble(pretrained, expected, 1.0))


@given(
    total=st.integers(0, 1 << 20),
    every=st.integers(1, 32),
    most=st.integers(1, 1 << 12),
)
def test_sample_every_takes_one_in_every_unless_that_holds_over_sample_most(total, every, most):
    """The smallest one-in-k, k ≥ ``every``, whose sample of ``total`` values holds at most
    SAMPLE_MOST of them (counted up from ``every``)."""
    k = every
    while total / k > most:
        k += 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pool_module, "SAMPLE_MOST", most)
        assert pool_module.sample_every(total, every) == k


@pytest.mark.parametrize("share", [1.0, 0.5])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -3e38])
def test_one_pass_names_a_task_vector_with_nan(share, bad):
    """NaN and ±Inf in a model, and finite models whose difference overflows float32."""
    pretrained = {"w": torch.tensor([0.0, 0.0, 3e38, 0.0])}
    finetuned = {"a": {"w": torch.tensor([1.0, 2.0, 3e38, 4.0])}, "b": {"w": torch.ones(4)}}
    finetuned["b"]["w"][2] = bad
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ties_blocks, "SAMPLE_EVERY", 1)
        patch.setattr(ties_blocks, "WIDEST_BAND", math.inf)
        patch.setattr(ties_undecided, "UNDECIDED_BUDGET", math.inf)
        with pytest.raises(ValueError, match="task vector of 'b' has NaN or Inf values at 'w'"):
            _one_pass(pretrained, finetuned, share)


def _lattice_models(shapes: dict, tasks: int, seed: int) -> tuple[dict, dict]:
    """bf16 models whose base entries all lie in [1, 2), so that every τ is a multiple of
    2⁻⁷ (bf16's spacing there) of a few such steps: each magnitude is shared by a large
    share of the entries, as in bf16 language models' task vectors."""
    gen = torch.Generator().manual_seed(seed)
    pretrained = {
        key: (1 + torch.rand(shape, generator=gen)).bfloat16() for key, shape in shapes.items()
    }
    finetuned = {
        f"task{task}": {
            key: (value.float() + 0.02 * torch.randn(value.shape, generator=gen)).bfloat16()
            for key, value in pretrained.items()
        }
        for task in range(tasks)
    }
    return pretrained, finetuned


def _float32(state: dict) -> dict:
    return {key: value.float() for key, value in state.items()}


def _settled_by(patch: pytest.MonkeyPatch) -> list:
    """What each StreamedTies.settle returns, from now on."""
    settled = []
    settle = ties_streamed.StreamedTies.settle
    spy = lambda self: settled.append(settle(self)) or settled[-1]  # noqa: E731
    patch.setattr(ties_streamed.StreamedTies, "settle", spy)
    return settled


def test_one_pass_places_thresholds_on_magnitudes_many_entries_share():
    """Unpatched, on bf16 models whose τ sit on a few values, each threshold one of them
    (about a sixth of the entries): the sample's band stops below it and the pass counts
    the entries at and above it, so each threshold is found without holding them. The
    one pass in memory, and the one pass that writes a model (corrected in place), give
    the naive transcription's bits (τ and their sums are exact in float32, as in the
    naive float64; the written model rounds θ0 + δ once to bf16)."""
    shapes = {"layers.0.weight": (256, 1024), "layers.0.bias": (1024,), "head": (300, 200)}
    pretrained, finetuned = _lattice_models(shapes, 3, seed=11)
    wide = _float32(pretrained), {task: _float32(model) for task, model in finetuned.items()}
    share = 0.2
    taus = naive.task_vectors(*wide)
    expected_thresholds = [naive.ties_threshold(tau, share) for tau in taus.values()]
    expected = naive.ties_multitask_vector(*wide, share)
    with BlockWorkers() as workers:
        pool = mergelab.ModelPool(pretrained, finetuned)
        rank = ties_rank(share, pool.num_merged_params)
        lows, highs = ties_blocks.sampled_bands(pool, rank, workers, budget=0.25)
        assert lows == highs == expected_thresholds  # empty bands: nothing to hold
        delta = ties_blocks.banded_ties_vector(pool, share, False, workers)
    assert delta is not None
    assert_states_equal(delta, expected)
    with pytest.MonkeyPatch.context() as patch:
        settled = _settled_by(patch)
        streamed = ties_streamed.StreamedTies(pool, share)
        model = written_model(pool, streamed)
    assert isinstance(settled[0], dict) and streamed.thresholds == expected_thresholds
    rounded = {key: (pretrained[key].float() + expected[key]).bfloat16() for key in expected}
    assert_states_equal(model, rounded)


@pytest.mark.parametrize(("keep", "settled"), [(24 / 32, "in place"), (23 / 32, "again")])
def test_a_threshold_just_above_a_band_top_many_entries_share_is_not_taken_for_it(keep, settled):
    """Hand-worked: each τ has 8 entries of 0.5, 16 of 1 and 8 of 2 (b's rolled), and the
    band stops at 0.5 (the pass counts 32 entries at or above it, 24 above). Keeping the
    top 24 of 32, the threshold is the 8th smallest magnitude (the TIES code's
    kthvalue), the last 0.5, and the counts place it there: the written model stands
    (nothing held, nothing to correct); keeping 23, it is the 9th, the first 1, above
    the band: the counting passes find it, and the model is written again."""
    values = torch.cat([torch.full((8,), 0.5), torch.ones(16), torch.full((8,), 2.0)])
    pretrained = {"w": torch.zeros(32)}
    finetuned = {"a": {"w": values}, "b": {"w": values.roll(5)}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ties_streamed, "sampled_bands", lambda *args: ([0.5, 0.5], [0.5, 0.5]))
        found = _settled_by(patch)
        pool = mergelab.ModelPool(pretrained, finetuned)
        streamed = ties_streamed.StreamedTies(pool, keep)
        model = written_model(pool, streamed)
    assert found == ([{}] if settled == "in place" else [None])
    assert streamed.thresholds == ([0.5, 0.5] if settled == "in place" else [1.0, 1.0])
    expected = naive.ties_multitask_vector(pretrained, finetuned, keep)
    assert_states_equal(model, naive.assemble(pretrained, expected, 1.0))


@pytest.mark.parametrize("streamed", [False, True], ids=["in memory", "mergelab merge"])
def test_more_tasks_than_sixteen_bits_name_are_refused_before_any_work(streamed):
    """The set-aside entries name their task, and the kernels count a coordinate's
    entries of each sign, in 16 bits: 2^15 tasks are refused, by count."""
    pretrained = {"w": torch.zeros(2)}
    finetuned = {f"t{number}": {"w": torch.ones(2)} for number in range(1 << 15)}
    with pytest.raises(ValueError, match="TIES merges at most 32767 task vectors, got 32768"):
        if streamed:
            ties_streamed.StreamedTies(mergelab.ModelPool(pretrained, finetuned))
        else:
            mergelab.ties(pretrained, finetuned, 1.0)
