"""Consensus merging (Wang et al., ICML 2024): θ = θ0 + α·(mcons ⊙ τMTL), keeping the
coordinates that at least k tasks' TALL masks keep, each task's mask at the λ picked for
it on validation (the reference code's ``construct_consensus_mask``, github
nik-dim/tall_masks, builds it from those per-task optimal masks)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from mergelab.engine.pool import ModelPool
from mergelab.engine.streaming import as_factor_list
from mergelab.engine.tall_layout import check_consensus_k, checked_lambdas
from mergelab.errors import BadValue
from mergelab.io.run_folder import check_finished
from mergelab.methods.base import (
    MergeContext,
    MergeMethod,
    ScaledMethod,
    Variants,
    joined,
    scaled_variants,
)
from mergelab.methods.tall_masks import built_masks, check_multitask

log = logging.getLogger(__name__)


def picked_lambdas(path: str, multitask: dict | None) -> dict[str, float]:
    """Each task's λ picked on validation by the TALL masks run whose results.json (or
    run folder) is ``path``."""
    file = Path(path) / "results.json" if Path(path).is_dir() else Path(path)
    check_finished(file.parent, "tall_results")
    try:
        results = json.loads(file.read_text())
        method, picked_on = results["settings"]["method"], results["picked_on"]
        picked = results["picked_settings"]
    except (OSError, ValueError, KeyError) as err:
        raise BadValue(
            f"tall_results: {file} is not the results.json of a mergelab TALL masks run ({err})"
        ) from err
    if method != "tall_masks" or picked_on != "val":
        raise BadValue(
            f"tall_results: {file} is a {method} run picked on {picked_on}; consensus needs "
            "a tall_masks run that picked each task's λ on validation (data.test_splits "
            "[val, test])"
        )
    if results["settings"].get("multitask") != multitask:
        raise BadValue(
            f"tall_results: {file} masks the τMTL of {results['settings'].get('multitask')}, "
            f"this consensus the τMTL of {multitask} (null: Σ τt)"
        )
    return {task: float(setting["lambda"]) for task, setting in picked.items()}


class Consensus(MergeMethod):
    """θ = θ0 + α·(mcons ⊙ τMTL), mcons = 1{Σt mt ≥ k}.

    Args:
        k: keep the coordinates that at least k tasks' masks keep (k = 0: all, plain Task
            Arithmetic on τMTL; k > the number of tasks: none, the pretrained model). A
            list scores every k (with every α) and picks on validation.
        scaling_factor: α; a list scores every value and picks on validation when the data
            module's test_splits has ``val``.
        tall_results: the results.json (or run folder) of a TALL masks run that picked each
            task's λ on validation: each task's mask is taken at its own λ, as the TALL
            reference code builds the consensus mask.
        tall_lambda: instead of tall_results, every task's mask at this one λ (for runs
            without validation data). Give exactly one of the two.
        multitask: null for τMTL = Σ τt; else the single-model method whose merged task
            vector is τMTL, by class (as TallMasks's multitask; tall_results must come
            from a TALL masks run with the same one).
    """

    min_tasks = 2

    def __init__(
        self,
        k: int | list[int] = 2,
        scaling_factor: float | list[float] = 0.3,
        tall_results: str | None = None,
        tall_lambda: float | None = None,
        multitask: ScaledMethod | None = None,
    ):
        self.ks = [k] if isinstance(k, int) else list(k)
        if not self.ks:
            raise BadValue("consensus k: no values given")
        for value in self.ks:
            check_consensus_k(value)
        check_multitask(multitask)
        if (tall_results is None) == (tall_lambda is None):
            raise BadValue(
                "consensus needs each task's TALL λ: give tall_results (a TALL masks run's "
                "results.json, λ picked per task on validation) or one tall_lambda, not "
                f"{'both' if tall_results else 'neither'}"
            )
        if tall_lambda is not None:
            checked_lambdas([tall_lambda])
        self.k = k
        self.scaling_factor = as_factor_list(scaling_factor, "scaling_factor")
        self.tall_results = tall_results
        self.tall_lambda = tall_lambda
        self.multitask = multitask
        described = None if multitask is None else multitask.describe()
        self._picked = None if tall_results is None else picked_lambdas(tall_results, described)

    def settings_scored(self) -> int:
        return len(self.ks) * len(self.scaling_factor)

    def task_lambdas(self, tasks: Sequence[str]) -> dict[str, float]:
        """The λ of each task's mask."""
        if self._picked is None:
            return dict.fromkeys(tasks, self.tall_lambda)
        missing = [t for t in tasks if t not in self._picked]
        if missing:
            raise BadValue(
                f"tall_results {self.tall_results} has no λ for task {missing[0]!r} "
                f"(it picked for {sorted(self._picked)})"
            )
        return {t: self._picked[t] for t in tasks}

    def check_tasks(self, tasks: Sequence[str]) -> None:
        super().check_tasks(tasks)
        self.task_lambdas(tasks)
        for k in self.ks:
            if k == 0:
                log.warning("consensus k=0 keeps every coordinate: Task Arithmetic on τMTL")
            elif k > len(tasks):
                log.warning(
                    "consensus k=%d > %d tasks keeps no coordinate: every model is θ0",
                    k,
                    len(tasks),
                )

    one_model = True

    def grid(self) -> list[dict]:
        return [{"k": k} for k in self.ks]

    @contextlib.contextmanager
    def parameter_deltas(
        self, pool: ModelPool, context: MergeContext, k: int
    ) -> Iterator[Callable[[str], torch.Tensor]]:
        """mcons ⊙ τMTL one parameter at a time, from the masks built once (streamed into
        the context's artifact folder when it has one)."""
        lambdas = self.task_lambdas(pool.tasks)
        masks = built_masks(context, sorted(set(lambdas.values())), self.multitask)
        delta_of = masks.consensus_delta_fn(k, lambdas)
        yield lambda key: delta_of(key).clone()  # delta_of's is a reused buffer

    def variants(self, context: MergeContext) -> Variants:
        lambdas = self.task_lambdas(context.tasks)
        masks = built_masks(context, sorted(set(lambdas.values())), self.multitask)
        pretrained, factors = context.pretrained(), self.scaling_factor
        parts = []
        for k in self.ks:
            delta_of = masks.consensus_delta_fn(k, lambdas)
            setting = {"k": k} if len(self.ks) > 1 else None
            parts.append(
                scaled_variants(self.name, pretrained, masks.shapes, delta_of, factors, setting)
            )
        return joined(parts)
