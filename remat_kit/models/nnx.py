"""The reference models in Flax NNX, with the same tags as their Linen twins.

* `HiddenLayer` / `CheckpointedMLP`: the seeds' MLP with dropout.
* `GPTBlock` / `GPT`: pre-LN causal decoder (tags qkv, attn_scores,
  attn_probs, attn_out, mlp_in, mlp_hidden, mlp_out).
* `ResBlock` / `ResNet`: residual conv blocks with GroupNorm (conv1, norm1,
  conv2).
* `ChunkedGRU`: a GRU rematerialized per chunk of time steps (hidden).

Stacks use :class:`remat_kit.flax.nnx.LayerStack`; dropout draws from the
``dropout`` stream of the ``nnx.Rngs`` given at construction.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from remat_kit.flax.decorator import remat_policy
from remat_kit.flax.nnx import LayerStack
from remat_kit.models.gpt import causal_attention
from remat_kit.models.rnn import chunked_time_scan
from remat_kit.transforms import checkpoint_name

__all__ = ["GPT", "ChunkedGRU", "CheckpointedMLP", "GPTBlock", "HiddenLayer", "ResBlock",
           "ResNet"]


class HiddenLayer(nnx.Module):
  """Linear -> ReLU -> Dropout, tagged ``dense``, ``relu``, ``dropout``."""

  def __init__(self, din: int, width: int, dropout_rate: float, *, rngs: nnx.Rngs) -> None:
    self.linear = nnx.Linear(din, width, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    h = checkpoint_name(self.linear(x), "dense")
    h = checkpoint_name(nnx.relu(h), "relu")
    return checkpoint_name(self.dropout(h, deterministic=not train), "dropout")


class CheckpointedMLP(nnx.Module):
  """Input layer, ``depth`` hidden layers (rematerialized when ``checkpoint``), output."""

  def __init__(self, din: int, width: int = 256, depth: int = 4, num_outputs: int = 10,
               dropout_rate: float = 0.1, *, checkpoint: bool = True, policy: Any = "full",
               rngs: nnx.Rngs) -> None:
    hidden = remat_policy(policy, static_argnames="train")(HiddenLayer) if checkpoint \
        else HiddenLayer
    self.input = HiddenLayer(din, width, dropout_rate, rngs=rngs)
    self.hidden = nnx.List([hidden(width, width, dropout_rate, rngs=rngs) for _ in range(depth)])
    self.output = nnx.Linear(width, num_outputs, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = self.input(x, train)
    for layer in self.hidden:
      x = layer(x, train)
    return self.output(x)


class GPTBlock(nnx.Module):
  """Pre-LN decoder block, as :class:`remat_kit.models.gpt.GPTBlock`."""

  def __init__(self, d_model: int, num_heads: int, mlp_ratio: int = 4,
               dropout_rate: float = 0.1, *, rngs: nnx.Rngs) -> None:
    d = d_model
    self.num_heads = num_heads
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
    self.proj = nnx.Linear(d, d, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, mlp_ratio * d, rngs=rngs)
    self.down = nnx.Linear(mlp_ratio * d, d, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    drop = lambda y: self.dropout(y, deterministic=not train)
    qkv = checkpoint_name(self.qkv(self.ln1(x)), "qkv")
    o = checkpoint_name(self.proj(causal_attention(qkv, self.num_heads, drop)), "attn_out")
    x = x + drop(o)
    h = checkpoint_name(self.up(self.ln2(x)), "mlp_in")
    h = checkpoint_name(nnx.gelu(h), "mlp_hidden")
    return x + drop(checkpoint_name(self.down(h), "mlp_out"))


class GPT(nnx.Module):
  """Embeddings, a `LayerStack` of `GPTBlock` s, final LN and LM head."""

  def __init__(self, vocab_size: int = 256, max_len: int = 128, d_model: int = 128,
               num_heads: int = 4, num_layers: int = 4, mlp_ratio: int = 4,
               dropout_rate: float = 0.1, *, policy: Any = True, levels: Any = None,
               rngs: nnx.Rngs) -> None:
    self.max_len = max_len
    self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
    self.pos_embed = nnx.Param(jax.random.normal(rngs.params(), (max_len, d_model)) * 0.02)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.blocks = LayerStack(
        lambda r: GPTBlock(d_model, num_heads, mlp_ratio, dropout_rate, rngs=r), num_layers,
        rngs=rngs, policy=policy, levels=levels)
    self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

  def __call__(self, tokens: jax.Array, train: bool = True, unrolled: bool = False
               ) -> jax.Array:
    s = tokens.shape[-1]
    if s > self.max_len:
      raise ValueError(f"`GPT`: sequence length {s} exceeds `max_len`={self.max_len}.")
    x = self.dropout(self.embed(tokens) + self.pos_embed[None, :s], deterministic=not train)
    x = self.blocks.unrolled(x, train) if unrolled else self.blocks(x, train)
    return self.head(self.ln_f(x))


class ResBlock(nnx.Module):
  """Residual conv block with GroupNorm, as :class:`remat_kit.models.cnn.ResBlock`."""

  def __init__(self, features: int, norm_groups: int = 8, *, rngs: nnx.Rngs) -> None:
    self.conv1 = nnx.Conv(features, features, (3, 3), rngs=rngs)
    self.norm1 = nnx.GroupNorm(features, num_groups=norm_groups, rngs=rngs)
    self.conv2 = nnx.Conv(features, features, (3, 3), rngs=rngs)
    self.norm2 = nnx.GroupNorm(features, num_groups=norm_groups, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = checkpoint_name(self.conv1(x), "conv1")
    h = checkpoint_name(nnx.relu(self.norm1(h)), "norm1")
    h = checkpoint_name(self.conv2(h), "conv2")
    return nnx.relu(x + self.norm2(h))


class ResNet(nnx.Module):
  """Stem, a `LayerStack` of `ResBlock` s, average pool, classifier."""

  def __init__(self, in_channels: int = 3, features: int = 32, num_blocks: int = 8,
               num_classes: int = 10, norm_groups: int = 8, *, policy: Any = True,
               levels: Any = None, rngs: nnx.Rngs) -> None:
    self.stem = nnx.Conv(in_channels, features, (3, 3), rngs=rngs)
    self.blocks = LayerStack(lambda r: ResBlock(features, norm_groups, rngs=r), num_blocks,
                             rngs=rngs, policy=policy, levels=levels)
    self.head = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, images: jax.Array, unrolled: bool = False) -> jax.Array:
    x = nnx.relu(self.stem(images))
    x = self.blocks.unrolled(x) if unrolled else self.blocks(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


class ChunkedGRU(nnx.Module):
  """GRU over ``[batch, time, features]`` rematerialized per ``chunk`` steps."""

  def __init__(self, in_features: int, hidden: int = 64, num_outputs: int = 10, *,
               chunk: int | None = None, policy: Any = False, rngs: nnx.Rngs) -> None:
    self.hidden = hidden
    self.chunk = chunk
    self.policy = policy
    self.cell = nnx.GRUCell(in_features, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, num_outputs, rngs=rngs)

  def __call__(self, xs: jax.Array) -> jax.Array:
    graphdef, state = nnx.split(self.cell)

    def step(c: jax.Array, x: jax.Array) -> tuple[jax.Array, None]:
      c, _ = nnx.merge(graphdef, state)(c, x)
      return checkpoint_name(c, "hidden"), None

    c0 = jnp.zeros((xs.shape[0], self.hidden), xs.dtype)
    last = chunked_time_scan(step, c0, jnp.swapaxes(xs, 0, 1), self.chunk, self.policy)
    return self.head(last)
