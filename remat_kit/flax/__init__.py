"""Flax integration: rematerialize modules without changing their parameters.

* :func:`remat_policy`: class decorator for Linen and NNX modules.
* :class:`LayerStack`: Linen scan over layers with remat (flat or nested),
  with :func:`~remat_kit.flax.linen.stack_layers` /
  :func:`~remat_kit.flax.linen.unstack_layers` for its parameters.
* :class:`remat_kit.flax.nnx.LayerStack`: the NNX twin, with
  :func:`remat_kit.flax.nnx.stack_layers` / ``unstack_layers`` for its modules.

Each framework's module (:mod:`remat_kit.flax.linen`,
:mod:`remat_kit.flax.nnx`) holds its `LayerStack` and the same two helper names.
"""

from remat_kit.flax import linen as linen
from remat_kit.flax import nnx as nnx
from remat_kit.flax.decorator import remat_policy as remat_policy
from remat_kit.flax.linen import LayerStack as LayerStack
from remat_kit.flax.linen import stack_layers as stack_layers
from remat_kit.flax.linen import unstack_layers as unstack_layers

__all__ = [
    "LayerStack",
    "linen",
    "nnx",
    "remat_policy",
    "stack_layers",
    "unstack_layers",
]
