"""The embedded default: a miniature eight-task benchmark built on the user's machine.

Configs name its files as ``embedded:<asset>`` (``embedded:pretrained``,
``embedded:tasks/shape``, ``embedded:finetuned/shape``, ...); the loaders pass every
path through :func:`resolve`, which builds the benchmark on first use.
"""

from __future__ import annotations

PREFIX = "embedded:"


def resolve(value: str) -> str:
    """The path of an ``embedded:<asset>`` reference, in the preset named by
    $MERGELAB_EMBEDDED_PRESET (``default`` if unset) under $MERGELAB_CACHE; any other
    value unchanged."""
    if not isinstance(value, str) or not value.startswith(PREFIX):
        return value
    from mergelab.embedded.build import EmbeddedBenchmark

    return str(EmbeddedBenchmark().asset(value[len(PREFIX) :]))
