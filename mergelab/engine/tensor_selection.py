"""Which tensors of a model pool are merged, and why the others are copied from θ0.

A tensor is merged when it is floating point, has the same shape in every model and
matches none of the user's ``exclude`` patterns. The others are copied from the base
model, each with its reason, so that a merge command can name every one of them: integer
buffers, excluded tensors, and (when allowed) tensors whose shape differs between models,
such as an embedding of a resized vocabulary.

Everything else that differs between the models is bad input, named before any tensor is
read: a tensor missing from a model, one a model has and the base has not, or one stored
in another dtype (a bf16 fine-tune of an fp32 base is another model, not a task vector).
Excluded tensors are exempt from all three checks.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mergelab.engine.checkpoints import TensorSpec, tensor_spec
from mergelab.errors import BadValue, MissingKey

NOT_FLOATING = "not floating point"
EXCLUDED = "excluded by pattern"
SHAPE_DIFFERS = "shape differs between models"


@dataclass(frozen=True)
class TensorSelection:
    """What a pool may copy from θ0 rather than merge.

    Args:
        exclude: glob patterns (``fnmatch``, e.g. ``lm_head.*`` or ``*.embed_tokens.*``)
            of tensor names copied from the base model unmerged.
        copy_mismatched_shapes: copy a tensor whose shape differs between models from the
            base (a resized vocabulary); refuse it otherwise.
    """

    exclude: Sequence[str] = ()
    copy_mismatched_shapes: bool = False

    def __post_init__(self) -> None:
        for pattern in self.exclude:
            if not isinstance(pattern, str) or not pattern:
                raise BadValue(f"exclude: {pattern!r} is not a tensor name pattern")

    def excluded_by(self, key: str) -> str | None:
        """The first pattern that excludes ``key``, if any."""
        return next((p for p in self.exclude if fnmatch.fnmatchcase(key, p)), None)


STRICT = TensorSelection()


def select_tensors(
    specs: Mapping[str, TensorSpec],
    models: Mapping[str, Mapping],
    selection: TensorSelection = STRICT,
) -> tuple[list[str], dict[str, str]]:
    """(merged keys in θ0's order, {copied key: reason}) for θ0's ``specs`` and the
    fine-tuned ``models`` by name; raises naming the model and the key for a layout that
    cannot be merged."""
    for name, model in models.items():
        check_same_layout(specs, model, f"fine-tuned model {name!r}", selection)
    merged: list[str] = []
    copied: dict[str, str] = {}
    for key, spec in specs.items():
        pattern = selection.excluded_by(key)
        if pattern is not None:
            copied[key] = f"{EXCLUDED} {pattern!r}"
        elif not spec.dtype.is_floating_point:
            copied[key] = NOT_FLOATING
        elif any(tensor_spec(model, key).shape != spec.shape for model in models.values()):
            copied[key] = SHAPE_DIFFERS
        else:
            merged.append(key)
    return merged, copied


def check_same_layout(
    specs: Mapping[str, TensorSpec],
    model: Mapping,
    name: str,
    selection: TensorSelection = STRICT,
) -> None:
    """Raise, naming ``name`` and the key, unless ``model`` has the keys, shapes and
    dtypes of ``specs`` (excluded keys aside; shapes may differ where the selection
    copies mismatched shapes)."""
    keys = set(model)
    missing = [k for k in specs if k not in keys and selection.excluded_by(k) is None]
    if missing:
        raise MissingKey(f"{name} lacks {missing[0]!r} (and {len(missing) - 1} more keys)")
    extra = [k for k in model if k not in specs and selection.excluded_by(k) is None]
    if extra:
        raise MissingKey(f"{name} has {extra[0]!r}, which the pretrained model does not")
    for key, spec in specs.items():
        if key not in keys or selection.excluded_by(key) is not None:
            continue
        other = tensor_spec(model, key)
        if other.dtype != spec.dtype or (
            other.shape != spec.shape and not selection.copy_mismatched_shapes
        ):
            raise BadValue(
                f"{name}: {key!r} is {other.shape} {other.dtype}, "
                f"the pretrained model has {spec.shape} {spec.dtype}"
            )
