"""Flax integration: rematerialize modules without changing their parameters."""

from remat_kit.flax.linen import remat_policy  # Linen and NNX

__all__ = ["remat_policy"]
