"""mergekit's YAML configs (github arcee-ai/mergekit, docs/merge_methods.md), read as they
are for the methods both tools have: ``linear``, ``task_arithmetic``, ``ties``,
``dare_linear`` and ``dare_ties``, into :class:`mergelab.methods.Mergekit`.

Read: ``merge_method``, ``base_model``, ``models`` (each ``model`` and its ``parameters``:
``weight``, ``density``), ``parameters`` (``normalize``, ``rescale``, ``lambda``,
``int8_mask``, and ``weight`` / ``density`` as every model's default), ``dtype`` and
``out_dtype`` (the output's dtype: mergelab computes in float32 whatever ``dtype`` says).
Any other field, and a parameter given as a gradient (a list) or per tensor filter (a
mapping), is refused by name: it would change mergekit's result, and silently ignoring it
would give another model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mergelab.errors import BadValue
from mergelab.methods import Mergekit

READ = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
MODEL_FIELDS = ("model", "parameters")
MODEL_PARAMETERS = ("weight", "density")
# int8_mask sets the dtype of mergekit's 0/1 masks, never a value: read and ignored
GLOBAL_PARAMETERS = ("normalize", "rescale", "lambda", "int8_mask", *MODEL_PARAMETERS)


def is_mergekit_config(document: object) -> bool:
    return isinstance(document, Mapping) and "merge_method" in document


def from_mergekit(document: Mapping, path: Path) -> dict:
    """The arguments of ``merge_checkpoints`` (base, models, method, dtype) that make
    what mergekit makes of ``document``, read from ``path``."""
    _refuse_unread(document, READ, f"{path}")
    method = document["merge_method"]
    globals_ = _scalars(document.get("parameters") or {}, GLOBAL_PARAMETERS, f"{path}: parameters")
    entries = document.get("models") or []
    if not isinstance(entries, list) or not entries:
        raise BadValue(f"{path}: models must be a list of {{model: ..., parameters: ...}}")
    base = document.get("base_model")
    if base is None and method != "linear":
        raise BadValue(f"{path}: merge_method {method} needs a base_model")
    models, weights, densities = {}, {}, {}
    for number, entry in enumerate(entries, start=1):
        where = f"{path}: models[{number}]"
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise BadValue(f"{where} has no model")
        _refuse_unread(entry, MODEL_FIELDS, where)
        source = str(entry["model"])
        if source == base and method != "linear":
            continue  # mergekit skips the base among the models (its weight counts nowhere)
        name = _name(source, models)
        parameters = _scalars(entry.get("parameters") or {}, MODEL_PARAMETERS, where)
        merged = {k: v for k, v in globals_.items() if k in MODEL_PARAMETERS} | parameters
        if "weight" not in merged:
            raise BadValue(f"{where} ({source}) has no weight, and parameters give none")
        models[name] = source
        weights[name] = float(merged["weight"])
        if "density" in merged:
            densities[name] = float(merged["density"])
    if method == "linear" and base is not None:
        if "weight" not in globals_:  # mergekit adds the base with the global weight
            raise BadValue(f"{path}: linear with a base_model needs parameters.weight for it")
        name = _name(str(base), models)
        models[name], weights[name] = str(base), float(globals_["weight"])
    method_class = Mergekit(
        merge_method=method,
        weights=weights,
        densities=densities or None,
        normalize=globals_.get("normalize"),
        rescale=globals_.get("rescale"),
        lambda_=float(globals_.get("lambda", 1.0)),
    )
    return {
        "base": str(base) if base is not None else next(iter(models.values())),
        "models": models,
        "method": method_class,
        "dtype": document.get("out_dtype") or document.get("dtype"),
    }


def _refuse_unread(fields: Mapping, read: tuple[str, ...], where: str) -> None:
    unread = [key for key in fields if key not in read]
    if unread:
        raise BadValue(
            f"{where}: mergelab does not read the mergekit field {unread[0]!r} "
            f"(it reads {', '.join(read)})"
        )


def _scalars(parameters: object, read: tuple[str, ...], where: str) -> dict:
    if not isinstance(parameters, Mapping):
        raise BadValue(f"{where}: parameters must be a mapping")
    _refuse_unread(parameters, read, f"{where} parameters")
    for key, value in parameters.items():
        if isinstance(value, (list, Mapping)):
            raise BadValue(
                f"{where}: {key} is a gradient or a per-tensor filter; mergelab reads one "
                "number per parameter"
            )
    return dict(parameters)


def _name(source: str, taken: Mapping[str, str]) -> str:
    """A model's name: the last part of its path or hub id, numbered if taken."""
    stem = Path(source.rstrip("/")).name or source
    name, number = stem, 2
    while name in taken:
        name, number = f"{stem}-{number}", number + 1
    return name
