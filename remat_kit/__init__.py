"""remat_kit: gradient checkpointing (rematerialization) for JAX and Flax.

Pick what to save, recompute or offload; see what it costs; trust that the
gradients do not change.

Layers, each importing only those before it: ``_jax`` (the JAX boundary) ->
``policies`` -> ``_dispatch`` (classic remat or jax_remat3) -> ``transforms``
-> ``flax`` -> ``models`` -> ``report`` -> ``pipelining`` -> ``solver``/``planner``; ``microbatch``
(gradient accumulation in one step) stands apart, on JAX alone.
"""

from remat_kit import flax as flax
from remat_kit import microbatch as microbatch
from remat_kit import models as models
from remat_kit import pipelining as pipelining
from remat_kit import planner as planner
from remat_kit import policies as policies
from remat_kit import report as report
from remat_kit import solver as solver
from remat_kit import testing as testing
from remat_kit.microbatch import microbatched_value_and_grad as microbatched_value_and_grad
from remat_kit.pipelining import pipeline as pipeline
from remat_kit.planner import auto as auto
from remat_kit.planner import auto_remat as auto_remat
from remat_kit.policies import Policy as Policy
from remat_kit.policies import from_config as from_config
from remat_kit.report import compare as compare
from remat_kit.report import diff as diff
from remat_kit.report import explain_peak as explain_peak
from remat_kit.report import lint as lint
from remat_kit.report import memory_report as memory_report
from remat_kit.report import memory_timeline as memory_timeline
from remat_kit.transforms import checkpoint_name as checkpoint_name
from remat_kit.transforms import classic_remat as classic_remat
from remat_kit.transforms import level_lengths as level_lengths
from remat_kit.transforms import remat as remat
from remat_kit.transforms import remat_scan as remat_scan
from remat_kit.transforms import remat_sequential as remat_sequential
from remat_kit.transforms import to_jax_policy as to_jax_policy

__version__ = "0.3.0"

# Subpackages stay attributes (`rk.report`, `rk.models`, ...) but are not in `__all__`:
# `from remat_kit import *` binds the functions and never shadows the user's own `flax`.
__all__ = [
    "Policy",
    "auto",
    "auto_remat",
    "checkpoint_name",
    "classic_remat",
    "compare",
    "diff",
    "explain_peak",
    "from_config",
    "lint",
    "memory_report",
    "memory_timeline",
    "microbatched_value_and_grad",
    "pipeline",
    "level_lengths",
    "remat",
    "remat_scan",
    "remat_sequential",
    "to_jax_policy",
]
