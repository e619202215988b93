"""Reference models, tagged with `checkpoint_name` so name-based policies apply.

Linen models live here; their NNX twins in :mod:`remat_kit.models.nnx`.
"""

from remat_kit.models import nnx
from remat_kit.models.cnn import ResBlock, ResNet
from remat_kit.models.gpt import GPT, GPTBlock, causal_attention
from remat_kit.models.lm import TransformerLM
from remat_kit.models.mlp import CheckpointedMLP, HiddenLayer
from remat_kit.models.rnn import ChunkedGRU, chunked_time_scan

__all__ = [
    "GPT",
    "ChunkedGRU",
    "CheckpointedMLP",
    "GPTBlock",
    "HiddenLayer",
    "ResBlock",
    "ResNet",
    "TransformerLM",
    "causal_attention",
    "chunked_time_scan",
    "nnx",
]
