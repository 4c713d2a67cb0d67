"""TATR's gradient statistics files: one safetensors file per task, whose metadata name
the task, the sample count and the pretrained model's fingerprint (so that statistics of
another model or task are refused, naming the file)."""

from __future__ import annotations

import json
from pathlib import Path

from mergelab.engine.checkpoints import SafetensorsCheckpoint
from mergelab.errors import BadValue, MissingFile

KIND = "tatr_gradient_statistics"


def statistics_file(folder: str | Path, task: str) -> Path:
    return Path(folder) / f"{task}.safetensors"


def read_statistics(path: Path, task: str, fingerprint: str) -> SafetensorsCheckpoint:
    """A task's saved statistics, checked to be for this task and this pretrained model."""
    checkpoint = SafetensorsCheckpoint(path)
    try:
        meta = json.loads(checkpoint.metadata["mergelab"])
        found_kind, found_task, found_model = meta["kind"], meta["task"], meta["model"]
    except (KeyError, ValueError) as err:
        raise BadValue(f"{path}: not gradient statistics saved by mergelab fit") from err
    if found_kind != KIND:
        raise BadValue(f"{path}: holds {found_kind!r}, not gradient statistics")
    if found_task != task:
        raise BadValue(f"{path}: gradient statistics of task {found_task!r}, not {task!r}")
    if found_model != fingerprint:
        raise BadValue(
            f"{path}: gradient statistics of another pretrained model (fingerprint "
            f"{found_model}, this model {fingerprint}); recompute them with mergelab fit"
        )
    return checkpoint


def statistics_samples(checkpoint: SafetensorsCheckpoint) -> int:
    return json.loads(checkpoint.metadata["mergelab"])["samples"]


def statistics_data(checkpoint: SafetensorsCheckpoint) -> str | None:
    """The fingerprint of the samples the statistics were computed over (None in files
    written before it was recorded)."""
    return json.loads(checkpoint.metadata["mergelab"]).get("data")


def load_task_statistics(
    folder: str | Path, tasks: list[str], fingerprint: str
) -> dict[str, SafetensorsCheckpoint]:
    """Every task's saved statistics from ``folder``, checked; a missing task is named."""
    missing = [t for t in tasks if not statistics_file(folder, t).is_file()]
    if missing:
        raise MissingFile(
            f"no gradient statistics of task {missing[0]!r} in {folder} "
            f"(expected {statistics_file(folder, missing[0])}; mergelab fit writes them)"
        )
    return {t: read_statistics(statistics_file(folder, t), t, fingerprint) for t in tasks}
