"""Flax integration: rematerialize modules without changing their parameters.

* :func:`remat_policy`: class decorator for Linen and NNX modules.
* :class:`LayerStack`: Linen scan over layers with remat (flat or nested),
  with :func:`stack_params` / :func:`unstack_params`.
* :class:`remat_kit.flax.nnx.LayerStack`: the NNX twin, with
  :func:`remat_kit.flax.nnx.stack_layers` / ``unstack_layers``.
"""

from remat_kit.flax import nnx
from remat_kit.flax.layers import LayerStack, stack_params, unstack_params
from remat_kit.flax.linen import remat_policy  # Linen and NNX

__all__ = ["LayerStack", "nnx", "remat_policy", "stack_params", "unstack_params"]
