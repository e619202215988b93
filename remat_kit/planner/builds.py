"""What `auto` builds: the model as ``build(policy, levels, **options)``, the option
combinations and slice counts it tries, and which inputs are cut into slices."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["Variant", "batch_argnums", "builder", "check_microbatches", "is_abstract", "is_key",
           "suffix", "variants"]

def builder(model: Any, loss: Callable[[Any], jax.Array] | None, rngs: dict[str, Any]
             ) -> tuple[Callable[..., Callable[..., jax.Array]], bool]:
  """``(build, takes_levels)``: ``build(policy, levels, **options)`` returns a loss of
  ``(params, *inputs)``."""
  import flax.linen as nn

  if isinstance(model, nn.Module):
    for attr in ("policy", "levels"):
      if not hasattr(model, attr):
        raise TypeError(f"`auto`: module {type(model).__name__} has no `{attr}` attribute; "
                        "pass a module built on LayerStack, a function "
                        "`build(policy) -> loss(params, *inputs)` that applies the policy "
                        "to your model (see `auto`'s docstring), or a list of layer "
                        "functions.")
    head = loss or (lambda out: jnp.mean(jnp.square(out.astype(jnp.float32))))

    def build(policy: Any, levels: Any, **options: Any) -> Callable[..., jax.Array]:
      module = model.clone(policy=policy, levels=levels, **options)
      return lambda params, *xs: head(module.apply({"params": params}, *xs, rngs=rngs))

    return build, True
  if callable(model):
    if _takes(model, "levels"):
      return (lambda policy, levels, **o: model(policy=policy, levels=levels, **o)), True
    return (lambda policy, levels, **o: model(policy=policy, **o)), False
  raise TypeError(f"`auto`: `fn_or_module` must be a Linen module with `policy`/`levels`, a "
                  f"function `build(policy[, levels]) -> loss(params, *inputs)`, or a list "
                  f"of layer functions `f(params, x) -> x`, got {model!r}.")


def _takes(fn: Callable[..., Any], arg: str) -> bool:
  try:
    ps = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return True
  return any(p.name == arg or p.kind is p.VAR_KEYWORD for p in ps)


def is_abstract(tree: Any) -> bool:
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(tree))


Variant = tuple[tuple[str, Any], ...]


def suffix(microbatches: int, variant: Variant) -> str:
  """What a candidate's label adds for its slices and build options."""
  out = f" x{microbatches} microbatches" if microbatches > 1 else ""
  return out + "".join(f", {name}={value}" for name, value in variant)


def check_microbatches(microbatches: Sequence[int]) -> tuple[int, ...]:
  ks = tuple(microbatches) if isinstance(microbatches, (list, tuple)) else None
  if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
    raise ValueError("`auto`: `microbatches` must be a non-empty list of slice counts, "
                     f"ints >= 1 (1: the step as written), got {microbatches!r}.")
  return tuple(dict.fromkeys((1, *ks)))


def variants(options: Mapping[str, Sequence[Any]] | None) -> list[Variant]:
  """Every combination of the ``options`` values, the first values first."""
  if not options:
    return [()]
  if not isinstance(options, Mapping):
    raise TypeError(f"`auto`: `options` must be a dict of build argument names to the "
                    f"values to try, e.g. {{'attention': ('dense', 'flash')}}, got {options!r}.")
  for name, values in options.items():
    if not isinstance(values, (list, tuple)) or not values:
      raise ValueError(f"`auto`: `options[{name!r}]` must be a non-empty list of values to "
                       f"build with, got {values!r}.")
    if name in ("policy", "levels"):
      raise ValueError(f"`auto`: `options` names build arguments besides `policy` and "
                       f"`levels`, which auto searches itself; got {name!r}.")
  names = list(options)
  return [tuple(zip(names, combo)) for combo in itertools.product(*options.values())]


def is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def batch_argnums(batch_argnums: Sequence[int] | None, inputs: tuple[Any, ...],
                   slices: tuple[int, ...]) -> tuple[int, ...]:
  """The loss arguments cut into slices (``params`` is argument 0): checked, or every
  array input that is not a PRNG key."""
  if batch_argnums is None:
    out = tuple(i + 1 for i, x in enumerate(inputs) if not is_key(x))
  else:
    out = tuple(batch_argnums)
    bad = [i for i in out if not isinstance(i, int) or isinstance(i, bool)
           or not 1 <= i <= len(inputs) or is_key(inputs[i - 1])]
    if bad:
      raise ValueError(f"`auto`: `batch_argnums` are the loss arguments to cut into slices, "
                       f"1 to {len(inputs)} (0 is `params`; PRNG keys are split, not cut); "
                       f"got {list(batch_argnums)!r}.")
  if max(slices) > 1:
    if not out:
      raise ValueError(f"`auto`: `microbatches`={list(slices)!r} cuts the batch, but no "
                       "input is a batch (`batch_argnums` is empty).")
    for i in out:
      for leaf in jax.tree_util.tree_leaves(inputs[i - 1]):
        n = leaf.shape[0] if getattr(leaf, "shape", ()) else None
        for k in slices:
          if n is None or n % k:
            raise ValueError(
                f"`auto`: `microbatches` {k} does not divide loss argument {i}'s leading axis "
                f"(shape {getattr(leaf, 'shape', ())}); pick slice counts that divide the "
                "batch, or leave that input out of `batch_argnums`.")
  return out
