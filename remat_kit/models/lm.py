"""An LM1B-style decoder in Linen: the shape of Flax's ``examples/lm1b`` model.

A model written the way users write theirs, with no remat_kit attributes: a
Python loop over ``num_layers`` blocks (pre-LN ``nn.SelfAttention`` with a
causal mask, dropout, a ReLU MLP), parameters boxed with logical axis names
(``nn.with_logical_partitioning``), activations in ``dtype``. Readouts and
:func:`remat_kit.auto` are tested on it because nothing here was written for
them. ``remat`` optionally wraps each block with ``nn.remat`` under a policy,
the way a user would add it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["TransformerLM"]


def _boxed(init: Any, axes: tuple[str | None, ...]) -> Any:
  return nn.with_logical_partitioning(init, axes)


class _MLP(nn.Module):
  mlp_dim: int
  dtype: Any
  dropout_rate: float
  deterministic: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.xavier_uniform()
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_boxed(init, ("embed", "mlp")))(x)
    h = nn.Dropout(self.dropout_rate)(nn.relu(h), deterministic=self.deterministic)
    return nn.Dense(x.shape[-1], dtype=self.dtype,
                    kernel_init=_boxed(init, ("mlp", "embed")))(h)


class _Block(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: Any
  dropout_rate: float
  deterministic: bool

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    norm = lambda: nn.LayerNorm(dtype=self.dtype,
                                scale_init=_boxed(nn.initializers.ones, ("embed",)),
                                bias_init=_boxed(nn.initializers.zeros, ("embed",)))
    h = nn.SelfAttention(num_heads=self.num_heads, dtype=self.dtype, use_bias=False,
                         kernel_init=_boxed(nn.initializers.xavier_uniform(), ("embed", "kv")),
                         broadcast_dropout=False, dropout_rate=self.dropout_rate,
                         deterministic=self.deterministic)(norm()(x), mask)
    x = x + nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)
    return x + _MLP(self.mlp_dim, self.dtype, self.dropout_rate, self.deterministic)(norm()(x))


class TransformerLM(nn.Module):
  """A decoder-only language model: embed, ``num_layers`` blocks, LN, logits.

  Attributes:
    vocab_size: tokens in the vocabulary.
    max_len: the longest sequence (learned position embeddings).
    dtype: the activation dtype (parameters stay float32).
    emb_dim: the model width.
    num_heads: attention heads.
    num_layers: decoder blocks (a Python loop: no scan).
    mlp_dim: the MLP hidden width.
    dropout_rate: dropout on attention probabilities and residual branches.
    deterministic: no dropout (no ``dropout`` rng needed).
    remat: None, or a policy for ``nn.remat`` around each block.

  Like Flax's lm1b, it mixes bfloat16 activations with float32 parameters, so it needs
  JAX's standard dtype promotion (the default).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> lm = TransformerLM(vocab_size=64, emb_dim=32, num_heads=2, num_layers=2, mlp_dim=64,
    ...                    max_len=16, deterministic=True)
    >>> tokens = jnp.ones((2, 16), jnp.int32)
    >>> with jax.numpy_dtype_promotion("standard"):
    ...   params = lm.init(jax.random.key(0), tokens)["params"]
    ...   logits = lm.apply({"params": params}, tokens)
    >>> logits.shape
    (2, 16, 64)
  """

  vocab_size: int = 32_000
  max_len: int = 1024
  dtype: Any = jnp.bfloat16
  emb_dim: int = 1024
  num_heads: int = 16
  num_layers: int = 12
  mlp_dim: int = 4096
  dropout_rate: float = 0.1
  deterministic: bool = False
  remat: Any = None

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    s = tokens.shape[-1]
    embed = nn.Embed(self.vocab_size, self.emb_dim,
                     embedding_init=_boxed(nn.initializers.normal(1.0), ("vocab", "embed")))
    pos = self.param("pos_embedding", _boxed(nn.initializers.normal(0.02), (None, "embed")),
                     (self.max_len, self.emb_dim))
    x = embed(tokens) + pos[None, :s]
    x = nn.Dropout(self.dropout_rate)(x, deterministic=self.deterministic).astype(self.dtype)
    mask = nn.make_causal_mask(tokens, dtype=self.dtype)
    block = _Block if self.remat is None else nn.remat(_Block, policy=self.remat)
    for i in range(self.num_layers):
      x = block(self.num_heads, self.mlp_dim, self.dtype, self.dropout_rate,
                self.deterministic, name=f"block_{i}")(x, mask)
    x = nn.LayerNorm(dtype=self.dtype, scale_init=_boxed(nn.initializers.ones, ("embed",)),
                     bias_init=_boxed(nn.initializers.zeros, ("embed",)))(x)
    logits = nn.Dense(self.vocab_size, dtype=self.dtype,
                      kernel_init=_boxed(nn.initializers.xavier_uniform(), ("embed", "vocab")),
                      name="logits")(x)
    return logits.astype(jnp.float32)



