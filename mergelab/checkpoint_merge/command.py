"""``mergelab merge CONFIG.yaml``: fine-tuned copies of any model merged into one
checkpoint, written in the base model's layout.

The models may be Hugging Face folders (one ``model.safetensors``, or shards with
``model.safetensors.index.json``), single safetensors or ``torch.save`` files, or hub ids.
The merged model streams parameter by parameter into a temporary folder renamed into
place when complete: sharded as the base is (with the index), the base's config and
tokenizer files beside it, and a model card that names the method, its settings, every
source and each tensor that was copied rather than merged.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from jsonargparse import lazy_instance

from mergelab.checkpoint_merge.card import model_card
from mergelab.checkpoint_merge.mergekit_config import from_mergekit, is_mergekit_config
from mergelab.checkpoint_merge.sources import (
    SAFETENSORS_METADATA,
    add_companions,
    base_layout,
    check_new_folder,
    open_models,
    read_command_line,
    selection_of,
)
from mergelab.engine.model_files import ShardedWriter
from mergelab.engine.model_writing import output_specs, write_model
from mergelab.engine.parameterwise import resolve_device
from mergelab.errors import BadValue
from mergelab.io.model_folders import parse_size
from mergelab.methods import MergeContext, MergeMethod, TaskArithmetic

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_METHOD = lazy_instance(TaskArithmetic)  # λ = 0.3, the field's usual default


def merge_checkpoints(
    base: str,
    models: dict[str, str],
    output: str,
    method: MergeMethod = DEFAULT_METHOD,
    dtype: str | None = None,
    exclude: list[str] | None = None,
    max_shard_size: str | None = None,
    device: str = "auto",
    config_yaml: str = "",
) -> Path:
    """Merge fine-tuned copies of one model into one checkpoint.

    Args:
        base: the pretrained model θ0: a Hugging Face model folder, a .safetensors or
            torch.save file, or a hub id (org/name).
        models: the fine-tuned models by name (a task, say), each in the forms of base.
        output: the folder to write; it must not exist, and appears complete or not at
            all.
        method: a method that yields one model, by class: TaskArithmetic, Ties, Dare,
            TrustRegion (zero-shot without gradient_stats), TaskSingularVectors,
            Isotropic, Consensus (with tall_lambda), Mergekit, or your own ScaledMethod
            subclass by class path; one value of each setting.
        dtype: float32, float16 or bfloat16 for the floating-point tensors written;
            null keeps the base's.
        exclude: glob patterns of tensor names copied from the base unmerged, e.g.
            "lm_head.*" (tensors whose shape differs between the models, such as a
            resized vocabulary, are copied too; both are named in the card).
        max_shard_size: the largest shard, e.g. "5GB" or "500MiB"; null keeps the base's
            shards, each tensor in the shard of the same name (one file for a one-file
            base).
        device: where the rules that take whole parameters compute: auto (CUDA when
            present), cpu or cuda.
    """
    method = _one_model_method(method)
    tasks = list(models)
    method.check_tasks(tasks)
    out_dtype = _dtype(dtype)
    target = check_new_folder(output, "output")
    shard_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    context_device = resolve_device(device)

    base_path, pool = open_models(base, models, selection_of(exclude))
    specs = output_specs(pool.pretrained, out_dtype)
    shards = base_layout(pool.pretrained) if shard_bytes is None else shard_bytes
    [setting] = method.grid()
    card = model_card(
        target.name,
        base,
        models,
        method.describe(),
        str(next(iter(specs.values())).dtype).removeprefix("torch."),
        len(pool.merged_keys),
        pool.copied,
        config_yaml,
    )
    # what a method builds on the way (consensus: its masks) goes to a work folder beside
    # the output, streamed to disk rather than held in memory, and removed at the end
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix=f".{target.name}.work-", dir=target.parent) as work,
        ShardedWriter(target, specs, shards, SAFETENSORS_METADATA) as writer,
    ):
        context = MergeContext(
            tasks, lambda: pool.pretrained, lambda: pool, Path(work), device=context_device
        )
        with method.parameter_deltas(pool, context, **setting) as delta_of:
            factor = method.scaling_factor[0]
            write_model(
                pool.pretrained, pool.merged_keys, delta_of, factor, writer, out_dtype, "merge"
            )
        add_companions(writer.staging, base_path, card, out_dtype)
    log.info(
        "merged model written to %s (%d tensors merged, %d copied from the base)",
        target,
        len(pool.merged_keys),
        len(pool.copied),
    )
    return target


def _one_model_method(method: MergeMethod) -> MergeMethod:
    if not method.one_model:
        raise BadValue(
            f"method {type(method).__name__} does not yield one merged model θ0 + λ·δ; "
            "merge takes TaskArithmetic, Ties, Dare, TrustRegion, TaskSingularVectors, "
            "Isotropic, Consensus, Mergekit or a ScaledMethod of your own"
        )
    if method.settings_scored() != 1:
        raise BadValue(
            f"method {method.name} scores {method.settings_scored()} settings "
            f"({method.describe()}); merge writes one model: give one value of each"
        )
    return method


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise BadValue(f"dtype {name!r}: choose one of {', '.join(DTYPES)} (or null)")
    return DTYPES[name]


def main(argv: Sequence[str]) -> Path:
    """``mergelab merge CONFIG.yaml [--field=value ...]``, or a mergekit config:
    ``mergelab merge MERGEKIT.yaml OUTPUT`` (as ``mergekit-yaml`` takes it)."""
    if argv and Path(argv[0]).suffix in (".yaml", ".yml") and Path(argv[0]).is_file():
        document = yaml.safe_load(Path(argv[0]).read_text())
        if is_mergekit_config(document):
            return _merge_mergekit(Path(argv[0]), document, argv[1:])
    usage = "mergelab merge CONFIG.yaml [--field=value ...]"
    settings, config_yaml = read_command_line(
        merge_checkpoints, argv, "mergelab merge", usage, ("config",)
    )
    return merge_checkpoints(**settings, config_yaml=config_yaml)


def _merge_mergekit(path: Path, document: dict, argv: Sequence[str]) -> Path:
    parser = argparse.ArgumentParser(
        prog="mergelab merge", usage="mergelab merge MERGEKIT.yaml OUTPUT [--device DEVICE]"
    )
    parser.add_argument("output", help="the folder to write")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    options = parser.parse_args(argv)
    settings = from_mergekit(document, path)
    return merge_checkpoints(
        **settings, output=options.output, device=options.device, config_yaml=path.read_text()
    )
