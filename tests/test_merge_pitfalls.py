"""Named regression tests for the pitfalls of REFERENCE.md §2 and other fixed edge cases."""

from __future__ import annotations

import naive
import pytest
import torch
from strategies import (
    BUFFER,
    LAMBDA_GRID,
    assert_states_equal,
    clone_state,
    load_file,
    make_family,
)

import mergelab
from mergelab import (
    ModelPool,
    TallMasks,
    consensus_merge,
    save_state_dict,
    task_arithmetic,
    trust_region,
    trust_region_vector,
)

# --- §2.5: the TALL mask compares |θ0 − θt| = |τt|, not |θ0 − τt| -------------------------


def test_tall_mask_uses_theta0_minus_theta_t_not_theta0_minus_tau():
    pretrained = {"w": torch.tensor([10.0, 10.0, -10.0, 10.0])}
    tau_a = torch.tensor([1.0, 4.0, 0.0, 2.0])
    tau_b = torch.tensor([4.0, 1.0, 0.0, 2.0])
    finetuned = {"a": {"w": pretrained["w"] + tau_a}, "b": {"w": pretrained["w"] + tau_b}}
    masks = TallMasks.build(pretrained, finetuned, lambdas=[0.5])
    mtl = tau_a + tau_b
    # |τa| > 0.5·|τMTL − τa| = [2, 0.5, 0, 1]
    right = torch.tensor([False, True, False, True])
    wrong = (pretrained["w"] - tau_a).abs() > 0.5 * (mtl - tau_a).abs()  # FusionBench 0.2.33
    assert not torch.equal(right, wrong)
    assert torch.equal(masks.mask("a", 0.5, "w"), right)
    assert torch.equal(masks.mask("b", 0.5, "w"), torch.tensor([True, False, False, True]))
    assert torch.equal(masks.multitask_vector("w"), mtl)
    expected = naive.tall_masks(pretrained, finetuned, [0.5])
    assert torch.equal(expected["a"][0.5]["w"], right)


def test_tall_masks_are_not_nearly_all_ones_on_large_pretrained_weights():
    # with |θ0| ≫ |τ|, the wrong rule keeps almost everything; the right one does not
    family = make_family(3, [(40, 25)], num_tasks=8, integer=False)
    for model in family.finetuned.values():  # make θ0 large relative to τ
        model["blocks.0.weight"] += 9 * family.pretrained["blocks.0.weight"]
    family.pretrained["blocks.0.weight"] *= 10
    masks = TallMasks.build(family.pretrained, family.finetuned)
    for task in family.tasks:
        assert masks.density(task, 0.6)["blocks.0.weight"] < 0.9


# --- §2.2: a list of scaling factors gives independent models ----------------------------


FACTOR_LIST = [0.1, 0.3, 0.5, 0.3, 1.0]


def _check_independent(models, single, pretrained_before, pretrained):
    assert isinstance(models, list) and len(models) == len(FACTOR_LIST)
    for model, factor in zip(models, FACTOR_LIST, strict=True):
        assert_states_equal(model, single(factor))
    assert_states_equal(pretrained, pretrained_before)  # θ0 is never modified
    # the models share no storage with each other or with θ0
    for key in pretrained:
        pointers = {m[key].data_ptr() for m in models} | {pretrained[key].data_ptr()}
        assert len(pointers) == len(models) + 1, key


@pytest.fixture
def family():
    return make_family(11, [(6, 5), (7,), (2, 3, 4)], num_tasks=4, integer=True, buffer_at=1)


def test_factor_list_gives_independent_task_arithmetic_models(family):
    before = clone_state(family.pretrained)
    models = task_arithmetic(family.pretrained, family.finetuned, scaling_factor=FACTOR_LIST)
    _check_independent(
        models,
        lambda f: naive.task_arithmetic(before, family.finetuned, f),
        before,
        family.pretrained,
    )


@pytest.mark.parametrize("with_gradients", [False, True])
def test_factor_list_gives_independent_trust_region_models(family, with_gradients):
    gradients = family.gradients if with_gradients else None
    before = clone_state(family.pretrained)
    models = trust_region(
        family.pretrained,
        family.finetuned,
        scaling_factor=FACTOR_LIST,
        threshold_quantile=0.8,
        gradient_stats=gradients,
    )

    def single(factor):
        return trust_region(
            family.pretrained,
            family.finetuned,
            scaling_factor=factor,
            threshold_quantile=0.8,
            gradient_stats=gradients,
        )

    _check_independent(models, single, before, family.pretrained)
    for model, factor in zip(models, FACTOR_LIST, strict=True):
        assert_states_equal(
            model, naive.trust_region(before, family.finetuned, factor, 0.8, gradients)
        )


def test_factor_list_gives_independent_consensus_models(family):
    before = clone_state(family.pretrained)
    models = consensus_merge(family.pretrained, family.finetuned, k=2, scaling_factor=FACTOR_LIST)

    def single(factor):
        return consensus_merge(family.pretrained, family.finetuned, k=2, scaling_factor=factor)

    _check_independent(models, single, before, family.pretrained)
    masks = TallMasks.build(family.pretrained, family.finetuned)
    lambdas = dict.fromkeys(family.tasks, 0.6)
    again = masks.consensus(family.pretrained, 2, FACTOR_LIST, lambdas)
    _check_independent(again, single, before, family.pretrained)


def test_returned_tensors_do_not_alias_the_inputs(family):
    merged = task_arithmetic(family.pretrained, family.finetuned, scaling_factor=0.0)
    retrieved = TallMasks.build(family.pretrained, family.finetuned).retrieve(
        family.pretrained, family.tasks[0], 0.2
    )
    for model in (merged, retrieved):
        for key, value in model.items():
            assert value.data_ptr() != family.pretrained[key].data_ptr(), key
    assert torch.equal(merged[BUFFER], family.pretrained[BUFFER])


# --- §2.1: gradient statistics stay attached to their own task --------------------------


def _grad_family():
    family = make_family(5, [(9, 8), (12,)], num_tasks=3, integer=True)
    # make the tasks' statistics clearly different
    for i, grads in enumerate(family.gradients.values()):
        for key in grads:
            grads[key] = grads[key] * (1 + 2 * i)
    return family


def test_gradient_statistics_make_nonzero_conflicts():
    family = _grad_family()
    pool = ModelPool(family.pretrained, family.finetuned)
    result = trust_region_vector(pool, 0.9, family.gradients)
    delta, _, threshold, _ = naive.trust_region_parts(
        family.pretrained, family.finetuned, 0.9, family.gradients
    )
    assert threshold > 0 and result.threshold == threshold  # Ω is not all zeros
    assert 0.5 < result.kept_fraction < 0.9  # the mask is not all False
    for key in family.merged_keys:
        assert torch.equal(result.delta[key], delta[key])
    merged = trust_region(family.pretrained, family.finetuned, 0.3, 0.9, family.gradients)
    assert any(not torch.equal(merged[k], family.pretrained[k]) for k in family.merged_keys)


def test_gradient_statistics_follow_task_names_not_positions():
    family = _grad_family()
    tasks = family.tasks
    pool = ModelPool(family.pretrained, family.finetuned)
    rotated = {tasks[(i + 1) % 3]: family.gradients[t] for i, t in enumerate(tasks)}

    def naive_parts(gradients):
        return naive.trust_region_parts(family.pretrained, family.finetuned, 0.7, gradients)

    _, mask, threshold, _ = naive_parts(family.gradients)
    _, rotated_mask, rotated_threshold, _ = naive_parts(rotated)
    # the case is sensitive: wrongly attached statistics give another mask
    assert any(not torch.equal(mask[k], rotated_mask[k]) for k in mask)

    result = trust_region_vector(pool, 0.7, family.gradients)
    reordered = trust_region_vector(pool, 0.7, dict(reversed(family.gradients.items())))
    moved = trust_region_vector(pool, 0.7, rotated)
    assert result.threshold == reordered.threshold == threshold
    assert moved.threshold == rotated_threshold
    for key in family.merged_keys:
        assert torch.equal(result.delta[key], reordered.delta[key])
        assert result.kept[key] == int(mask[key].sum())
        assert moved.kept[key] == int(rotated_mask[key].sum())


# --- quantile rank and threshold edge cases ----------------------------------------------


def _distinct_omega_family(n: int = 100):
    # zero-shot Ω = 2·|τa|·|τb| = 2·(1, 2, …, n), all distinct, shuffled across two params
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)) + 1.0
    pretrained = {"p": torch.zeros(n // 2), "q": torch.zeros(n - n // 2)}
    finetuned = {
        "a": {"p": torch.ones(n // 2), "q": -torch.ones(n - n // 2)},
        "b": {"p": order[: n // 2], "q": -order[n // 2 :]},
    }
    return pretrained, finetuned


@pytest.mark.parametrize(("q", "kept"), [(0.29, 29), (0.57, 57), (0.99, 99), (0.5, 50)])
def test_trust_region_rank_reads_q_as_its_decimal(q, kept):
    # 0.29·100 = 28.999… and 0.57·100 = 56.999… in floating point
    pretrained, finetuned = _distinct_omega_family()
    result = trust_region_vector(ModelPool(pretrained, finetuned), q)
    assert result.threshold == 2.0 * (kept + 1)
    assert sum(result.kept.values()) == kept


def test_trust_region_tiny_quantile_keeps_nothing():
    pretrained, finetuned = _distinct_omega_family()
    result = trust_region_vector(ModelPool(pretrained, finetuned), 0.001)  # r = 0
    assert result.threshold == 2.0 and sum(result.kept.values()) == 0
    merged = trust_region(pretrained, finetuned, threshold_quantile=0.001)
    assert_states_equal(merged, pretrained)


def test_trust_region_q_one_keeps_the_largest_conflicts_too():
    pretrained, finetuned = _distinct_omega_family()
    result = trust_region_vector(ModelPool(pretrained, finetuned), 1.0)
    assert sum(result.kept.values()) == 100 and result.kept_fraction == 1.0
    merged = trust_region(pretrained, finetuned, threshold_quantile=1.0)
    assert_states_equal(merged, task_arithmetic(pretrained, finetuned))


def test_trust_region_drops_every_tie_at_the_threshold():
    pretrained = {"w": torch.zeros(10)}
    # Ω = 2·|τb| = [2, 2, 4, 4, 4, 4, 6, 6, 8, 8]
    finetuned = {
        "a": {"w": torch.ones(10)},
        "b": {"w": torch.tensor([1.0, 1, 2, 2, 2, 2, 3, 3, 4, 4])},
    }
    result = trust_region_vector(ModelPool(pretrained, finetuned), 0.3)  # r = 3 → Ω = 4
    assert result.threshold == 4.0
    assert result.kept == {"w": 2}


def test_trust_region_on_three_million_coordinates_with_ties():
    # many more tied coordinates at the threshold than the pass-two store takes, so both
    # the stored and the recomputed parameters are exercised; torch.quantile would refuse
    # inputs above 2**24 values, a global sort costs 12 bytes per coordinate
    gen = torch.Generator().manual_seed(1)
    pretrained = {"a": torch.zeros(2_000_000), "b": torch.zeros(1000, 1100)}
    finetuned = {
        task: {
            k: torch.randint(-1, 2, v.shape, generator=gen).float() for k, v in pretrained.items()
        }
        for task in ("x", "y")
    }
    result = trust_region_vector(ModelPool(pretrained, finetuned), 0.6)
    delta, mask, threshold, _ = naive.trust_region_parts(pretrained, finetuned, 0.6)
    assert result.threshold == threshold == 2.0
    for key in pretrained:
        assert result.kept[key] == int(mask[key].sum())
        assert torch.equal(result.delta[key], delta[key])


# --- streamed (files) and in-memory paths agree exactly ----------------------------------


def _write_family(family, folder):
    paths = {"pretrained": save_state_dict(family.pretrained, folder / "pre.safetensors")}
    finetuned = {
        t: save_state_dict(m, folder / f"ft_{t}.safetensors") for t, m in family.finetuned.items()
    }
    gradients = {
        t: save_state_dict(g, folder / f"g_{t}.safetensors") for t, g in family.gradients.items()
    }
    return paths["pretrained"], finetuned, gradients


@pytest.mark.parametrize("integer", [True, False])
def test_streamed_and_in_memory_merges_agree(tmp_path, integer):
    family = make_family(21, [(13, 7), (33,), (3, 4, 5)], 3, integer=integer, buffer_at=2)
    pre, fts, grads = _write_family(family, tmp_path)
    mem_pre, mem_fts = family.pretrained, family.finetuned
    factors = [0.3, 0.6]
    out = tmp_path / "out"

    paths = [out / "ta0.safetensors", out / "ta1.safetensors"]
    assert task_arithmetic(pre, fts, factors, output=paths) == paths
    for path, model in zip(paths, task_arithmetic(mem_pre, mem_fts, factors), strict=True):
        assert_states_equal(load_file(path), model, ordered=False)

    for gradients, name in ((None, "zs"), (grads, "grad")):
        paths = [out / f"tr_{name}{i}.safetensors" for i in range(2)]
        trust_region(pre, fts, factors, 0.8, gradients, output=paths)
        mem_grads = None if gradients is None else family.gradients
        for path, model in zip(
            paths, trust_region(mem_pre, mem_fts, factors, 0.8, mem_grads), strict=True
        ):
            assert_states_equal(load_file(path), model, ordered=False)

    for ties in (None, 0.2):
        name = f"tall_{ties}.safetensors"
        streamed = TallMasks.build(pre, fts, ties=ties, output=out / name)
        in_memory = TallMasks.build(mem_pre, mem_fts, ties=ties)
        for key in family.merged_keys:
            assert torch.equal(streamed.multitask_vector(key), in_memory.multitask_vector(key))
            for task in family.tasks:
                for lam in LAMBDA_GRID:
                    assert torch.equal(
                        streamed.mask(task, lam, key), in_memory.mask(task, lam, key)
                    )
        task = family.tasks[1]
        path = streamed.retrieve(pre, task, 0.4, output=out / f"ret_{ties}.safetensors")
        assert_states_equal(load_file(path), in_memory.retrieve(mem_pre, task, 0.4), ordered=False)
        lambdas = dict(zip(family.tasks, LAMBDA_GRID, strict=False))
        path = streamed.consensus(pre, 2, 0.5, lambdas, output=out / f"cons_{ties}.safetensors")
        assert_states_equal(
            load_file(path), in_memory.consensus(mem_pre, 2, 0.5, lambdas), ordered=False
        )

    path = consensus_merge(pre, fts, k=1, scaling_factor=0.4, output=out / "cm.safetensors")
    expected = consensus_merge(mem_pre, mem_fts, k=1, scaling_factor=0.4)
    assert_states_equal(load_file(path), expected, ordered=False)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary files left behind


# --- TALL storage ------------------------------------------------------------------------


def test_tall_masks_are_packed_at_one_bit_per_parameter(tmp_path):
    family = make_family(4, [(64, 33), (1000,), (37, 29), (3,)], num_tasks=3, integer=False)
    path = tmp_path / "masks.safetensors"
    masks = TallMasks.build(family.pretrained, family.finetuned, output=path)
    assert masks.bits_per_param <= 1.01
    store = mergelab.SafetensorsCheckpoint(path)
    mask_keys = [k for k in store if k.startswith("mask/")]
    assert len(mask_keys) == len(family.tasks) * len(LAMBDA_GRID) * len(family.merged_keys)
    mask_bytes = 0
    for key in mask_keys:
        spec = store.spec(key)
        assert spec.dtype == torch.uint8
        mask_bytes += spec.numel
    masks_count = family.num_merged * len(family.tasks) * len(LAMBDA_GRID)
    assert 8 * mask_bytes / masks_count <= 1.01
    # and the file holds nothing else of size: header + τMTL (float32) + packed masks
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + header + 4 * family.num_merged + mask_bytes


def test_tall_masks_save_load_round_trip(tmp_path):
    family = make_family(8, [(5, 6), (11,)], num_tasks=3, integer=True)
    masks = TallMasks.build(family.pretrained, family.finetuned, ties=0.2)
    chosen = masks.choose_lambdas(
        {
            t: {lam: float(i == j) for j, lam in enumerate(LAMBDA_GRID)}
            for i, t in enumerate(family.tasks)
        }
    )
    path = masks.save(tmp_path / "tall.safetensors")
    loaded = TallMasks.load(path)
    assert loaded.tasks == masks.tasks
    assert loaded.lambdas == masks.lambdas
    assert loaded.chosen == chosen == dict(zip(family.tasks, LAMBDA_GRID[:3], strict=True))
    assert loaded.ties == 0.2
    for key in family.merged_keys:
        assert torch.equal(loaded.multitask_vector(key), masks.multitask_vector(key))
        for task in family.tasks:
            for lam in LAMBDA_GRID:
                assert torch.equal(loaded.mask(task, lam, key), masks.mask(task, lam, key))
    for task in family.tasks:
        assert_states_equal(
            loaded.retrieve(family.pretrained, task), masks.retrieve(family.pretrained, task)
        )
    # saving the loaded masks again keeps everything
    again = TallMasks.load(loaded.save(tmp_path / "again.safetensors"))
    assert again.chosen == chosen and again.lambdas == masks.lambdas


# --- plain nn.Module parameters (§2.5, the Parameter vs Tensor crash) -------------------


def _module_models():
    torch.manual_seed(0)
    pretrained = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    finetuned = {}
    for task in ("a", "b", "c"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        model.load_state_dict(pretrained.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        finetuned[task] = model.state_dict(keep_vars=True)
    return pretrained.state_dict(keep_vars=True), finetuned


def test_module_parameters_can_be_merged():
    pretrained, finetuned = _module_models()
    plain_pre = {k: v.detach().clone() for k, v in pretrained.items()}
    plain_fts = {t: {k: v.detach().clone() for k, v in m.items()} for t, m in finetuned.items()}
    assert isinstance(pretrained["0.weight"], torch.nn.Parameter)
    pairs = [
        (task_arithmetic(pretrained, finetuned), task_arithmetic(plain_pre, plain_fts)),
        (trust_region(pretrained, finetuned), trust_region(plain_pre, plain_fts)),
        (consensus_merge(pretrained, finetuned, k=1), consensus_merge(plain_pre, plain_fts, k=1)),
    ]
    for got, want in pairs:
        assert_states_equal({k: v.detach() for k, v in got.items()}, want)


def test_module_parameters_give_detached_merged_tensors():
    pretrained, finetuned = _module_models()
    for model in (
        task_arithmetic(pretrained, finetuned),
        trust_region(pretrained, finetuned),
        TallMasks.build(pretrained, finetuned).retrieve(pretrained, "a", 0.3),
    ):
        for key, value in model.items():
            assert not value.requires_grad and value.grad_fn is None, key


def test_tall_lambdas_closer_than_six_digits_keep_their_own_masks():
    pretrained = {"w": torch.zeros(2)}
    # |τa| = 1 against λ·|τb| = λ·3.3333311: kept at λ = 0.3, dropped at λ = 0.3000004
    finetuned = {"a": {"w": torch.ones(2)}, "b": {"w": torch.full((2,), 3.3333311)}}
    lambdas = [0.3, 0.3000004]
    expected = naive.tall_masks(pretrained, finetuned, lambdas)
    assert not torch.equal(expected["a"][0.3]["w"], expected["a"][0.3000004]["w"])
    masks = TallMasks.build(pretrained, finetuned, lambdas=lambdas)
    for lam in lambdas:
        assert torch.equal(masks.mask("a", lam, "w"), expected["a"][lam]["w"])


# --- half and double precision models --------------------------------------------------


def _cast(state, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_models_keep_their_dtype_and_merge_in_at_least_float32(dtype):
    family = make_family(17, [(6, 7), (9,)], num_tasks=3, integer=True, buffer_at=1)
    compute = torch.promote_types(dtype, torch.float32)
    pre = _cast(family.pretrained, dtype)
    fts = {t: _cast(m, dtype) for t, m in family.finetuned.items()}
    grads = {t: _cast(g, dtype) for t, g in family.gradients.items()}
    c_pre = _cast(pre, compute)
    c_fts = {t: _cast(m, compute) for t, m in fts.items()}
    c_grads = {t: _cast(g, compute) for t, g in grads.items()}

    assert_states_equal(
        task_arithmetic(pre, fts, 0.3), _cast(naive.task_arithmetic(c_pre, c_fts, 0.3), dtype)
    )
    for gradients, c_gradients in ((None, None), (grads, c_grads)):
        merged = trust_region(pre, fts, 0.3, 0.7, gradients)
        expected = naive.trust_region(c_pre, c_fts, 0.3, 0.7, c_gradients)
        assert_states_equal(merged, _cast(expected, dtype))

    masks = TallMasks.build(pre, fts)
    mtl = naive.multitask_vector(c_pre, c_fts)
    expected_masks = naive.tall_masks(c_pre, c_fts, LAMBDA_GRID, mtl)
    for key in family.merged_keys:
        assert masks.multitask_vector(key).dtype == compute
        assert torch.equal(masks.multitask_vector(key), mtl[key])
    retrieved = masks.retrieve(pre, "task2", 0.4)
    expected = naive.retrieve(c_pre, mtl, expected_masks["task2"][0.4])
    assert_states_equal(retrieved, _cast(expected, dtype))
    chosen = {t: expected_masks[t][0.6] for t in fts}
    assert_states_equal(
        consensus_merge(pre, fts, k=2, scaling_factor=0.5),
        _cast(naive.consensus(c_pre, mtl, chosen, 2, 0.5), dtype),
    )


@pytest.mark.parametrize("quantile", [0.3, 0.8, 0.99])
def test_block_boundaries_do_not_change_results(monkeypatch, quantile):
    """Parameters spanning many small blocks (and a block size that leaves partial ones)
    give exactly the naive results, through the one-pass and the two-pass selection."""
    monkeypatch.setattr(ModelPool, "chunk", 16)
    fam = make_family(5, [(9, 13), (70,), (3, 5, 7)], num_tasks=3, integer=True, buffer_at=0)
    pre, fts, grads = fam.pretrained, fam.finetuned, fam.gradients
    for gradients in (None, grads):
        merged = trust_region(pre, fts, 0.5, threshold_quantile=quantile, gradient_stats=gradients)
        assert_states_equal(merged, naive.trust_region(pre, fts, 0.5, quantile, gradients))
    assert_states_equal(task_arithmetic(pre, fts, 0.5), naive.task_arithmetic(pre, fts, 0.5))
    masks = TallMasks.build(pre, fts, lambdas=LAMBDA_GRID, ties=0.2)
    mtl = naive.ties_multitask_vector(pre, fts, 0.2)
    expected = naive.tall_masks(pre, fts, LAMBDA_GRID, mtl)
    for task in fts:
        for lam in LAMBDA_GRID:
            for key in expected[task][lam]:
                assert torch.equal(masks.mask(task, lam, key), expected[task][lam][key])
        retrieved = masks.retrieve(pre, task, 0.4)
        assert_states_equal(retrieved, naive.retrieve(pre, mtl, expected[task][0.4]))


def test_two_pass_selection_takes_over_when_the_sampled_floor_misses(monkeypatch):
    """A floor above the true threshold (as a misleading sample would give) still ends in
    the exact result, through the two-pass radix select."""
    import mergelab.engine.trust_region as trust_region_module

    monkeypatch.setattr(trust_region_module, "conflict_floor", lambda *args: float("inf"))
    fam = make_family(8, [(40, 30), (25,)], num_tasks=4, integer=True)
    merged = trust_region(fam.pretrained, fam.finetuned, 0.3, threshold_quantile=0.9)
    expected = naive.trust_region(fam.pretrained, fam.finetuned, 0.3, 0.9)
    assert_states_equal(merged, expected)


def test_a_large_model_places_the_floor_from_a_thinner_sample(monkeypatch):
    """Past SAMPLE_MOST · 16 values the sample thins (here to one block in 275 of each
    parameter: its first): its floor still lies under the exact threshold, so the one
    pass settles it (the two-pass select is not taken) and gives the naive bits."""
    import mergelab.engine.pool as pool_module
    import mergelab.engine.trust_region as trust_region_module

    monkeypatch.setattr(pool_module, "SAMPLE_MOST", 1 << 10)
    strides = []
    blocks = ModelPool.blocks

    def spy(pool, key, every=1):
        strides.append(every)
        return blocks(pool, key, every)

    def refuse(*args):
        raise AssertionError("the sampled floor missed")

    monkeypatch.setattr(ModelPool, "blocks", spy)
    monkeypatch.setattr(trust_region_module, "two_pass_trust_region", refuse)
    fam = make_family(9, [(400, 700), (1000,), (300,)], num_tasks=3, integer=False)
    merged = trust_region(fam.pretrained, fam.finetuned, 0.3, threshold_quantile=0.95)
    expected = naive.trust_region(fam.pretrained, fam.finetuned, 0.3, 0.95)
    assert_states_equal(merged, expected)
    assert max(strides) == -(-fam.num_merged // (1 << 10)) == 275  # the sample's stride


@pytest.mark.parametrize(
    "extra, majority",
    [([-1.0, -1.0], -1), ([1.0, 1.0, 1.0], 1)],
    ids=["negative majority", "positive majority"],
)
def test_ties_breaks_a_zero_sign_sum_by_the_majority_sign(extra, majority):
    """Where the trimmed task vectors sum to exactly 0, the TIES reference code elects the
    sign of the sum of all elected signs (resolve_zero_signs "majority"), not +."""
    t0 = [2.0, -3.0, *extra]
    t1 = [-2.0, 3.0, *extra]
    pretrained = {"w": torch.zeros(len(t0))}
    finetuned = {"a": {"w": torch.tensor(t0)}, "b": {"w": torch.tensor(t1)}}
    masks = TallMasks.build(pretrained, finetuned, lambdas=[0.5], ties=1.0)
    # the two cancelling coordinates keep the entries of the majority's sign
    cancelled = [-2.0, -3.0] if majority < 0 else [2.0, 3.0]
    expected = torch.tensor([*cancelled, *(2 * v for v in extra)])
    assert torch.equal(masks.multitask_vector("w"), expected)
    assert torch.equal(naive.ties_multitask_vector(pretrained, finetuned, 1.0)["w"], expected)
