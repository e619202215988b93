"""The seeds' MLP with dropout, in Linen: `CheckpointedMLP`.

The JAX counterpart of the PyTorch reference ``CheckpointedMLP``: an input
layer (Dense, ReLU, Dropout), ``depth`` hidden layers of the same width, and
an output layer. Checkpointing can be switched on and off; by default only
the middle (hidden) layers are rematerialized. Dropout draws from the
``"dropout"`` PRNG stream, so with the same keys the masks, outputs and
gradients are identical with and without remat.

Tags in each hidden layer: ``dense`` (the matmul), ``relu`` and ``dropout``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax

from remat_kit.flax.decorator import remat_policy
from remat_kit.transforms import checkpoint_name

__all__ = ["CheckpointedMLP", "HiddenLayer"]


class HiddenLayer(nn.Module):
  """Dense -> ReLU -> Dropout, each output tagged."""

  width: int
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h = checkpoint_name(nn.Dense(self.width)(x), "dense")
    h = checkpoint_name(nn.relu(h), "relu")
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return checkpoint_name(h, "dropout")


@functools.lru_cache(maxsize=32)
def _rematted(policy: Any) -> type:
  return remat_policy(policy, static_argnames="train")(HiddenLayer)


class CheckpointedMLP(nn.Module):
  """Input layer, ``depth`` hidden layers, output; remat on the hidden layers.

  Attributes:
    width: hidden width.
    depth: number of hidden layers (4 in the reference).
    num_outputs: output features.
    dropout_rate: dropout after every ReLU.
    checkpoint: rematerialize the hidden layers.
    policy: the remat policy (a hashable config value), full remat by default.
    checkpoint_layers: which hidden layers to rematerialize; all by default.
  """

  width: int = 256
  depth: int = 4
  num_outputs: int = 10
  dropout_rate: float = 0.1
  checkpoint: bool = True
  policy: Any = "full"
  checkpoint_layers: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = HiddenLayer(self.width, self.dropout_rate, name="input")(x, train)
    which = range(self.depth) if self.checkpoint_layers is None else self.checkpoint_layers
    for i in range(self.depth):
      cls = _rematted(self.policy) if self.checkpoint and i in which else HiddenLayer
      x = cls(self.width, self.dropout_rate, name=f"hidden_{i}")(x, train)
    return nn.Dense(self.num_outputs, name="output")(x)
