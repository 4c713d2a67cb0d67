"""mergelab: merge fine-tuned CLIP image encoders and score every result on every task.

The merge API needs only torch and safetensors; the Lightning parts import on use.
"""

from mergelab.engine.checkpoints import SafetensorsCheckpoint, open_checkpoint, save_state_dict
from mergelab.engine.consensus import consensus_merge
from mergelab.engine.dare import dare, dare_vector
from mergelab.engine.parameterwise import TaskVectors
from mergelab.engine.pool import ModelPool
from mergelab.engine.spectral import (
    isotropic,
    isotropic_vector,
    task_singular_vectors,
    tsv_vector,
)
from mergelab.engine.tall_layout import DEFAULT_LAMBDAS
from mergelab.engine.tall_masks import TallMasks
from mergelab.engine.task_arithmetic import task_arithmetic, task_arithmetic_vector
from mergelab.engine.ties import ties, ties_merged_vector
from mergelab.engine.trust_region import TrustRegionVector, trust_region, trust_region_vector

__all__ = [
    "DEFAULT_LAMBDAS",
    "ModelPool",
    "SafetensorsCheckpoint",
    "TallMasks",
    "TaskVectors",
    "TrustRegionVector",
    "consensus_merge",
    "dare",
    "dare_vector",
    "isotropic",
    "isotropic_vector",
    "open_checkpoint",
    "save_state_dict",
    "task_arithmetic",
    "task_arithmetic_vector",
    "task_singular_vectors",
    "ties",
    "ties_merged_vector",
    "trust_region",
    "trust_region_vector",
    "tsv_vector",
]
