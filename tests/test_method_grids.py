"""The merge methods as classes, on a model pool without Lightning: a grid of TATR
quantiles or consensus k scored in one run gives, for every setting, the model of the
naive transcription, named after its setting."""

from __future__ import annotations

import naive
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import assert_states_equal, families

from mergelab import ModelPool
from mergelab.methods import Consensus, MergeContext, TrustRegion


def context_of(family) -> MergeContext:
    pool = ModelPool(family.pretrained, family.finetuned)
    return MergeContext(family.tasks, lambda: family.pretrained, lambda: pool)


@given(
    family=families(min_tasks=2, max_tasks=4),
    quantiles=st.lists(
        st.sampled_from([0.5, 0.8, 0.9, 0.99, 1.0]), min_size=2, max_size=3, unique=True
    ),
    factors=st.lists(st.sampled_from([0.3, 0.5, 1.0]), min_size=1, max_size=2, unique=True),
)
def test_trust_region_scores_every_quantile_with_every_factor(family, quantiles, factors):
    method = TrustRegion(scaling_factor=factors, threshold_quantile=quantiles)
    variants = method.variants(context_of(family))
    assert method.settings_scored() == len(variants.names) == len(quantiles) * len(factors)
    for name in variants.names:
        setting = variants.settings[name]
        q, lam = setting["threshold_quantile"], setting["scaling_factor"]
        assert name == f"trust_region@threshold_quantile={q!r}@{lam!r}"
        expected = naive.trust_region(family.pretrained, family.finetuned, lam, q)
        assert_states_equal(variants.shared[name], expected)


@given(
    family=families(min_tasks=2, max_tasks=4),
    ks=st.lists(st.integers(0, 5), min_size=2, max_size=3, unique=True),
)
def test_consensus_scores_every_k(family, ks):
    method = Consensus(k=ks, scaling_factor=[0.5, 1.0], tall_lambda=0.4)
    variants = method.variants(context_of(family))
    mtl = naive.multitask_vector(family.pretrained, family.finetuned)
    masks = naive.tall_masks(family.pretrained, family.finetuned, [0.4], mtl)
    per_task = {task: masks[task][0.4] for task in family.tasks}
    assert len(variants.names) == 2 * len(ks)
    for name in variants.names:
        k, alpha = variants.settings[name]["k"], variants.settings[name]["scaling_factor"]
        expected = naive.consensus(family.pretrained, mtl, per_task, k, alpha)
        assert_states_equal(variants.shared[name], expected)


def test_a_single_quantile_keeps_the_plain_names():
    pretrained = {"w": torch.arange(6.0)}
    finetuned = {"a": {"w": torch.arange(6.0) + 1}, "b": {"w": torch.arange(6.0) * 2}}
    pool = ModelPool(pretrained, finetuned)
    context = MergeContext(["a", "b"], lambda: pretrained, lambda: pool)
    variants = TrustRegion(scaling_factor=[0.3, 0.6]).variants(context)
    assert variants.names == ["trust_region@0.3", "trust_region@0.6"]
