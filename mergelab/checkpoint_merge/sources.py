"""What ``mergelab merge``, ``compress`` and ``retrieve`` share: the models a config
names, opened and checked as one pool; the base's layout, which every output keeps; the
files written beside the weights; and a command line read from a YAML config."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from mergelab.engine.model_files import ShardedCheckpoint
from mergelab.engine.pool import ModelPool
from mergelab.engine.tensor_selection import TensorSelection
from mergelab.errors import FileInTheWay
from mergelab.io.model_folders import CARD, copy_companions
from mergelab.io.model_sources import model_source

log = logging.getLogger(__name__)

# what every safetensors file transformers writes says of itself, and checks on reading
SAFETENSORS_METADATA = {"format": "pt"}


def check_new_folder(path: str | Path, what: str) -> Path:
    folder = Path(path)
    if folder.exists():
        raise FileInTheWay(f"{what} {folder} exists; choose a new folder")
    return folder


def selection_of(exclude: Sequence[str] | None) -> TensorSelection:
    """The user's exclude patterns; tensors whose shape differs between models copied."""
    return TensorSelection(tuple(exclude or ()), copy_mismatched_shapes=True)


def open_models(
    base: str, models: Mapping[str, str], selection: TensorSelection
) -> tuple[Path, ModelPool]:
    """(the base's local path, the pool of the base and the models): hub ids resolved,
    every layout checked, and each tensor copied rather than merged logged with why."""
    base_path = model_source(base, "base model")
    sources = {task: model_source(src, f"model {task!r}") for task, src in models.items()}
    pool = ModelPool(base_path, sources, selection)
    for key, reason in pool.copied.items():
        log.info("copied from the base unmerged: %s (%s)", key, reason)
    return base_path, pool


def base_layout(base: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """The tensors of each of the base's shards (one file for a one-file base)."""
    if isinstance(base, ShardedCheckpoint):
        return [list(shard) for shard in base.shards]
    return [list(base)]


def add_companions(
    staging: Path, base_path: Path, card: str, dtype: torch.dtype | None = None
) -> None:
    """The base folder's config and tokenizer files and the model card, into a folder
    being written."""
    if base_path.is_dir():
        copy_companions(base_path, staging, dtype)
    (staging / CARD).write_text(card)


def read_command_line(
    function: Callable, argv: Sequence[str], prog: str, usage: str, positional: Sequence[str]
) -> tuple[dict, str]:
    """(the arguments of ``function``, the config as YAML) from ``argv``: a YAML config
    file given first (or as ``--config``), fields overridden as ``--field=value``;
    ``positional`` names what may be given, in order, before any option ("config": the
    config file)."""
    argv = list(argv)
    leading = []
    while argv and not argv[0].startswith("-"):
        leading.append(argv.pop(0))
    names = list(positional)
    given = [f"--{name}={value}" for name, value in zip(names, leading, strict=False)]
    parser = ArgumentParser(
        prog=prog, usage=usage, description=(function.__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--config", action=ActionConfigFile, help="the YAML config file")
    parser.add_function_arguments(function, skip={"config_yaml"})
    if len(leading) > len(names):
        parser.error(f"unexpected argument {leading[len(names)]!r}")
    config = parser.parse_args([*given, *argv])
    config_yaml = parser.dump(config)
    settings = {k: v for k, v in vars(parser.instantiate(config)).items() if k != "config"}
    return settings, config_yaml
