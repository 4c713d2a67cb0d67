"""mergelab: merge fine-tuned CLIP image encoders and score every result on every task.

The merge API needs only torch and safetensors; the Lightning parts import on use.
"""

from mergelab.io.checkpoints import SafetensorsCheckpoint, open_checkpoint, save_state_dict
from mergelab.merge import (
    TrustRegionVector,
    task_arithmetic,
    task_arithmetic_vector,
    trust_region,
    trust_region_vector,
)
from mergelab.pool import ModelPool
from mergelab.tall import DEFAULT_LAMBDAS, TallMasks, consensus_merge

__all__ = [
    "DEFAULT_LAMBDAS",
    "ModelPool",
    "SafetensorsCheckpoint",
    "TallMasks",
    "TrustRegionVector",
    "consensus_merge",
    "open_checkpoint",
    "save_state_dict",
    "task_arithmetic",
    "task_arithmetic_vector",
    "trust_region",
    "trust_region_vector",
]
