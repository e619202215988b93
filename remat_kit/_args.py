"""Arguments of a rematerialized function: which are static, which are traced.

The one rule, for :func:`remat_kit.remat` and :func:`remat_kit.flax.remat_policy`:
an argument is static if it is named (``static_argnums``/``static_argnames``) or
if JAX cannot trace it (a ``str``, an enum member, a tuple of these); everything
else is traced, as in ``jax.checkpoint``. Also here: ``prevent_cse`` as a pytree
prefix of the arguments, and the small per-wrapper caches that keep nothing of
the user's alive beyond the wrapper.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["LRU", "as_tuple", "check_prevent_cse", "cse_for", "dyn_fn", "freeze",
           "check_static", "split_statics", "untraceable"]


def as_tuple(x: Any, api: str, arg: str, kind: type) -> tuple[Any, ...]:
  if isinstance(x, kind) and not isinstance(x, bool):
    return (x,)
  if isinstance(x, (tuple, list)) and all(isinstance(i, kind) and not isinstance(i, bool)
                                          for i in x):
    return tuple(x)
  raise TypeError(f"`{api}`: `{arg}` must be a {kind.__name__} or a tuple of them, got {x!r}.")


def untraceable(value: Any) -> bool:
  """Whether ``value`` is one JAX cannot trace, so static whether named or not: a str, an
  enum member, or a tuple of these (and None). The one rule of static arguments, for
  :func:`remat` and :func:`remat_kit.flax.remat_policy` alike: arguments named in
  ``static_argnums``/``static_argnames`` and untraceable values are static; everything
  else, Python bools, ints and floats included, is traced, as in ``jax.checkpoint``."""
  if isinstance(value, (str, enum.Enum)):
    return True
  return (isinstance(value, tuple) and bool(value)
          and all(v is None or untraceable(v) for v in value))


_CACHE_SIZE = 64  # per wrapper: distinct static values, policies and shapes kept


class LRU(dict):
  """A small dict that forgets its oldest entries; one per `remat` wrapper, so nothing
  it holds outlives the wrapper (no global cache keeps user functions alive)."""

  def put(self, key: Any, value: Any) -> Any:
    if len(self) >= _CACHE_SIZE:
      del self[next(iter(self))]
    self[key] = value
    return value


def check_prevent_cse(value: Any) -> Any:
  """``prevent_cse`` as ``jax.checkpoint`` takes it: a bool, or a pytree of bools (a
  prefix of the arguments), kept as (leaves, treedef) so it can key a cache."""
  if isinstance(value, bool):
    return value
  if isinstance(value, list):  # as jax.checkpoint: a sequence is a tuple of the arguments
    value = tuple(value)
  leaves, tree = jax.tree_util.tree_flatten(value)
  if (not isinstance(value, (list, tuple, dict)) or not leaves
      or not all(isinstance(x, bool) for x in leaves)):
    raise TypeError(
        f"`remat`: `prevent_cse` must be a bool or a pytree of bools that is a prefix of "
        f"the arguments (as in `jax.checkpoint`), e.g. `(False, True)`; got {value!r}.")
  return (tuple(leaves), tree)


def freeze(cse: Any) -> Any:
  """A cache key for a bool or a tuple of bool pytrees."""
  if isinstance(cse, bool):
    return cse
  leaves, tree = jax.tree_util.tree_flatten(cse)
  return tuple(leaves), tree


def cse_for(cse: tuple[tuple[bool, ...], Any], args: tuple[Any, ...], kwargs: dict[str, Any],
             static_pos: tuple[int, ...], kw_dyn: tuple[str, ...]) -> tuple[Any, ...]:
  """A pytree ``prevent_cse`` broadcast onto the call's arguments (as ``jax.checkpoint``
  does: over ``args``, or ``(args, kwargs)`` when there are keywords), then restricted
  to the dynamic arguments, one full subtree of bools each."""
  prefix = jax.tree_util.tree_unflatten(cse[1], cse[0])
  target = (tuple(args), kwargs) if kwargs else tuple(args)
  try:
    full = _broadcast(prefix, target)
  except ValueError as e:
    raise ValueError(
        f"`remat`: `prevent_cse`={prefix!r} is not a pytree prefix of the arguments "
        f"{jax.tree_util.tree_structure(target)} ({e}): give one bool per argument (or per "
        "subtree), or a single bool.") from None
  pos, kw = (full[0], full[1]) if kwargs else (full, {})
  skip = set(static_pos)
  return tuple(p for i, p in enumerate(pos) if i not in skip) + tuple(kw[k] for k in kw_dyn)


def _broadcast(prefix: Any, node: Any) -> Any:
  """``prefix`` (bools at its leaves) spread over ``node``: a bool covers a whole subtree;
  a dict matches a dict key by key; a tuple or list matches any node with as many
  children (a dict's in key order), as ``jax.checkpoint`` under ``jax_remat3`` reads it."""
  if isinstance(prefix, bool):
    return jax.tree_util.tree_map(lambda _: prefix, node)
  is_child = lambda x: x is not node
  children = jax.tree_util.tree_leaves(node, is_leaf=is_child)
  structure = jax.tree_util.tree_structure(node, is_leaf=is_child)
  if isinstance(prefix, dict):
    if not isinstance(node, dict) or set(prefix) != set(node):
      raise ValueError(f"a dict with keys {sorted(prefix)} where the arguments have "
                       f"{type(node).__name__} {sorted(node) if isinstance(node, dict) else ''}")
    return {k: _broadcast(prefix[k], node[k]) for k in node}
  if isinstance(prefix, (tuple, list)):
    if len(prefix) != len(children):
      raise ValueError(f"{len(prefix)} entries where the arguments have {len(children)}")
    return jax.tree_util.tree_unflatten(
        structure, [_broadcast(p, c) for p, c in zip(prefix, children)])
  raise ValueError(f"{type(prefix).__name__} {prefix!r} is not a bool")


def split_statics(fn: Callable[..., Any], argnums: tuple[int, ...], name_pos: tuple[int, ...],
                   argnames: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                   num_names: dict[int, str]
                   ) -> tuple[Any, tuple[Any, ...], tuple[Any, ...], tuple[int, ...],
                              tuple[str, ...]]:
  """The cache key of the static values (None where one is unhashable), the values
  themselves (for :func:`dyn_fn`), the dynamic arguments, the static positions and the
  dynamic keyword names."""
  nargs = len(args)
  for i in argnums:
    if not -nargs <= i < nargs and num_names.get(i) not in kwargs:
      raise ValueError(
          f"`remat`: `static_argnums` contains {i}, but {getattr(fn, '__name__', fn)} "
          f"was called with {nargs} positional arguments.")
  pos = sorted({i % nargs for i in argnums if -nargs <= i < nargs}
               | {i for i in name_pos if i < nargs})
  statics, hashable = [], True
  for i in pos:
    hashable &= check_static(args[i], f"static argument {i}")
    statics.append((i, args[i]))
  kw_statics = []
  for k in sorted(kwargs):
    if k in argnames:
      hashable &= check_static(kwargs[k], f"static argument {k!r}")
      kw_statics.append((k, kwargs[k]))
  static_kw = {k for k, _ in kw_statics}
  kw_dyn = tuple(k for k in kwargs if k not in static_kw)
  skip = set(pos)
  dyn = tuple(a for i, a in enumerate(args) if i not in skip) + tuple(kwargs[k] for k in kw_dyn)
  raw = (tuple(statics), tuple(kw_statics), nargs, kw_dyn)
  return (raw if hashable else None), raw, dyn, tuple(pos), kw_dyn


def dyn_fn(fn: Callable[..., Any], statics: tuple[tuple[int, Any], ...],
            kw_statics: tuple[tuple[str, Any], ...], nargs: int,
            kw_dyn: tuple[str, ...]) -> Callable[..., Any]:
  """``fn`` of its dynamic arguments alone, for one set of static values."""
  static_pos = dict(statics)
  n_pos = nargs - len(static_pos)

  def dyn_fn(*dyn: Any) -> Any:
    it = iter(dyn[:n_pos])
    full = [static_pos[i] if i in static_pos else next(it) for i in range(nargs)]
    kwargs = dict(zip(kw_dyn, dyn[n_pos:]))
    kwargs.update(kw_statics)
    return fn(*full, **kwargs)

  return dyn_fn


def check_static(value: Any, what: str) -> bool:
  """Refuses a traced array as a static argument; returns whether ``value`` is hashable.

  An unhashable static value (a dict, a list) works as in ``jax.checkpoint``, which
  closes over it: it cannot key a cache, so each call traces anew.
  """
  if isinstance(value, jax.Array) and not isinstance(value, np.ndarray):
    concrete = True
    try:
      np.asarray(value)
    except Exception:  # noqa: BLE001 - a tracer has no value yet
      concrete = False
    if not concrete:
      raise TypeError(
          f"`remat`: {what} is a traced array ({value.dtype}{list(value.shape)}): an argument "
          "of an enclosing `jit`, `grad` or `vmap`, whose value is not known while tracing. "
          "A static argument must be a Python value: pass a Python value (mark it static in "
          "the enclosing `jax.jit` too), or make it a regular (array) argument of `remat`.")
  try:
    hash(value)
  except TypeError:
    return False
  return True
