"""remat_kit: gradient checkpointing (rematerialization) for JAX and Flax.

Pick what to save, recompute or offload; see what it costs; trust that the
gradients do not change.
"""

from remat_kit import flax, models, policies, report, solver
from remat_kit.auto import auto
from remat_kit.policies import Policy, from_config
from remat_kit.report import compare, diff, lint, memory_report
from remat_kit.transforms import checkpoint_name, plan_groups, remat, remat_scan, remat_sequential

__version__ = "0.1.0"

__all__ = [
    "Policy",
    "auto",
    "checkpoint_name",
    "compare",
    "diff",
    "flax",
    "from_config",
    "lint",
    "memory_report",
    "models",
    "plan_groups",
    "policies",
    "report",
    "remat",
    "remat_scan",
    "remat_sequential",
    "solver",
]
