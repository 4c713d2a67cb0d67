"""Whole models streamed parameter by parameter: the shared machinery of every method.

Every single-model method yields a merged task vector δ, parameter by parameter, and
:func:`build_models` turns it into θ0 + λ·δ for each scaling factor λ (Task Arithmetic:
δ = Σ τt; trust region: δ = mask ⊙ Σ τt; consensus: δ = mcons ⊙ τMTL). Each model is
built from the untouched θ0, so a list of factors gives independent models. A model
computed otherwise (TALL retrieval: θ0 + mt ⊙ τMTL) is streamed by :func:`fill_model`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergelab.engine.checkpoints import (
    AtomicWriter,
    LazyCheckpoint,
    SafetensorsWriter,
    TensorSpec,
    check_writable,
    read_into,
    tensor_spec,
)
from mergelab.engine.pool import ModelPool, flat_blocks
from mergelab.engine.tensor_selection import check_same_layout
from mergelab.engine.workspace import BlockWorkers, Workspace, empty
from mergelab.errors import BadValue
from mergelab.merging.finite import all_finite
from mergelab.merging.task_arithmetic import apply_task_vector

StateDict = dict[str, torch.Tensor]


def progress(items: Sequence, desc: str) -> Iterable:
    """A progress bar over parameters (shown on a terminal only)."""
    return tqdm(items, desc=desc, unit="param", leave=False, disable=None)


def is_single(value) -> bool:
    """One number (numpy scalars included) rather than a list of them."""
    return isinstance(value, numbers.Real)


def as_factor_list(scaling_factor: float | Sequence[float], name: str) -> list[float]:
    factors = [scaling_factor] if is_single(scaling_factor) else list(scaling_factor)
    if not factors:
        raise BadValue(f"{name}: no values given")
    for value in factors:
        if not math.isfinite(value):
            raise BadValue(f"{name} must be finite, got {value}")
    return [float(v) for v in factors]


def output_paths(output, count: int, overwrite: bool) -> list[Path | None]:
    """One output path (or None for in-memory) per model, checked before any work."""
    if output is None:
        return [None] * count
    paths = [output] if isinstance(output, (str, os.PathLike)) else list(output)
    if len(paths) != count:
        raise BadValue(f"{count} models to build but {len(paths)} output paths given")
    resolved = [Path(p).resolve() for p in paths]
    duplicate = next((p for p in resolved if resolved.count(p) > 1), None)
    if duplicate is not None:
        raise BadValue(f"output path {duplicate} is given twice")
    return [check_writable(p, overwrite) for p in paths]


@contextlib.contextmanager
def _model_sinks(
    outputs: Sequence[Path | None],
    specs: Mapping[str, TensorSpec],
    metadata: Mapping[str, str] | None,
    overwrite: bool,
) -> Iterator[list[StateDict | AtomicWriter]]:
    """One sink per output: a dict to fill, a writer of the file path given, or the
    writer given (declared with ``specs``), whose temporaries are removed if anything
    fails before the caller closes it."""
    sinks: list = []
    try:
        for path in outputs:
            if path is None or isinstance(path, AtomicWriter):
                sinks.append({} if path is None else path)
            else:
                sinks.append(SafetensorsWriter(path, specs, metadata, overwrite))
        yield sinks
    except BaseException:
        for sink in sinks:
            if isinstance(sink, AtomicWriter):
                sink.abort()
        raise


def _closed(sinks: Sequence[StateDict | AtomicWriter]) -> list[StateDict | Path]:
    return [sink if isinstance(sink, dict) else sink.close() for sink in sinks]


def merged_parameter(
    key: str,
    theta0: torch.Tensor,
    delta: torch.Tensor,
    factor: float,
    out: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """θ0 + λ·δ of parameter ``key`` (see :func:`apply_task_vector`), refused naming the
    key and λ where it is not finite in its dtype."""
    model = apply_task_vector(theta0, delta, factor, out=out, dtype=dtype)
    if not all_finite(model):
        raise not_finite_model(key, factor, model.dtype)
    return model


def not_finite_model(key: str, factor: float, dtype: torch.dtype) -> BadValue:
    """The error for a merged parameter not finite in its dtype."""
    return BadValue(
        f"scaling factor {factor}: θ0 + λ·δ of {key!r} has NaN or Inf "
        f"values (too large for {dtype})"
    )


def build_models(
    pretrained: Mapping[str, torch.Tensor],
    merged_keys: Iterable[str],
    delta_of: Callable[[str], torch.Tensor],
    scaling_factors: Sequence[float],
    outputs: Sequence[Path | None],
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
    desc: str = "merge",
    consume: bool = False,
) -> list[StateDict | Path]:
    """θ0 + λ·δ for each λ, streamed key by key into memory or into safetensors files.

    ``delta_of(key)`` gives the merged task vector δ of a key in ``merged_keys``, which is
    computed once for all λ; the other keys of θ0 are copied. The last model is built in
    the storage of δ if ``consume`` allows overwriting it, else of θ0 where θ0 was read
    from a file (a tensor of our own), so that no further tensor is allocated.
    """
    merged = frozenset(merged_keys)
    specs = {key: tensor_spec(pretrained, key) for key in pretrained}
    with _model_sinks(outputs, specs, metadata, overwrite) as sinks:
        last = len(sinks) - 1
        own_pretrained = isinstance(pretrained, LazyCheckpoint)
        for key in progress(list(specs), desc):
            theta0 = pretrained[key].detach()
            if key in merged:
                delta = delta_of(key)
                for i, (sink, factor) in enumerate(zip(sinks, scaling_factors, strict=True)):
                    reuse = None
                    if i == last and isinstance(sink, dict):
                        reuse = delta if consume else theta0 if own_pretrained else None
                    sink[key] = merged_parameter(key, theta0, delta, factor, out=reuse)
            else:
                for sink in sinks:
                    sink[key] = theta0.clone()
        return _closed(sinks)


def fill_model(
    pretrained: Mapping[str, torch.Tensor],
    merged_keys: Iterable[str],
    fill_block: Callable[[str, torch.Tensor, slice, Workspace], None],
    block_size: int,
    output: Path | AtomicWriter | None,
    overwrite: bool = False,
    desc: str = "merge",
    reuse: StateDict | None = None,
) -> StateDict | Path:
    """One model, block by block: ``fill_block(key, out, part, workspace)`` writes the flat
    elements ``part`` (``block_size`` of them, a multiple of 8, the last block shorter) of
    a merged parameter into ``out``, the parameter flat in θ0's dtype, using ``workspace``
    for its scratch; the other keys of θ0 are copied.

    In memory, the blocks of all parameters are shared out among BlockWorkers threads at
    once (one hand-over per thread instead of one per parameter), into new tensors or
    those of ``reuse``: a state dict of θ0's layout (contiguous CPU tensors, e.g. a model
    built before). To a file (``output`` a path, or a writer declared with θ0's layout),
    parameter by parameter into one reused buffer, in the order the writer takes them.
    """
    merged = frozenset(merged_keys)
    specs = {key: tensor_spec(pretrained, key) for key in pretrained}
    if reuse is not None:
        _check_reusable(specs, reuse, output)

    def fill(item: tuple[str, torch.Tensor, slice]) -> None:
        key, flat, part = item
        fill_block(key, flat, part, workers.workspace())

    with BlockWorkers() as workers, _model_sinks([output], specs, None, overwrite) as [sink]:
        if isinstance(sink, dict):
            for key, spec in specs.items():
                sink[key] = reuse[key] if reuse is not None else empty(spec.shape, spec.dtype)
                if key not in merged:
                    read_into(pretrained, key, sink[key].view(-1))
            items = [
                (key, sink[key].view(-1), part)
                for key in specs
                if key in merged
                for part in flat_blocks(specs[key].numel, block_size)
            ]
            workers.run(fill, items)
        else:
            workspace = Workspace()
            for key in progress(list(specs), desc):
                out = workspace.get("model", specs[key].shape, specs[key].dtype)
                if key in merged:
                    parts = flat_blocks(specs[key].numel, block_size)
                    workers.run(fill, [(key, out.view(-1), part) for part in parts])
                else:
                    read_into(pretrained, key, out.view(-1))
                sink[key] = out
        [result] = _closed([sink])
        return result


def _check_reusable(specs: Mapping[str, TensorSpec], reuse: StateDict, output) -> None:
    if output is not None:
        raise BadValue("reuse writes the model into tensors in memory, not to an output file")
    check_same_layout(specs, reuse, "the model to reuse")
    for key, tensor in reuse.items():
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.requires_grad:
            raise BadValue(
                f"the model to reuse: {key!r} must be a contiguous CPU tensor without grad"
            )


def single_or_list(results: list, scaling_factor) -> StateDict | list:
    return results[0] if is_single(scaling_factor) else results


def streamed_models(
    pool: ModelPool,
    delta_of: Callable[[str, BlockWorkers], torch.Tensor],
    scaling_factor: float | Sequence[float],
    output=None,
    overwrite: bool = False,
    desc: str = "merge",
) -> StateDict | Path | list:
    """θ0 + λ·δ for one λ or a list of them (the Python API's functions), δ of a key given
    by ``delta_of(key, workers=workers)`` as the models are built, its blocks on ``workers``: the
    methods whose δ of a parameter needs nothing of the others (Task Arithmetic, DARE)
    never hold δ of the whole model."""
    factors = as_factor_list(scaling_factor, "scaling_factor")
    outputs = output_paths(output, len(factors), overwrite)
    with BlockWorkers() as workers:
        of_key = functools.partial(delta_of, workers=workers)
        models = _models(pool, of_key, factors, outputs, overwrite, desc)
    return single_or_list(models, scaling_factor)


def scaled_models(
    pool: ModelPool,
    merged_vector: Callable[[], Mapping[str, torch.Tensor]],
    scaling_factor: float | Sequence[float],
    output=None,
    overwrite: bool = False,
    desc: str = "merge",
) -> StateDict | Path | list:
    """θ0 + λ·δ for one λ or a list of them (the Python API's functions): the factors and
    outputs are checked before ``merged_vector()`` computes δ (held whole, as the methods
    that need a model-wide statistic do), and the last model is built in δ's storage."""
    factors = as_factor_list(scaling_factor, "scaling_factor")
    outputs = output_paths(output, len(factors), overwrite)
    delta = merged_vector()
    return single_or_list(
        _models(pool, delta.__getitem__, factors, outputs, overwrite, desc), scaling_factor
    )


def _models(pool, delta_of, factors, outputs, overwrite, desc) -> list[StateDict | Path]:
    """θ0 + λ·δ for each λ, the last in δ's storage (δ is the caller's to overwrite)."""
    return build_models(
        pool.pretrained,
        pool.merged_keys,
        delta_of,
        factors,
        outputs,
        overwrite,
        desc=desc,
        consume=True,
    )
