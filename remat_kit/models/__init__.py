"""Reference models, tagged with `checkpoint_name` so name-based policies apply."""

from remat_kit.models.mlp import CheckpointedMLP, HiddenLayer

__all__ = ["CheckpointedMLP", "HiddenLayer"]
