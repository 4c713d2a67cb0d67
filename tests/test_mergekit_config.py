"""mergekit's YAML configs run as they are (``mergelab merge MERGEKIT.yaml OUTPUT``) on
tiny sharded Llamas, each method's merged tensors checked against the naive,
coordinate-by-coordinate transcriptions of mergekit's formulas in tests/naive_mergekit.py;
fields mergelab does not read are refused by name."""

from __future__ import annotations

from pathlib import Path

import naive_mergekit
import pytest
import torch
import yaml

from mergelab.checkpoint_merge.command import main as merge_main
from mergelab.errors import BadValue
from mergelab.merging.mergekit_rules import magnitude_mask

pytest.importorskip("transformers")

from tests.tiny_transformers import TASKS, weights

# dyadic weights: the weighted bf16 deltas and their sums are exact in float32, so a sign
# vote that is 0 in exact arithmetic is 0 in mergekit's float32 too (not a rounding's sign)
WEIGHTS = {"alpha": 0.5, "beta": 0.25, "gamma": 0.375}
DENSITIES = {"alpha": 0.5, "beta": 0.7, "gamma": 0.9}


def mergekit_yaml(tmp_path: Path, llamas: dict, method: str, **parameters) -> Path:
    models = [
        {
            "model": str(llamas[task]),
            "parameters": {"weight": WEIGHTS[task], "density": DENSITIES[task]},
        }
        for task in TASKS
    ]
    document = {"models": models, "merge_method": method, "parameters": parameters}
    if method != "linear":  # linear averages the models alone (a base would be a model)
        document["base_model"] = str(llamas["base"])
    document["dtype"] = "float32"
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def expected_model(llamas: dict, method: str, **parameters) -> dict:
    """Every tensor as the naive transcription merges it (DARE's draws from a generator
    seeded 0, the parameters in the model's order, as mergelab draws them)."""
    base = weights(llamas["base"])
    models = {task: weights(llamas[task]) for task in TASKS}
    generator = torch.Generator().manual_seed(0)
    w = [WEIGHTS[t] for t in TASKS]
    p = [DENSITIES[t] for t in TASKS]
    lam = parameters.get("lambda", 1.0)
    out = {}
    for key, theta0 in base.items():
        stack = torch.stack([models[t][key] for t in TASKS]).float()
        if method == "linear":
            out[key] = naive_mergekit.linear(stack, w, True)
        elif method == "task_arithmetic":
            out[key] = naive_mergekit.task_arithmetic(theta0.float(), stack, w, False, lam)
        elif method == "ties":
            # bf16 weights have many equal magnitudes: which of those at the cut survive is
            # torch.argsort's choice in mergekit (non-stable); it is taken from the rule's
            # mask, checked here to be one of the valid top-k sets
            kept = []
            for delta, density in zip(
                naive_mergekit.task_vectors(theta0.float(), stack), p, strict=True
            ):
                mask = magnitude_mask(torch.tensor(delta), density).reshape(-1)
                chosen = set(mask.nonzero().reshape(-1).tolist())
                assert naive_mergekit.is_top_k(delta, chosen, density), key
                kept.append(chosen)
            out[key] = naive_mergekit.ties(
                theta0.float(), stack, w, p, True, "sum", False, lam, kept
            )
        else:
            out[key] = naive_mergekit.dare(
                theta0.float(), stack, w, p, generator, method == "dare_ties", False, True, lam
            )
    return out


@pytest.mark.parametrize(
    "method, parameters",
    [
        ("linear", {}),
        ("task_arithmetic", {"lambda": 0.8}),
        ("ties", {"normalize": True, "int8_mask": True}),
        ("dare_linear", {}),
        ("dare_ties", {"lambda": 1.2}),
    ],
)
def test_mergekit_configs_give_mergekits_tensors(tmp_path, llamas, method, parameters):
    config = mergekit_yaml(tmp_path, llamas, method, **parameters)
    output = merge_main([str(config), str(tmp_path / "merged")])
    merged = weights(output)
    if method == "linear":  # no base in linear's inputs: the first model's layout
        assert set(merged) == set(weights(llamas["alpha"]))
    expected = expected_model(llamas, method, **parameters)
    for key, (value, scale) in expected.items():
        assert merged[key].dtype == torch.float32
        tolerance = 1e-5 * scale.to(torch.float64) + 1e-30
        difference = (merged[key].to(torch.float64) - value).abs()
        assert bool((difference <= tolerance).all()), (key, float(difference.max()))
    assert f"merge_method: {method}" in (output / "README.md").read_text()


@pytest.mark.parametrize(
    "change, culprit",
    [
        ({"slices": []}, "'slices'"),
        ({"tokenizer_source": "base"}, "'tokenizer_source'"),
        ({"parameters": {"weight": [0.1, 0.9]}}, "weight is a gradient"),
        ({"parameters": {"epsilon": 0.1}}, "'epsilon'"),
        ({"merge_method": "della"}, "merge_method 'della'"),
    ],
)
def test_fields_mergelab_does_not_read_are_refused_by_name(tmp_path, llamas, change, culprit):
    config = mergekit_yaml(tmp_path, llamas, "ties")
    document = yaml.safe_load(config.read_text()) | change
    config.write_text(yaml.safe_dump(document))
    with pytest.raises(BadValue, match=culprit):
        merge_main([str(config), str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()
