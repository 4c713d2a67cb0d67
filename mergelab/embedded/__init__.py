"""The embedded default: a miniature eight-task benchmark built on the user's machine.

Configs name its files as ``embedded:<asset>`` (``embedded:pretrained``,
``embedded:tasks/shape``, ``embedded:finetuned/shape``, ...). The applications (the CLI,
``mergelab sweep``) replace them with paths through :func:`expand` before anything is
instantiated, building the benchmark on first use; the loaders below only see paths.
"""

from __future__ import annotations

from argparse import Namespace

PREFIX = "embedded:"


def resolve(value: str) -> str:
    """The path of an ``embedded:<asset>`` reference, in the preset named by
    $MERGELAB_EMBEDDED_PRESET (``default`` if unset) under $MERGELAB_CACHE; any other
    value unchanged."""
    if not isinstance(value, str) or not value.startswith(PREFIX):
        return value
    from mergelab.embedded.build import EmbeddedBenchmark

    return str(EmbeddedBenchmark().asset(value[len(PREFIX) :]))


def expand(config):
    """``config`` (mappings, lists, argparse/jsonargparse namespaces, in place where
    mutable) with every ``embedded:`` reference replaced by its path."""
    if isinstance(config, Namespace):
        for key, value in vars(config).items():
            setattr(config, key, expand(value))
        return config
    if isinstance(config, dict):
        for key, value in config.items():
            config[key] = expand(value)
        return config
    if isinstance(config, list):
        config[:] = [expand(value) for value in config]
        return config
    return resolve(config)
