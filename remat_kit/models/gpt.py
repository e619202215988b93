"""A GPT-style decoder stack in Linen: pre-LN, causal multi-head attention, MLP, dropout.

Tags in each block (the names the transformer presets use):

* ``qkv``: the fused query/key/value projection, ``[b, s, 3d]``;
* ``attn_scores``: ``q k^T / sqrt(d_head)``, ``[b, heads, s, s]``;
* ``attn_probs``: the softmax of the masked scores, ``[b, heads, s, s]``;
* ``attn_out``: the attention output projection, ``[b, s, d]``;
* ``mlp_in``: the MLP up-projection before GeLU, ``[b, s, r d]``;
* ``mlp_hidden``: the GeLU output, ``[b, s, r d]``;
* ``mlp_out``: the MLP down-projection, ``[b, s, d]``.

`GPT` stacks the blocks with :class:`remat_kit.flax.LayerStack`, so the
remat policy, the nesting and scanned-or-unrolled are attributes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from remat_kit.flax.linen import LayerStack
from remat_kit.transforms import checkpoint_name

__all__ = ["GPT", "GPTBlock", "causal_attention"]


def causal_attention(qkv: jax.Array, num_heads: int,
                     dropout: Callable[[jax.Array], jax.Array], tags: bool = True
                     ) -> jax.Array:
  """Causal multi-head attention from a fused ``[b, s, 3d]`` projection.

  Tags ``attn_scores`` and ``attn_probs`` (unless ``tags`` is False); ``dropout`` is
  applied to the probabilities. Returns ``[b, s, d]`` before the output projection.
  """
  tag = checkpoint_name if tags else _untagged
  b, s, three_d = qkv.shape
  d = three_d // 3
  if d % num_heads:
    raise ValueError(f"`causal_attention`: width {d} is not divisible by `num_heads`="
                     f"{num_heads}.")
  q, k, v = (t.reshape(b, s, num_heads, d // num_heads) for t in jnp.split(qkv, 3, axis=-1))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // num_heads)
  scores = tag(scores, "attn_scores")
  mask = jnp.tril(jnp.ones((s, s), bool))[None, None]
  scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
  probs = tag(jax.nn.softmax(scores, axis=-1), "attn_probs")
  out = jnp.einsum("bhqk,bkhd->bqhd", dropout(probs), v)
  return out.reshape(b, s, d)


class GPTBlock(nn.Module):
  """Pre-LN decoder block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``, with dropout.

  Attributes:
    d_model: the width ``d``.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width as a multiple of ``d``.
    dropout_rate: dropout on attention probabilities and both residual branches.
    dtype: the activation dtype (parameters stay float32).
    logical_axes: give every parameter logical axis names
      (``nn.with_logical_partitioning``): ``embed``, ``heads`` (the attention
      projections), ``mlp``, ``vocab``. The initial values are unchanged.
    tags: tag the block's tensors with `checkpoint_name` (``qkv``, ``attn_scores``,
      ``attn_probs``, ``attn_out``, ``mlp_in``, ``mlp_hidden``, ``mlp_out``); False for a
      model with none, as most users' are.
  """

  d_model: int
  num_heads: int
  mlp_ratio: int = 4
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  logical_axes: bool = False
  tags: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    d, dt = self.d_model, self.dtype
    dense = lambda n, axes: _dense(n, axes, dt, self.logical_axes)
    norm = lambda: _layer_norm(dt, self.logical_axes)
    drop = lambda y: nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    tag = checkpoint_name if self.tags else _untagged
    h = norm()(x)
    qkv = tag(dense(3 * d, ("embed", "heads"))(h), "qkv")
    o = causal_attention(qkv, self.num_heads, drop, self.tags)
    o = tag(dense(d, ("heads", "embed"))(o), "attn_out")
    x = x + drop(o)
    h = norm()(x)
    h = tag(dense(self.mlp_ratio * d, ("embed", "mlp"))(h), "mlp_in")
    h = tag(nn.gelu(h), "mlp_hidden")
    h = tag(dense(d, ("mlp", "embed"))(h), "mlp_out")
    return x + drop(h)


def _untagged(x: jax.Array, name: str) -> jax.Array:
  del name
  return x


def _logical(init: Any, axes: tuple[str | None, ...], on: bool) -> Any:
  return nn.with_logical_partitioning(init, axes) if on else init


def _dense(features: int, axes: tuple[str, str], dtype: Any, logical: bool) -> nn.Dense:
  return nn.Dense(features, dtype=dtype,
                  kernel_init=_logical(nn.linear.default_kernel_init, axes, logical),
                  bias_init=_logical(nn.initializers.zeros_init(), axes[1:], logical))


def _layer_norm(dtype: Any, logical: bool) -> nn.LayerNorm:
  return nn.LayerNorm(dtype=dtype,
                      scale_init=_logical(nn.initializers.ones_init(), ("embed",), logical),
                      bias_init=_logical(nn.initializers.zeros_init(), ("embed",), logical))


class GPT(nn.Module):
  """Token and position embeddings, ``num_layers`` `GPTBlock` s, final LN, LM head.

  Attributes:
    vocab_size: tokens in the vocabulary (embedding rows, LM head columns).
    max_len: the longest sequence (position embedding rows).
    d_model: the residual stream's width.
    num_heads: attention heads per block.
    num_layers: how many `GPTBlock` s.
    mlp_ratio: the MLP's hidden width over ``d_model``.
    dropout_rate: dropout on the embeddings and in every block (see `GPTBlock`).
    dtype: the activations' dtype (parameters stay float32).
    policy: remat policy inside each block (``False``: no remat).
    levels: nesting of the layer scan (see :class:`remat_kit.flax.LayerStack`).
    scan: scan over the blocks (True) or unroll them (False).
    logical_axes: logical axis names on every parameter (see `GPTBlock`);
      the stacked blocks' leading axis is ``"layers"``.
    tags: the blocks' `checkpoint_name` tags (see `GPTBlock`); False for none.
  """

  vocab_size: int = 256
  max_len: int = 128
  d_model: int = 128
  num_heads: int = 4
  num_layers: int = 4
  mlp_ratio: int = 4
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  policy: Any = True
  levels: int | tuple[int, ...] | None = None
  scan: bool = True
  logical_axes: bool = False
  tags: bool = True

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = True) -> jax.Array:
    s = tokens.shape[-1]
    if s > self.max_len:
      raise ValueError(f"`GPT`: sequence length {s} exceeds `max_len`={self.max_len}.")
    on = self.logical_axes
    pos = self.param("pos_embed", _logical(nn.initializers.normal(0.02), (None, "embed"), on),
                     (self.max_len, self.d_model))
    embed = nn.Embed(self.vocab_size, self.d_model,
                     embedding_init=_logical(nn.linear.default_embed_init, ("vocab", "embed"), on))
    x = embed(tokens) + pos[None, :s]
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x).astype(self.dtype)
    block = GPTBlock(self.d_model, self.num_heads, self.mlp_ratio, self.dropout_rate,
                     self.dtype, logical_axes=on, tags=self.tags)
    x = LayerStack(block, self.num_layers, policy=self.policy, levels=self.levels,
                   scan=self.scan, name="blocks")(x, train)
    x = _layer_norm(self.dtype, on)(x)
    return _dense(self.vocab_size, ("embed", "vocab"), jnp.float32, on)(x)
