"""fxpar: model parallelism for unmodified PyTorch modules.

>>> import fxpar
>>> pm = fxpar.parallelize(model, fxpar.Mesh(tp=2))        # doctest: +SKIP
>>> plan = fxpar.compile(model, fxpar.Mesh(tp=2), (x,))    # doctest: +SKIP
"""

from .capture import capture
from .autoplan import autoplan
from .checkpoint import latest_checkpoint, load, save
from .cost import Estimate, estimate
from .empty_weights import empty_weights
from .errors import (
    CaptureError, CheckpointError, CollectiveError, DivergenceError, FxparError, MeshError, OptionError, PlanError,
    RankMismatchError,
)
from .mesh import Mesh
from .placement import Partial, Replicate, Shard
from .parallelize import parallelize
from .plan import Plan
from .plan import compile as compile  # public (fxpar.compile), kept out of __all__
from .runtime.module import ParallelModule

# ``compile`` is public (fxpar.compile) but left out of ``import *``, where it would shadow the builtin
__all__ = [
    "Mesh",
    "parallelize",
    "ParallelModule",
    "Plan",
    "estimate",
    "autoplan",
    "Estimate",
    "capture",
    "save",
    "load",
    "latest_checkpoint",
    "empty_weights",
    "Shard",
    "Replicate",
    "Partial",
    "FxparError",
    "CaptureError",
    "MeshError",
    "PlanError",
    "DivergenceError",
    "CollectiveError",
    "RankMismatchError",
    "OptionError",
    "CheckpointError",
]
