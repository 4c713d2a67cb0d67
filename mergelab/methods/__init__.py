"""Merge methods, one class a file, each holding only its own settings (mergekit's
``merge_methods`` in spirit). The CLI picks one by class (``--merge.method=TrustRegion``,
or ``class_path``/``init_args`` in YAML); a class of your own that subclasses
:class:`MergeMethod` plugs in the same way, by its class path."""

from mergelab.methods.base import MergeContext, MergeMethod, ScaledMethod, Variants
from mergelab.methods.consensus import Consensus
from mergelab.methods.dare import Dare
from mergelab.methods.finetuned import Finetuned
from mergelab.methods.isotropic import Isotropic
from mergelab.methods.mergekit import Mergekit
from mergelab.methods.tall_masks import TallMasks
from mergelab.methods.task_arithmetic import TaskArithmetic
from mergelab.methods.task_singular_vectors import TaskSingularVectors
from mergelab.methods.ties import Ties
from mergelab.methods.trust_region import TrustRegion
from mergelab.methods.zero_shot import ZeroShot

__all__ = [
    "Consensus",
    "Dare",
    "Finetuned",
    "Isotropic",
    "MergeContext",
    "MergeMethod",
    "Mergekit",
    "ScaledMethod",
    "TallMasks",
    "TaskArithmetic",
    "TaskSingularVectors",
    "Ties",
    "TrustRegion",
    "Variants",
    "ZeroShot",
]
