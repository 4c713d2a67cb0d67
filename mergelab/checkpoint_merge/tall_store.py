"""``mergelab compress`` and ``mergelab retrieve``: TALL masks for any model.

``compress`` keeps T fine-tuned models as their summed task vector τMTL and one mask per
task at one bit per parameter (Wang et al., ICML 2024), in a store folder: the TALL masks
file, ``store.json`` (the base as given, its fingerprint and shard layout, each task's λ
and source) and a card. θ0 is not copied: ``retrieve`` reads it from the base and writes
one task's model θ̂t = θ0 + mt ⊙ τMTL in the base's layout, reading θ0, τMTL and that
task's mask only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from mergelab.checkpoint_merge.sources import (
    SAFETENSORS_METADATA,
    add_companions,
    base_layout,
    check_new_folder,
    open_models,
    read_command_line,
    selection_of,
)
from mergelab.engine.atomic import temporary_path
from mergelab.engine.checkpoints import tensor_spec
from mergelab.engine.model_files import ShardedWriter, open_checkpoint
from mergelab.engine.pool import fingerprint
from mergelab.engine.tall_layout import checked_lambdas
from mergelab.engine.tall_masks import TallMasks
from mergelab.errors import BadValue, MissingFile, MissingKey
from mergelab.io.model_folders import CARD
from mergelab.io.model_sources import model_source
from mergelab.merging.selection import pick_best
from mergelab.methods.tall_masks import MASKS_FILE

log = logging.getLogger(__name__)

STORE_INFO = "store.json"
STORE_FORMAT = "mergelab.tall_store/1"
GB = 1e9


def compress_checkpoints(
    base: str,
    models: dict[str, str],
    output: str,
    tall_lambda: float | None = None,
    scores: str | None = None,
    exclude: list[str] | None = None,
    config_yaml: str = "",
) -> Path:
    """Keep fine-tuned copies of one model as TALL masks over their summed task vector.

    Args:
        base: the pretrained model θ0: a Hugging Face model folder, a .safetensors or
            torch.save file, or a hub id (org/name). It is not copied into the store.
        models: the fine-tuned models by task, each in the forms of base.
        output: the store folder to write; it must not exist.
        tall_lambda: every task's mask at this λ (the TALL paper searches 0.2–0.6).
        scores: instead, a YAML or JSON file of validation scores, {task: {λ: score}}:
            each task's mask at its best λ (the first listed among equal best ones).
        exclude: glob patterns of tensor names left out of the masks and taken from the
            base on retrieval (tensors whose shape differs between models are too).
    """
    task_lambdas = _task_lambdas(list(models), tall_lambda, scores)
    target = check_new_folder(output, "output")
    _, pool = open_models(base, models, selection_of(exclude))
    staging = temporary_path(target)
    staging.mkdir()
    try:
        masks = TallMasks.build(
            pool.pretrained,
            pool.finetuned,
            output=staging / MASKS_FILE,
            task_lambdas=task_lambdas,
            selection=pool.selection,
        )
        info = {
            "format": STORE_FORMAT,
            "base": base,
            "fingerprint": masks.model,
            "layout": base_layout(pool.pretrained),
            "tasks": {
                task: {"source": models[task], "lambda": task_lambdas[task]} for task in models
            },
            "copied": pool.copied,
        }
        (staging / STORE_INFO).write_text(json.dumps(info, indent=2) + "\n")
        (staging / CARD).write_text(_store_card(info, config_yaml))
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    stored = (target / MASKS_FILE).stat().st_size
    models_bytes = sum(_tensor_bytes(model) for model in pool.finetuned.values())
    print(
        f"TALL store {target}: {stored / GB:.3g} GB (τMTL and {len(models)} masks of one bit "
        f"per parameter) for {len(models)} fine-tuned models of {models_bytes / GB:.3g} GB: "
        f"{models_bytes / stored:.2f}× smaller; θ0 stays at {base}"
    )
    return target


def retrieve_task(store: str, task: str, output: str, base: str | None = None) -> Path:
    """Write one task's model from a TALL store, in the base model's layout.

    Args:
        store: the folder ``mergelab compress`` wrote.
        task: the task whose model to write.
        output: the model folder to write; it must not exist.
        base: the base model, where it is no longer where the store says (it must be
            the same model: its fingerprint is checked).
    """
    folder = Path(store)
    info = _read_store(folder)
    if task not in info["tasks"]:
        raise MissingKey(
            f"task {task!r} is not in the store {folder}; it holds {list(info['tasks'])}"
        )
    target = check_new_folder(output, "output")
    base_path = model_source(base or info["base"], "base model")
    pretrained = open_checkpoint(base_path)
    found = fingerprint(pretrained)
    if found != info["fingerprint"]:
        raise BadValue(
            f"{base_path} is not the base model of the store {folder} (fingerprint {found}, "
            f"the store's {info['fingerprint']})"
        )
    masks = TallMasks.load(folder / MASKS_FILE)
    specs = {key: tensor_spec(pretrained, key) for key in pretrained}
    lam = info["tasks"][task]["lambda"]
    writer = ShardedWriter(target, specs, info["layout"], SAFETENSORS_METADATA)
    try:
        add_companions(writer.staging, base_path, _task_card(folder, task, info))
    except BaseException:
        writer.abort()
        raise
    masks.retrieve(pretrained, task, lam, output=writer)
    log.info("%s's model (λ = %g) written to %s", task, lam, target)
    return target


def _task_lambdas(
    tasks: Sequence[str], tall_lambda: float | None, scores: str | None
) -> dict[str, float]:
    """Each task's λ: the one given, or the best of each task's validation scores."""
    if (tall_lambda is None) == (scores is None):
        raise BadValue(
            "compress needs each task's TALL λ: give tall_lambda or a scores file, not "
            f"{'both' if scores else 'neither'}"
        )
    if tall_lambda is not None:
        [lam] = checked_lambdas([tall_lambda])
        return dict.fromkeys(tasks, lam)
    path = Path(scores)
    if not path.is_file():
        raise MissingFile(f"scores: no file {path}")
    table = yaml.safe_load(path.read_text())
    picked = {}
    for task in tasks:
        by_lambda = table.get(task) if isinstance(table, Mapping) else None
        if not isinstance(by_lambda, Mapping) or not by_lambda:
            raise MissingKey(f"scores: {path} has no {{λ: score}} for task {task!r}")
        try:
            grid = {float(lam): float(score) for lam, score in by_lambda.items()}
        except (TypeError, ValueError) as err:
            raise BadValue(f"scores: {path}, task {task!r}: λ and scores must be numbers") from err
        picked[task] = pick_best(checked_lambdas(list(grid)), grid.__getitem__)
    return picked


def _read_store(folder: Path) -> dict:
    path = folder / STORE_INFO
    if not path.is_file() or not (folder / MASKS_FILE).is_file():
        raise MissingFile(f"{folder} is not a TALL store (no {STORE_INFO} or {MASKS_FILE})")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BadValue(f"{path}: not JSON ({err})") from err
    if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:
        raise BadValue(f"{path}: not a mergelab TALL store (format {STORE_FORMAT})")
    return info


def _tensor_bytes(model) -> int:
    return sum(
        tensor_spec(model, key).numel * tensor_spec(model, key).dtype.itemsize for key in model
    )


def _store_card(info: Mapping, config_yaml: str) -> str:
    rows = [
        f"| {task} | {entry['lambda']} | `{entry['source']}` |"
        for task, entry in info["tasks"].items()
    ]
    return "\n".join(
        [
            f"# TALL store of {len(info['tasks'])} fine-tuned models of `{info['base']}`",
            "",
            "τMTL = Σt τt and one TALL mask per task at one bit per parameter (Wang et al., "
            "ICML 2024). `mergelab retrieve <this folder> TASK --output DIR` writes a task's "
            "model θ0 + mt ⊙ τMTL in the base's layout.",
            "",
            "| task | λ | fine-tuned model |",
            "|---|---|---|",
            *rows,
            "",
            "```yaml",
            config_yaml.rstrip(),
            "```",
            "",
        ]
    )


def _task_card(store: Path, task: str, info: Mapping) -> str:
    entry = info["tasks"][task]
    return (
        f"# {task}, retrieved from a TALL store\n\n"
        f"θ0 + m ⊙ τMTL with the TALL mask of {task!r} at λ = {entry['lambda']}, from the "
        f"store `{store}` of `{info['base']}`; the fine-tuned model was `{entry['source']}`.\n"
    )


def compress_main(argv: Sequence[str]) -> Path:
    usage = "mergelab compress CONFIG.yaml [--field=value ...]"
    settings, config_yaml = read_command_line(
        compress_checkpoints, argv, "mergelab compress", usage, ("config",)
    )
    return compress_checkpoints(**settings, config_yaml=config_yaml)


def retrieve_main(argv: Sequence[str]) -> Path:
    usage = "mergelab retrieve STORE TASK --output DIR [--base BASE]"
    settings, _ = read_command_line(
        retrieve_task, argv, "mergelab retrieve", usage, ("store", "task")
    )
    return retrieve_task(**settings)
