"""Gradient accumulation inside one step: the batch-sized part of the peak, divided.

Remat trades recomputation for the activations kept between the forward and
the backward, but a layer's backward still holds its input, its output
gradient and its input gradient at full batch size. Where those dominate
(a wide MLP at a large batch, or a compiler that already keeps one tensor per
layer), no remat policy goes lower; splitting the batch does::

  vg = rk.microbatched_value_and_grad(loss, 8, batch_argnums=(1, 2), key_argnums=3)
  value, grads = vg(params, x, y, key)

The batch arguments are cut into ``microbatches`` equal slices along their
leading axis and a ``lax.scan`` runs the gradient of each, adding into one
gradient buffer: activations are those of one slice, at the cost of smaller
matrix products. For a ``loss`` that is a mean over the batch, the mean of
the slices' values and gradients is the batch's (up to float summation
order). PRNG keys in ``key_argnums`` are split, one per slice, so each slice
draws its own dropout masks: the same distribution as the whole batch's, not
the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from remat_kit import _args

__all__ = ["microbatched_value_and_grad"]

_API = "`microbatched_value_and_grad`"


def _argnums(value: int | Sequence[int], arg: str) -> tuple[int, ...]:
  out = (value,) if isinstance(value, int) else tuple(value)
  if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in out):
    raise ValueError(f"{_API}: `{arg}` must be non-negative ints, got {value!r}.")
  return out


def microbatched_value_and_grad(fun: Callable[..., jax.Array], microbatches: int, *,
                                batch_argnums: int | Sequence[int] = 1,
                                key_argnums: int | Sequence[int] = (),
                                argnums: int | Sequence[int] = 0) -> Callable[..., Any]:
  """``jax.value_and_grad(fun, argnums)``, computed over ``microbatches`` slices of the batch.

  Args:
    fun: a scalar loss that averages over the batch.
    microbatches: how many equal slices to cut the batch into (1: no split).
    batch_argnums: the arguments whose every leaf is cut along its leading axis.
    key_argnums: PRNG key arguments, split into one key per slice.
    argnums: the arguments to differentiate (as in ``jax.value_and_grad``).

  Returns:
    A function of ``fun``'s arguments returning ``(mean value, mean gradient)``.

  Raises:
    ValueError: for a bad ``microbatches`` or argnums, an argument number out
      of range, or a batch leaf whose leading axis ``microbatches`` does not
      divide (at call time).
  """
  _args.int_at_least(_API.strip("`"), "microbatches", microbatches, 1)
  batch, keys = _argnums(batch_argnums, "batch_argnums"), _argnums(key_argnums, "key_argnums")
  diff = _argnums(argnums, "argnums")
  clash = (set(batch) & set(keys)) | (set(diff) & (set(batch) | set(keys)))
  if clash:
    raise ValueError(f"{_API}: argument(s) {sorted(clash)} appear in more than one of "
                     f"`argnums`={argnums!r}, `batch_argnums`={batch_argnums!r}, "
                     f"`key_argnums`={key_argnums!r}; each argument has one role.")
  vg = jax.value_and_grad(fun, argnums=argnums)
  k = microbatches

  def split(i: int, x: Any) -> Any:
    def one(leaf: Any) -> Any:
      n = jnp.shape(leaf)[0] if jnp.ndim(leaf) else None
      if n is None or n % k:
        raise ValueError(
            f"{_API}: argument {i} has a leaf of shape {jnp.shape(leaf)}, whose leading "
            f"axis is not divisible by `microbatches`={k}; pick a `microbatches` that "
            "divides the batch, or leave the argument out of `batch_argnums`.")
      return jnp.reshape(leaf, (k, n // k, *jnp.shape(leaf)[1:]))
    return jax.tree.map(one, x)

  def wrapped(*args: Any) -> tuple[jax.Array, Any]:
    bad = [i for i in (*batch, *keys, *diff) if i >= len(args)]
    if bad:
      raise ValueError(f"{_API}: argument number(s) {bad} out of range for a call with "
                       f"{len(args)} positional arguments.")
    if k == 1:
      return vg(*args)
    sliced = {i: split(i, args[i]) for i in batch}
    sliced.update({i: jax.random.split(args[i], k) for i in keys})

    def call(parts: dict[int, Any]) -> tuple[jax.Array, Any]:
      return vg(*(parts.get(i, a) for i, a in enumerate(args)))

    first = jax.tree.map(lambda s: s[0], sliced)
    grad_shapes = jax.eval_shape(call, first)[1]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), grad_shapes)

    def body(acc: Any, parts: dict[int, Any]) -> tuple[Any, jax.Array]:
      value, grads = call(parts)
      return jax.tree.map(jnp.add, acc, grads), value

    total, values = jax.lax.scan(body, zeros, sliced)
    return jnp.mean(values), jax.tree.map(lambda g: g / k, total)

  return wrapped
