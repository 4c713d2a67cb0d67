"""The TALL masks file's layout (its keys and format name) and the checks of the TALL and
consensus settings, shared by the build (:mod:`mergelab.engine.tall_masks`) and the
methods that configure it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mergelab.engine.checkpoints import tensor_spec
from mergelab.engine.pool import ModelPool
from mergelab.engine.streaming import as_factor_list
from mergelab.errors import BadValue, MissingKey

# The λ grid of the TALL masks paper (Wang et al., ICML 2024, §4).
DEFAULT_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)
FORMAT = "mergelab.tall_masks/1"


def lambda_name(lam: float) -> str:
    """λ as stored in keys: the shortest repr that reads back as the same float."""
    return repr(float(lam))


def mtl_key(key: str) -> str:
    return f"mtl/{key}"


def mask_key(task: str, lam: float, key: str) -> str:
    return f"mask/{task}/{lambda_name(lam)}/{key}"


def checked_lambdas(lambdas: Sequence[float]) -> list[float]:
    """A TALL λ grid as floats, refused if empty, not positive or with a value twice."""
    lambdas = as_factor_list(lambdas, "lambdas")
    for lam in lambdas:
        if not lam > 0:
            raise BadValue(f"TALL mask λ must be > 0, got {lam}")
    if len(set(lambdas)) != len(lambdas):
        raise BadValue(f"a TALL λ is listed twice: {lambdas}")
    return lambdas


def check_consensus_k(k: int) -> None:
    if k < 0:
        raise BadValue(f"consensus k must be ≥ 0, got {k}")


def check_multitask_vector(pool: ModelPool, multitask: Mapping[str, torch.Tensor]) -> None:
    for key in pool.merged_keys:
        if key not in multitask:
            raise MissingKey(f"the multitask vector lacks {key!r}")
        if tensor_spec(multitask, key).shape != pool.specs[key].shape:
            raise BadValue(
                f"the multitask vector's {key!r} is {tensor_spec(multitask, key).shape}, "
                f"the model's {pool.specs[key].shape}"
            )
