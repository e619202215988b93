"""A GRU over a long sequence in Linen, rematerialized per chunk of time steps.

Backpropagation through T steps keeps every step's gates: memory grows like
T. With ``chunk=c``, the time scan is split into T/c chunks and each chunk is
rematerialized as a whole, so only the T/c chunk-boundary states and one
chunk's gates are kept, for one extra forward pass (``c = sqrt(T)`` is the
classic choice). The hidden state after each step is tagged ``hidden``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from remat_kit.transforms import checkpoint_name, remat_scan

__all__ = ["ChunkedGRU", "chunked_time_scan"]


def chunked_time_scan(step: Any, carry: Any, xs: jax.Array, chunk: int | None,
                      policy: Any) -> Any:
  """``lax.scan(step, carry, xs)`` over time, rematerialized per ``chunk`` steps.

  ``chunk=None`` is the plain scan (no remat). Otherwise the time axis (the
  leading one of ``xs``) must divide into chunks; ``policy`` applies to each
  step inside a chunk (``False`` keeps what a plain step keeps).
  """
  t = xs.shape[0]
  if chunk is None:
    return lax.scan(step, carry, xs)[0]
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1 or t % chunk:
    raise ValueError(
        f"`chunk` must be a positive int dividing the sequence length {t}, got {chunk!r}. "
        f"Divisors of {t}: {[c for c in range(1, t + 1) if t % c == 0]}.")
  return remat_scan(step, carry, xs, policy=policy, levels=(t // chunk, chunk))[0]


class ChunkedGRU(nn.Module):
  """GRU over ``[batch, time, features]``, then a linear head on the last state.

  Attributes:
    hidden: the GRU state size.
    num_outputs: the head's outputs.
    chunk: time steps per rematerialized chunk; None for no remat.
    policy: the remat policy for each step inside a chunk.
  """

  hidden: int = 64
  num_outputs: int = 10
  chunk: int | None = None
  policy: Any = False

  @nn.compact
  def __call__(self, xs: jax.Array) -> jax.Array:
    cell = nn.GRUCell(self.hidden, parent=None)
    c0 = jnp.zeros((xs.shape[0], self.hidden), xs.dtype)
    params = self.param("cell", lambda k: cell.init(k, c0, xs[:, 0])["params"])

    def step(c: jax.Array, x: jax.Array) -> tuple[jax.Array, None]:
      c, _ = cell.apply({"params": params}, c, x)
      return checkpoint_name(c, "hidden"), None

    last = chunked_time_scan(step, c0, jnp.swapaxes(xs, 0, 1), self.chunk, self.policy)
    return nn.Dense(self.num_outputs, name="head")(last)
