"""A ResNet-style CNN in Linen: a stack of residual conv blocks with GroupNorm.

Tags in each `ResBlock`: ``conv1``, ``norm1`` (after the ReLU) and ``conv2``.
GroupNorm, not BatchNorm: a scanned, rematerialized stack carries no
mutable statistics, and recomputation must not update them twice.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from remat_kit.flax.linen import LayerStack
from remat_kit.transforms import checkpoint_name

__all__ = ["ResBlock", "ResNet"]


class ResBlock(nn.Module):
  """``relu(x + GN(conv(relu(GN(conv(x))))))`` with 3x3 convolutions.

  Attributes:
    features: channels in and out.
    norm_groups: GroupNorm groups.
  """

  features: int
  norm_groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = checkpoint_name(nn.Conv(self.features, (3, 3))(x), "conv1")
    h = checkpoint_name(nn.relu(nn.GroupNorm(self.norm_groups)(h)), "norm1")
    h = checkpoint_name(nn.Conv(self.features, (3, 3))(h), "conv2")
    return nn.relu(x + nn.GroupNorm(self.norm_groups)(h))


class ResNet(nn.Module):
  """Stem convolution, ``num_blocks`` `ResBlock` s, global average pool, classifier.

  Attributes:
    features, num_blocks, num_classes, norm_groups: the architecture.
    policy, levels, scan: as in :class:`remat_kit.flax.LayerStack`.
  """

  features: int = 32
  num_blocks: int = 8
  num_classes: int = 10
  norm_groups: int = 8
  policy: Any = True
  levels: int | tuple[int, ...] | None = None
  scan: bool = True

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(self.features, (3, 3), name="stem")(images))
    x = LayerStack(ResBlock(self.features, self.norm_groups), self.num_blocks,
                   policy=self.policy, levels=self.levels, scan=self.scan, name="blocks")(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
