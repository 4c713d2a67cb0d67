"""mergelab: merge fine-tuned CLIP image encoders and score every result on every task.

The merge API needs only torch and safetensors; the Lightning parts import on use.
"""

from mergelab.engine.checkpoints import SafetensorsCheckpoint, open_checkpoint, save_state_dict
from mergelab.engine.consensus import consensus_merge
from mergelab.engine.pool import ModelPool
from mergelab.engine.tall_masks import DEFAULT_LAMBDAS, TallMasks
from mergelab.engine.task_arithmetic import task_arithmetic, task_arithmetic_vector
from mergelab.engine.trust_region import TrustRegionVector, trust_region, trust_region_vector

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
