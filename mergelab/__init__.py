"""mergelab: merge fine-tuned CLIP image encoders and score every result on every task.

The merge API needs only torch and safetensors; the Lightning parts import on use. Every
name below is imported on first use, so that ``import mergelab`` (the console script's
start, ``mergelab --help``) costs no torch import.
"""

from __future__ import annotations

import importlib

# each public name → the module that defines it
_EXPORTS = {
    "DEFAULT_LAMBDAS": "mergelab.engine.tall_layout",
    "ModelPool": "mergelab.engine.pool",
    "SafetensorsCheckpoint": "mergelab.engine.checkpoints",
    "TallMasks": "mergelab.engine.tall_masks",
    "TaskVectors": "mergelab.engine.parameterwise",
    "TrustRegionVector": "mergelab.engine.trust_region",
    "consensus_merge": "mergelab.engine.consensus",
    "dare": "mergelab.engine.dare",
    "dare_vector": "mergelab.engine.dare",
    "isotropic": "mergelab.engine.spectral",
    "isotropic_vector": "mergelab.engine.spectral",
    "open_checkpoint": "mergelab.engine.model_files",
    "save_state_dict": "mergelab.engine.checkpoints",
    "task_arithmetic": "mergelab.engine.task_arithmetic",
    "task_arithmetic_vector": "mergelab.engine.task_arithmetic",
    "task_singular_vectors": "mergelab.engine.spectral",
    "ties": "mergelab.engine.ties",
    "ties_merged_vector": "mergelab.engine.ties",
    "trust_region": "mergelab.engine.trust_region",
    "trust_region_vector": "mergelab.engine.trust_region",
    "tsv_vector": "mergelab.engine.spectral",
}
# the subpackages, reachable as attributes (mergelab.engine.dare, ...) before any import
_SUBPACKAGES = ("engine", "merging", "methods", "models", "tasks", "io", "lightning")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS and name not in _SUBPACKAGES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # the first use imports every public module, as an eager __init__ would: afterwards
    # mergelab.engine.dare and the like are there as attributes too
    for module in dict.fromkeys(_EXPORTS.values()):
        importlib.import_module(module)
    for export, module in _EXPORTS.items():
        globals()[export] = getattr(importlib.import_module(module), export)
    if name in _SUBPACKAGES:
        globals()[name] = importlib.import_module(f"{__name__}.{name}")
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBPACKAGES})
