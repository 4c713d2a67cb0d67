"""Bad input fails early with an error naming the culprit, and nothing is written."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from strategies import BUFFER, clone_state, make_family

from mergelab import (
    ModelPool,
    TallMasks,
    consensus_merge,
    save_state_dict,
    task_arithmetic,
    trust_region,
    trust_region_vector,
)

KEY = "blocks.1.weight"
BAD_TASK = "task1"


def _family():
    return make_family(2, [(4, 3), (5,), (2, 2)], num_tasks=3, integer=True, buffer_at=1)


METHODS = {
    "task_arithmetic": lambda pre, fts, grads, out: task_arithmetic(pre, fts, output=out),
    "trust_region": lambda pre, fts, grads, out: trust_region(pre, fts, output=out),
    "trust_region_grads": lambda pre, fts, grads, out: trust_region(
        pre, fts, gradient_stats=grads, output=out
    ),
    "tall": lambda pre, fts, grads, out: TallMasks.build(pre, fts, output=out),
    "tall_ties": lambda pre, fts, grads, out: TallMasks.build(pre, fts, ties=0.2, output=out),
    "consensus": lambda pre, fts, grads, out: consensus_merge(pre, fts, output=out),
}


def _run_failing(method, pre, fts, grads, folder, errors=(KeyError, ValueError)):
    """Run a method that must fail; return the message; check nothing was written."""
    out = folder / "out" / "merged.safetensors"
    with pytest.raises(errors) as info:
        METHODS[method](pre, fts, grads, out)
    assert not out.exists()
    if out.parent.exists():
        assert list(out.parent.iterdir()) == []  # no temporary file left behind either
    return str(info.value)


def _to_files(family, folder):
    pre = save_state_dict(family.pretrained, folder / "pre.safetensors")
    fts = {t: save_state_dict(m, folder / f"{t}.safetensors") for t, m in family.finetuned.items()}
    grads = {
        t: save_state_dict(g, folder / f"g{t}.safetensors") for t, g in family.gradients.items()
    }
    return pre, fts, grads


def _missing_key(model):
    del model[KEY]


def _extra_key(model):
    model["head.extra"] = torch.zeros(2)


def _other_shape(model):
    model[KEY] = torch.zeros(6)


def _other_dtype(model):
    model[KEY] = model[KEY].to(torch.float16)


def _other_buffer_dtype(model):
    model[BUFFER] = model[BUFFER].to(torch.int32)


LAYOUT_CHANGES = {
    "missing key": (_missing_key, KEY),
    "extra key": (_extra_key, "head.extra"),
    "other shape": (_other_shape, KEY),
    "other dtype": (_other_dtype, KEY),
    "other buffer dtype": (_other_buffer_dtype, BUFFER),
}


@pytest.mark.parametrize("streamed", [False, True], ids=["memory", "files"])
@pytest.mark.parametrize("change", list(LAYOUT_CHANGES))
@pytest.mark.parametrize("method", list(METHODS))
def test_layout_mismatch_names_task_and_key(tmp_path, method, change, streamed):
    family = _family()
    alter, key = LAYOUT_CHANGES[change]
    alter(family.finetuned[BAD_TASK])
    pre, fts, grads = family.pretrained, family.finetuned, family.gradients
    if streamed:
        pre, fts, grads = _to_files(family, tmp_path)
    message = _run_failing(method, pre, fts, grads, tmp_path)
    assert BAD_TASK in message and key in message, message


@pytest.mark.parametrize("streamed", [False, True], ids=["memory", "files"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", list(METHODS))
def test_non_finite_finetuned_weights_name_task_and_key(tmp_path, method, value, streamed):
    family = _family()
    family.finetuned[BAD_TASK][KEY][3] = value
    pre, fts, grads = family.pretrained, family.finetuned, family.gradients
    if streamed:
        pre, fts, grads = _to_files(family, tmp_path)
    message = _run_failing(method, pre, fts, grads, tmp_path, ValueError)
    assert BAD_TASK in message and KEY in message, message
    assert "NaN" in message or "Inf" in message


@pytest.mark.parametrize("position", [0, 5, 13], ids=["first block", "middle", "last"])
def test_non_finite_value_in_any_block_stops_the_tall_build(tmp_path, monkeypatch, position):
    """With parameters cut into many blocks shared out to threads, a NaN in any block
    is reported and no file is left behind."""
    monkeypatch.setattr(ModelPool, "chunk", 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    family = make_family(4, [(2, 7), (14,)], num_tasks=3, integer=True)
    family.finetuned[BAD_TASK]["blocks.1.weight"][position] = math.nan
    pre, fts, grads = _to_files(family, tmp_path)
    message = _run_failing("tall", pre, fts, grads, tmp_path, ValueError)
    assert BAD_TASK in message and "blocks.1.weight" in message, message


@pytest.mark.parametrize("q", [0.0, -0.5, 1.0001, 2.0, math.nan, -math.inf])
def test_threshold_quantile_outside_zero_one(tmp_path, q):
    family = _family()
    out = tmp_path / "merged.safetensors"
    with pytest.raises(ValueError, match="threshold_quantile"):
        trust_region(family.pretrained, family.finetuned, threshold_quantile=q, output=out)
    assert not out.exists()
    with pytest.raises(ValueError, match="threshold_quantile"):
        trust_region_vector(ModelPool(family.pretrained, family.finetuned), q)


@pytest.mark.parametrize("lambdas", [[0.0], [0.2, 0.0], [-0.3], [0.2, -1e-9, 0.4]])
def test_tall_lambda_must_be_positive(tmp_path, lambdas):
    family = _family()
    out = tmp_path / "masks.safetensors"
    with pytest.raises(ValueError, match="λ"):
        TallMasks.build(family.pretrained, family.finetuned, lambdas=lambdas, output=out)
    assert not out.exists()
    with pytest.raises(ValueError, match="λ"):
        consensus_merge(family.pretrained, family.finetuned, tall_lambda=min(lambdas), output=out)
    assert not out.exists()


@pytest.mark.parametrize("k", [-1, -5])
def test_consensus_k_must_not_be_negative(tmp_path, k):
    family = _family()
    out = tmp_path / "merged.safetensors"
    with pytest.raises(ValueError, match="k"):
        consensus_merge(family.pretrained, family.finetuned, k=k, output=out)
    assert not out.exists()
    masks = TallMasks.build(family.pretrained, family.finetuned)
    with pytest.raises(ValueError, match="k"):
        masks.consensus(
            family.pretrained, k=k, lambdas=dict.fromkeys(family.tasks, 0.2), output=out
        )
    assert not out.exists()


@pytest.mark.parametrize("method", ["trust_region", "trust_region_grads", "tall", "consensus"])
def test_methods_comparing_tasks_need_two(tmp_path, method):
    family = _family()
    one = {BAD_TASK: family.finetuned[BAD_TASK]}
    grads = {BAD_TASK: family.gradients[BAD_TASK]}
    message = _run_failing(method, family.pretrained, one, grads, tmp_path, ValueError)
    assert "at least 2" in message
    with pytest.raises(ValueError, match="at least 2"):
        trust_region_vector(ModelPool(family.pretrained, one), 0.9)


@pytest.mark.parametrize("method", list(METHODS))
def test_no_finetuned_models(tmp_path, method):
    family = _family()
    _run_failing(method, family.pretrained, {}, {}, tmp_path, ValueError)


@pytest.mark.parametrize("method", list(METHODS))
def test_existing_output_is_kept_without_overwrite(tmp_path, method):
    family = _family()
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=r"merged\.safetensors"):
        METHODS[method](family.pretrained, family.finetuned, family.gradients, out)
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors"]


def test_overwrite_replaces_an_existing_output(tmp_path):
    family = _family()
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"old")
    task_arithmetic(family.pretrained, family.finetuned, output=out, overwrite=True)
    trust_region(family.pretrained, family.finetuned, output=out, overwrite=True)
    masks = TallMasks.build(family.pretrained, family.finetuned, output=out, overwrite=True)
    assert masks.tasks == family.tasks


def test_list_of_outputs_checked_before_any_is_written(tmp_path):
    family = _family()
    outs = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    outs[2].write_bytes(b"keep me")
    for merge in (task_arithmetic, trust_region):
        with pytest.raises(FileExistsError, match=r"m2\.safetensors"):
            merge(family.pretrained, family.finetuned, [0.1, 0.2, 0.3], output=outs)
        assert not outs[0].exists() and not outs[1].exists()
        assert outs[2].read_bytes() == b"keep me"
    with pytest.raises(ValueError, match="3 models"):
        task_arithmetic(family.pretrained, family.finetuned, [0.1, 0.2, 0.3], output=outs[:2])
    assert not outs[0].exists()


def test_retrieve_and_consensus_keep_existing_outputs(tmp_path):
    family = _family()
    masks = TallMasks.build(family.pretrained, family.finetuned)
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        masks.retrieve(family.pretrained, BAD_TASK, 0.2, output=out)
    with pytest.raises(FileExistsError):
        masks.consensus(family.pretrained, lambdas=dict.fromkeys(family.tasks, 0.2), output=out)
    with pytest.raises(FileExistsError):
        masks.save(out)
    assert out.read_bytes() == b"keep me"


# --- gradient statistics -----------------------------------------------------------------


def _run_with_gradients(family, gradients, tmp_path, errors=(KeyError, ValueError)):
    out = tmp_path / "merged.safetensors"
    with pytest.raises(errors) as info:
        trust_region(family.pretrained, family.finetuned, gradient_stats=gradients, output=out)
    assert not out.exists()
    with pytest.raises(errors):
        trust_region_vector(ModelPool(family.pretrained, family.finetuned), 0.9, gradients)
    return str(info.value)


def test_gradient_statistics_for_other_tasks(tmp_path):
    family = _family()
    gradients = dict(family.gradients)
    gradients["elsewhere"] = gradients.pop(BAD_TASK)
    message = _run_with_gradients(family, gradients, tmp_path, ValueError)
    assert "elsewhere" in message and BAD_TASK in message


def test_gradient_statistics_missing_a_task(tmp_path):
    family = _family()
    gradients = {t: g for t, g in family.gradients.items() if t != BAD_TASK}
    message = _run_with_gradients(family, gradients, tmp_path, ValueError)
    assert BAD_TASK in message


def test_gradient_statistics_for_an_extra_task(tmp_path):
    family = _family()
    gradients = {**family.gradients, "extra": clone_state(family.gradients[BAD_TASK])}
    message = _run_with_gradients(family, gradients, tmp_path, ValueError)
    assert "extra" in message


@pytest.mark.parametrize("streamed", [False, True], ids=["memory", "files"])
def test_gradient_statistics_missing_a_key(tmp_path, streamed):
    family = _family()
    del family.gradients[BAD_TASK][KEY]
    gradients = family.gradients
    if streamed:
        gradients = _to_files(family, tmp_path)[2]
    message = _run_with_gradients(family, gradients, tmp_path)
    assert BAD_TASK in message and KEY in message


def test_gradient_statistics_of_another_shape(tmp_path):
    family = _family()
    family.gradients[BAD_TASK][KEY] = torch.ones(2, 3)
    message = _run_with_gradients(family, family.gradients, tmp_path, ValueError)
    assert BAD_TASK in message and KEY in message


# --- other misuse --------------------------------------------------------------------------


def test_tall_unknown_task_or_lambda(tmp_path):
    family = _family()
    masks = TallMasks.build(family.pretrained, family.finetuned, lambdas=[0.2, 0.4])
    with pytest.raises(KeyError, match="nowhere"):
        masks.retrieve(family.pretrained, "nowhere", 0.2)
    with pytest.raises(KeyError, match=r"0\.3"):
        masks.retrieve(family.pretrained, BAD_TASK, 0.3)
    with pytest.raises(KeyError, match=BAD_TASK):
        masks.retrieve(family.pretrained, BAD_TASK)  # no λ chosen yet
    with pytest.raises(KeyError, match=BAD_TASK):
        masks.choose_lambdas({t: {0.2: 1.0, 0.4: 0.0} for t in family.tasks if t != BAD_TASK})
    with pytest.raises(KeyError, match=r"0\.4"):
        masks.choose_lambdas({t: {0.2: 1.0} for t in family.tasks})


def test_tall_retrieve_into_an_unfit_model(tmp_path):
    family = _family()
    masks = TallMasks.build(family.pretrained, family.finetuned)
    model = masks.retrieve(family.pretrained, BAD_TASK, 0.2)
    unfit = {
        "another shape": {**model, KEY: torch.zeros(7)},
        "another dtype": {**model, KEY: model[KEY].double()},
        "a missing key": {k: v for k, v in model.items() if k != KEY},
        "a strided view": {**model, KEY: model[KEY].repeat(2)[::2]},
    }
    for reuse in unfit.values():
        with pytest.raises((KeyError, ValueError), match=KEY):
            masks.retrieve(family.pretrained, BAD_TASK, 0.2, reuse=reuse)
    out = tmp_path / "retrieved.safetensors"
    with pytest.raises(ValueError, match="output file"):
        masks.retrieve(family.pretrained, BAD_TASK, 0.2, output=out, reuse=model)
    assert not out.exists()


def test_tall_masks_of_another_model_shape(tmp_path):
    family = _family()
    masks = TallMasks.build(family.pretrained, family.finetuned)
    other = dict(family.pretrained)
    other[KEY] = torch.zeros(7)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(ValueError, match=KEY):
        masks.retrieve(other, BAD_TASK, 0.2, output=out)
    del other[KEY]
    with pytest.raises(KeyError, match=KEY):
        masks.consensus(other, lambdas=dict.fromkeys(family.tasks, 0.2), output=out)
    assert not out.exists()


@pytest.mark.parametrize("factor", [math.nan, math.inf, []])
def test_bad_scaling_factors(tmp_path, factor):
    family = _family()
    out = tmp_path / "merged.safetensors"
    with pytest.raises(ValueError, match="scaling_factor"):
        task_arithmetic(family.pretrained, family.finetuned, scaling_factor=factor, output=out)
    assert not out.exists()


@pytest.mark.parametrize("merge", [task_arithmetic, trust_region])
def test_duplicate_output_paths_are_refused_before_writing(tmp_path, merge):
    family = _family()
    out = tmp_path / "merged.safetensors"
    with pytest.raises(ValueError, match=r"merged\.safetensors"):
        merge(family.pretrained, family.finetuned, [0.1, 0.2], output=[out, out])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_gradient_statistics_name_task_and_key(tmp_path, value):
    family = _family()
    family.gradients[BAD_TASK][KEY][2] = value
    message = _run_with_gradients(family, family.gradients, tmp_path, ValueError)
    assert BAD_TASK in message and KEY in message


def test_numpy_scalar_scaling_factor_is_one_factor():
    family = _family()
    merged = task_arithmetic(family.pretrained, family.finetuned, scaling_factor=np.float32(0.5))
    expected = task_arithmetic(family.pretrained, family.finetuned, scaling_factor=0.5)
    assert isinstance(merged, dict)
    for key in expected:
        assert torch.equal(merged[key], expected[key])
