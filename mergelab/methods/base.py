"""What a merge method is: a class that holds its own settings and turns a model pool into
the variants the test loop scores.

A *variant* is one set of image-encoder weights: a merged model for one scaling factor, a
task's TALL-retrieved model for one λ, the pretrained or a fine-tuned model. A method gets
what it needs through a :class:`MergeContext` (θ0, the checked model pool, where to save
its artifact, where to log), so it never touches Lightning; the merge callback builds the
context. A user's own method is a subclass in the user's own module, named on the command
line by its class path (``--merge.method=my_module.MyMethod``).
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from mergelab.engine.checkpoints import save_state_dict
from mergelab.engine.pool import ModelPool
from mergelab.engine.streaming import build_models

log = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]


@dataclass
class Variants:
    """Named encoder weights per task.

    ``shared``: the same models for every task (chosen by average validation accuracy);
    otherwise ``per_task(task)`` builds that task's models (chosen per task).
    """

    names: list[str]
    shared: dict[str, StateDict] | None = None
    per_task: Callable[[str], dict[str, StateDict]] | None = None
    description: dict = field(default_factory=dict)

    def for_task(self, task: str) -> dict[str, StateDict]:
        return self.shared if self.shared is not None else self.per_task(task)

    @property
    def choose_per_task(self) -> bool:
        return self.shared is None


@dataclass
class MergeContext:
    """What a method may use: the tasks, θ0, the pool of θ0 and the fine-tuned models
    (loaded and checked on first call), where to save its artifact (None: nowhere) and a
    function that logs metrics to the run's loggers."""

    tasks: list[str]
    pretrained: Callable[[], dict[str, torch.Tensor]]
    pool: Callable[[], ModelPool]
    artifact_dir: Path | None = None
    log_metrics: Callable[[dict[str, float]], None] = lambda metrics: None


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class MergeMethod:
    """Base of every merge method. A subclass validates its settings in ``__init__``,
    keeps each as the attribute of the same name, and implements :meth:`variants`.

    ``name`` names the run folder (lightning_logs/<name>/version_N) and the variants
    (``<name>@<setting>``); by default the class name in snake case. ``min_tasks``: the
    fewest tasks the method is defined for, checked before any model is loaded.
    """

    name: ClassVar[str]
    min_tasks: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = snake_case(cls.__name__)

    def init_args(self) -> dict:
        """The settings this method was constructed with (its ``__init__`` parameters)."""
        parameters = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in list(parameters)[1:]}

    def describe(self) -> dict:
        """The method's name and settings: recorded in results.json and artifacts."""
        return {"method": self.name} | self.init_args()

    def check_tasks(self, tasks: Sequence[str]) -> None:
        if len(tasks) < self.min_tasks:
            raise ValueError(f"{self.name} needs at least {self.min_tasks} tasks, got {tasks}")

    def variants(self, context: MergeContext) -> Variants:
        """The weights to score; long steps (loading, merging) happen here."""
        raise NotImplementedError


def scaled_variants(
    name: str,
    pretrained: StateDict,
    merged_keys: Iterable[str],
    delta_of: Callable[[str], torch.Tensor],
    scaling_factors: Sequence[float],
) -> Variants:
    """One variant ``<name>@<λ>`` per scaling factor: θ0 + λ·δ."""
    outputs = [None] * len(scaling_factors)
    models = build_models(pretrained, merged_keys, delta_of, scaling_factors, outputs)
    names = [f"{name}@{factor!r}" for factor in scaling_factors]
    return Variants(names, shared=dict(zip(names, models, strict=True)))


def save_task_vector(
    delta: StateDict, pool: ModelPool, context: MergeContext, settings: Mapping
) -> Path | None:
    """δ of θ = θ0 + λ·δ as ``merged_task_vector.safetensors`` in the artifact folder, its
    settings and θ0's fingerprint in the metadata."""
    if context.artifact_dir is None:
        return None
    meta = {"mergelab": json.dumps(dict(settings) | {"model": pool.fingerprint()})}
    path = context.artifact_dir / "merged_task_vector.safetensors"
    save_state_dict(delta, path, meta, overwrite=True)
    log.info("merged task vector (θ = θ0 + λ·δ) saved to %s", path)
    return path
