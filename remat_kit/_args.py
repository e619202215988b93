"""Arguments: which are static, which are traced, and the checks every API shares.

The one rule, for :func:`remat_kit.remat`, :func:`remat_kit.flax.remat_policy`, the
readouts (:func:`remat_kit.memory_report` and the rest) and the planners: only the
arguments the caller passes are traced, Python bools, ints and floats among them, as
``jax.checkpoint`` and ``jax.jit`` trace them; an argument is static instead if it is
named (``static_argnums``/``static_argnames``) or if JAX cannot trace it (a ``str``,
an enum member, a callable, any pytree holding such a leaf); a default the caller did
not pass stays the Python value it is.

A readout takes the function's keyword arguments as ``fn_kwargs={...}`` (never as its
own ``**kwargs``, so they cannot collide with its options), the arguments it
differentiates as ``argnums`` (as ``jax.grad``), and static keyword names as
``static_argnames``: :func:`bind` applies the rule to such a call.

Also here: ``prevent_cse`` as a pytree prefix of the arguments, the small per-wrapper
caches that keep nothing of the user's alive beyond the wrapper, and the validators of
ints, seconds and ``argnums`` the APIs share.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["LRU", "Bound", "argnums_of", "as_tuple", "bind", "check_prevent_cse", "check_static",
           "cse_for", "dyn_fn", "fn_kwargs_of", "freeze", "int_at_least", "positive_seconds",
           "split_statics", "untraceable"]


def as_tuple(x: Any, api: str, arg: str, kind: type) -> tuple[Any, ...]:
  if isinstance(x, kind) and not isinstance(x, bool):
    return (x,)
  if isinstance(x, (tuple, list)) and all(isinstance(i, kind) and not isinstance(i, bool)
                                          for i in x):
    return tuple(x)
  raise TypeError(f"`{api}`: `{arg}` must be a {kind.__name__} or a tuple of them, got {x!r}.")


def _traceable_leaf(x: Any) -> bool:
  return (isinstance(x, (bool, int, float, complex, np.ndarray, np.generic, jax.Array))
          or (hasattr(x, "shape") and hasattr(x, "dtype")))  # ShapeDtypeStruct, tracers


def untraceable(value: Any) -> bool:
  """Whether ``value`` is one JAX cannot trace, so static whether named or not: a str, an
  enum member, a callable, or a pytree with such a leaf (a tuple of strings, a dict
  holding a policy). None and empty containers have no leaves: traced, as nothing. The
  rule of the module docstring: everything else, Python bools, ints and floats included,
  is traced unless named static."""
  if isinstance(value, (str, enum.Enum)):
    return True
  return any(not _traceable_leaf(x) for x in jax.tree_util.tree_leaves(value))


# --------------------------------------------------------------------------
# The checks every API shares
# --------------------------------------------------------------------------
def int_at_least(api: str, arg: str, value: Any, low: int) -> int:
  """``value`` if it is an int (not a bool) >= ``low``; else a ValueError that names
  ``api`` and ``arg`` and echoes the value."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"`{api}`: `{arg}` must be an int >= {low}, got {value!r}.")
  return int(value)


def positive_seconds(api: str, arg: str, value: Any, allow_none: bool = False
                     ) -> float | None:
  """``value`` as seconds if it is a finite number > 0 (or None where allowed)."""
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
      or not math.isfinite(value) or value <= 0:
    raise ValueError(f"`{api}`: `{arg}` must be a positive number of seconds"
                     f"{' or None' if allow_none else ''}, got {value!r}.")
  return float(value)


def argnums_of(api: str, argnums: Any, nargs: int) -> tuple[int, ...]:
  """``argnums`` (an int or a sequence of ints, as ``jax.grad`` takes it) as a tuple of
  distinct indices into ``nargs`` positional arguments, negative ones resolved."""
  nums = (argnums,) if isinstance(argnums, (int, np.integer)) else argnums
  if isinstance(argnums, bool) or not isinstance(nums, (tuple, list)) or not nums or any(
      isinstance(a, bool) or not isinstance(a, (int, np.integer)) for a in nums):
    raise ValueError(f"`{api}`: `argnums` must be an int or a non-empty tuple of ints, as in "
                     f"`jax.grad`; got {argnums!r}.")
  out = []
  for a in nums:
    if not -nargs <= a < nargs:
      raise ValueError(f"`{api}`: `argnums` {argnums!r} must index the {nargs} positional "
                       f"argument{'s' if nargs != 1 else ''} the function was given.")
    out.append(int(a) % nargs)
  if len(set(out)) != len(out):
    raise ValueError(f"`{api}`: `argnums` {argnums!r} names an argument twice.")
  return tuple(out)


def fn_kwargs_of(api: str, fn_kwargs: Any, stray: Mapping[str, Any]) -> dict[str, Any]:
  """The keyword arguments a readout passes to the user's function: only ``fn_kwargs``, so
  they never collide with the readout's own options (``target``, ``label``, ...)."""
  if stray:
    raise TypeError(
        f"`{api}`: got unexpected keyword arguments {sorted(stray)}. Keyword arguments of "
        f"the function go in `fn_kwargs`, e.g. `{api}(fn, *args, fn_kwargs="
        f"{{{', '.join(repr(k) + ': ...' for k in sorted(stray))}}})`, so that they never "
        f"collide with `{api}`'s own options.")
  if fn_kwargs is None:
    return {}
  if not isinstance(fn_kwargs, Mapping) or not all(isinstance(k, str) for k in fn_kwargs):
    raise TypeError(f"`{api}`: `fn_kwargs` must be a dict of str -> value, got {fn_kwargs!r}.")
  return dict(fn_kwargs)


@dataclasses.dataclass(frozen=True)
class Bound:
  """A call of the user's function with the rule applied (see :func:`bind`).

  Attributes:
    fn: the function of the traced arguments alone: ``fn(*args, **kwargs)`` calls the
      user's function with the static ones put back.
    args: the traced positional arguments.
    kwargs: the traced keyword arguments.
    argnums: the differentiated arguments, as indices into ``args`` (None: not asked).
    positions: the caller's index of each of ``args``.
    static: the static values as a hashable key, or None where one is unhashable.
  """

  fn: Callable[..., Any]
  args: tuple[Any, ...]
  kwargs: dict[str, Any]
  argnums: tuple[int, ...] | None
  positions: tuple[int, ...]
  static: Any


def bind(api: str, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any],
         static_argnames: Any = (), argnums: Any = None) -> Bound:
  """The rule of the module docstring, for a readout's or a planner's call
  ``fn(*args, **kwargs)``: arguments named in ``static_argnames`` and untraceable ones are
  bound as Python values; the rest are traced. ``argnums`` (checked, as
  :func:`argnums_of`) may not name a static argument: no gradient is taken for it."""
  if not callable(fn):
    raise TypeError(f"`{api}`: `fn` must be callable, got {fn!r}.")
  names = (static_argnames,) if isinstance(static_argnames, str) else static_argnames
  if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
    raise TypeError(f"`{api}`: `static_argnames` must be a str or a tuple of str, got "
                    f"{static_argnames!r}.")
  args = tuple(args)
  nums = argnums_of(api, argnums, len(args)) if argnums is not None else None
  static_pos = {i: a for i, a in enumerate(args) if untraceable(a)}
  static_kw = {k: v for k, v in kwargs.items() if k in names or untraceable(v)}
  for a in nums or ():
    if a in static_pos:
      raise ValueError(
          f"`{api}`: `argnums` names argument {a}, a {type(args[a]).__name__} JAX cannot "
          "trace, so it is static and has no gradient: differentiate an array argument.")
  positions = tuple(i for i in range(len(args)) if i not in static_pos)
  traced_kw = {k: v for k, v in kwargs.items() if k not in static_kw}
  key: Any = (tuple(sorted(static_pos.items())), tuple(sorted(static_kw.items())))
  try:
    hash(key)
  except TypeError:
    key = None
  if static_pos or static_kw:
    n = len(args)

    def bound(*traced: Any, **kw: Any) -> Any:
      it = iter(traced)
      full = [static_pos[i] if i in static_pos else next(it) for i in range(n)]
      return fn(*full, *it, **kw, **static_kw)
  else:
    bound = fn
  return Bound(bound, tuple(args[i] for i in positions), traced_kw,
               None if nums is None else tuple(positions.index(a) for a in nums), positions,
               key)


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
