"""remat_kit: gradient checkpointing (rematerialization) for JAX and Flax.

Pick what to save, recompute or offload; see what it costs; trust that the
gradients do not change.
"""

from remat_kit import flax
from remat_kit import models
from remat_kit import policies
from remat_kit import report
from remat_kit.policies import Policy
from remat_kit.policies import from_config
from remat_kit.transforms import checkpoint_name
from remat_kit.transforms import plan_groups
from remat_kit.transforms import remat
from remat_kit.transforms import remat_scan
from remat_kit.transforms import remat_sequential

__version__ = "0.1.0"

__all__ = [
    "Policy",
    "checkpoint_name",
    "flax",
    "from_config",
    "models",
    "plan_groups",
    "policies",
    "report",
    "remat",
    "remat_scan",
    "remat_sequential",
]
