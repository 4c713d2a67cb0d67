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

import contextlib
import functools
import inspect
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

import torch

from mergelab.engine.checkpoints import SafetensorsCheckpoint, save_state_dict
from mergelab.engine.pool import ModelPool
from mergelab.engine.streaming import build_models
from mergelab.errors import BadValue

log = logging.getLogger(__name__)

# the artifact of the methods whose models are θ0 + λ·δ
TASK_VECTOR_FILE = "merged_task_vector.safetensors"

StateDict = Mapping[str, torch.Tensor]


@dataclass
class Variants:
    """Named encoder weights per task.

    ``shared``: the same models for every task (chosen by average validation accuracy);
    otherwise ``per_task(task, names)`` builds that task's models of those names (chosen
    per task): all of them for validation, only the picked one for test.
    ``settings``: what each name stands for (``{"scaling_factor": 0.3}``), reported for
    the pick in results.json.
    """

    names: list[str]
    shared: dict[str, StateDict] | None = None
    per_task: Callable[[str, list[str]], dict[str, StateDict]] | None = None
    description: dict = field(default_factory=dict)
    settings: dict[str, dict] = field(default_factory=dict)

    def for_task(self, task: str, names: Iterable[str] | None = None) -> dict[str, StateDict]:
        """The models of ``names`` (default: all) that score ``task``."""
        names = self.names if names is None else list(names)
        if self.shared is not None:
            return {name: self.shared[name] for name in names}
        return self.per_task(task, names)

    @property
    def choose_per_task(self) -> bool:
        return self.shared is None


Built = TypeVar("Built")
# (output path or None, build, load) -> what build returned, or load(path) in the other
# processes of a distributed run
Sharing = Callable[[Path | None, Callable[[Path | None], Built], Callable[[Path], Built]], Built]


def build_here(path: Path | None, build: Callable, load: Callable) -> Built:
    """One process: build it here."""
    return build(path)


@dataclass
class MergeContext:
    """What a method may use: the tasks, θ0, the pool of θ0 and the fine-tuned models
    (loaded and checked on first call), the folder its artifact goes to (None: kept in
    memory), a function that logs metrics to the run's loggers, how a distributed run
    builds once and shares (see :meth:`build_once`), and the device the merge rules that
    run on whole parameters compute on (the run's own: its GPU under a GPU trainer)."""

    tasks: list[str]
    pretrained: Callable[[], dict[str, torch.Tensor]]
    pool: Callable[[], ModelPool]
    artifact_dir: Path | None = None
    log_metrics: Callable[[dict[str, float]], None] = lambda metrics: None
    sharing: Sharing = build_here
    device: torch.device | str = "cpu"

    def build_once(
        self, filename: str, build: Callable[[Path | None], Built], load: Callable[[Path], Built]
    ) -> Built:
        """The artifact ``filename``: ``build(path)`` computes it (writing it to ``path``,
        the artifact folder's file, when there is one) in one process; in a distributed
        run the others wait, then ``load(path)`` what it wrote, so the merge is built once."""
        path = None if self.artifact_dir is None else self.artifact_dir / filename
        return self.sharing(path, build, load)

    def rank_zero_first(self, load: Callable[[], Built]) -> Built:
        """``load()`` in every process, the first (rank 0) before the others: for what
        every rank needs whole, such as models that rank 0 converts into the cache."""
        return self.sharing(None, lambda _: load(), None)


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class MergeMethod:
    """Base of every merge method. A subclass validates its settings in ``__init__``,
    keeps each as the attribute of the same name, and implements :meth:`variants`.

    ``name`` names the run folder (lightning_logs/<name>/version_N) and the variants
    (``<name>@<setting>``); by default the class name in snake case. ``min_tasks``: the
    fewest tasks the method is defined for, checked before any model is loaded.
    ``one_model``: its models are θ0 + λ·δ, one δ per setting of :meth:`grid` and one
    model per ``scaling_factor``, each δ given parameter by parameter by
    ``parameter_deltas(pool, context, **setting)`` (as :class:`ScaledMethod` defines
    them): what ``mergelab merge`` writes.
    """

    name: ClassVar[str]
    min_tasks: ClassVar[int] = 1
    one_model: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = snake_case(cls.__name__)

    def init_args(self) -> dict:
        """The settings this method was constructed with (its ``__init__`` parameters)."""
        parameters = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in list(parameters)[1:]}

    def describe(self) -> dict:
        """The method's name and settings (a method among them described in turn):
        recorded in results.json and artifacts."""
        settings = {
            name: value.describe() if isinstance(value, MergeMethod) else value
            for name, value in self.init_args().items()
        }
        return {"method": self.name} | settings

    def check_tasks(self, tasks: Sequence[str]) -> None:
        if len(tasks) < self.min_tasks:
            raise BadValue(f"{self.name} needs at least {self.min_tasks} tasks, got {tasks}")

    def settings_scored(self) -> int:
        """How many settings a run scores (a list of scaling factors, a λ grid): with more
        than one, a test run needs validation data to pick one."""
        return 1

    def variants(self, context: MergeContext) -> Variants:
        """The weights to score; long steps (loading, merging) happen here."""
        raise NotImplementedError


class ScaledMethod(MergeMethod):
    """A method whose models are θ0 + λ·δ, one per scaling factor (``self.scaling_factor``,
    a list), for each merged task vector δ of its grid (:meth:`grid`: the settings that
    make each δ, such as TATR's quantile; one δ by default), each δ built once by
    :meth:`merged_task_vector`."""

    scaling_factor: list[float]
    one_model = True

    def grid(self) -> list[dict]:
        """The settings of each δ, e.g. ``[{"threshold_quantile": 0.99}]``."""
        return [{}]

    def settings_scored(self) -> int:
        return len(self.grid()) * len(self.scaling_factor)

    def artifact(self, setting: Mapping) -> str:
        """The file of the δ of ``setting``: one name when the grid has one δ."""
        if len(self.grid()) == 1:
            return TASK_VECTOR_FILE
        return f"merged_task_vector_{setting_label(setting)}.safetensors"

    def merged_task_vector(
        self, pool: ModelPool, context: MergeContext, output: Path | None, **setting
    ) -> StateDict:
        """δ of ``setting`` (one of :meth:`grid`), saved to ``output`` when given."""
        raise NotImplementedError

    @contextlib.contextmanager
    def parameter_deltas(
        self, pool: ModelPool, context: MergeContext, **setting
    ) -> Iterator[Callable[[str], torch.Tensor]]:
        """δ of ``setting`` one merged parameter at a time, asked for in the pool's order:
        how a model is written to files (``mergelab merge``). Each δ handed out stays
        valid while the next one is computed (a new tensor, not a reused buffer: it is
        written on another thread meanwhile). By default δ is computed
        whole by :meth:`merged_task_vector` (memory: one model in float32); a method whose
        δ of a parameter depends on that parameter alone computes each as it is asked
        for (memory: one parameter); one that finds a model-wide statistic as it goes
        yields :class:`~mergelab.engine.model_writing.ProvisionalDeltas` (TIES)."""
        yield self.merged_task_vector(pool, context, None, **setting).__getitem__

    def save_task_vectors(self, pool: ModelPool, context: MergeContext) -> None:
        """Every δ of the grid into the artifact folder (when there is one)."""
        for setting in self.grid():
            folder = context.artifact_dir
            output = None if folder is None else folder / self.artifact(setting)
            self.merged_task_vector(pool, context, output, **setting)

    def variants(self, context: MergeContext) -> Variants:
        parts = []
        for setting in self.grid():
            delta = context.build_once(
                self.artifact(setting),
                functools.partial(self._built, context, setting),
                SafetensorsCheckpoint,
            )
            pretrained = context.pretrained()
            factors = self.scaling_factor
            keys = list(delta)
            parts.append(
                scaled_variants(self.name, pretrained, keys, delta.__getitem__, factors, setting)
            )
        return joined(parts)

    def _built(self, context: MergeContext, setting: Mapping, output: Path | None) -> StateDict:
        return self.merged_task_vector(context.pool(), context, output, **setting)


def setting_label(setting: Mapping) -> str:
    return ",".join(f"{key}={value!r}" for key, value in setting.items())


def scaled_variants(
    name: str,
    pretrained: StateDict,
    merged_keys: Iterable[str],
    delta_of: Callable[[str], torch.Tensor],
    scaling_factors: Sequence[float],
    setting: Mapping | None = None,
) -> Variants:
    """One variant per scaling factor λ, θ0 + λ·δ: ``<name>@<λ>``, or
    ``<name>@<setting>@<λ>`` for the δ of one setting of a grid."""
    outputs = [None] * len(scaling_factors)
    models = build_models(pretrained, merged_keys, delta_of, scaling_factors, outputs)
    prefix = f"{name}@{setting_label(setting)}" if setting else name
    names = [f"{prefix}@{factor!r}" for factor in scaling_factors]
    settings = {
        n: dict(setting or {}) | {"scaling_factor": f}
        for n, f in zip(names, scaling_factors, strict=True)
    }
    return Variants(names, shared=dict(zip(names, models, strict=True)), settings=settings)


def joined(parts: Sequence[Variants]) -> Variants:
    """The shared variants of several δ of a grid as one."""
    if len(parts) == 1:
        return parts[0]
    return Variants(
        [name for part in parts for name in part.names],
        shared={name: model for part in parts for name, model in part.shared.items()},
        settings={name: value for part in parts for name, value in part.settings.items()},
    )


def save_task_vector(
    delta: StateDict, pool: ModelPool, output: Path | None, settings: Mapping
) -> None:
    """δ of θ = θ0 + λ·δ written to ``output`` (if given), its settings and θ0's fingerprint
    in the metadata."""
    if output is None:
        return
    meta = {"mergelab": json.dumps(dict(settings) | {"model": pool.fingerprint()})}
    save_state_dict(delta, output, meta, overwrite=True)
    log.info("merged task vector (θ = θ0 + λ·δ) saved to %s", output)
