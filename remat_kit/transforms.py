"""Functional remat: `remat`, `remat_sequential` and `remat_scan`.

These wrap ``jax.checkpoint`` and add what it lacks: policies from config
values, a trace-time check that every name a policy refers to is tagged,
hashability checks on static arguments, the same behaviour under
``jax_remat3``, and scans over layers nested for sqrt(L) memory.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

import jax
from jax import ad_checkpoint as _ad_checkpoint
from jax import lax

from remat_kit import _args, _dispatch, _jax, _jaxpr
from remat_kit._dispatch import to_jax_policy
from remat_kit.policies import Policy, from_config

__all__ = ["checkpoint_name", "classic_remat", "level_lengths", "remat", "remat_scan", "scan_carries",
           "remat_sequential", "to_jax_policy", "with_full_remat", "with_offload_on_device",
           "without_remat"]

checkpoint_name = _ad_checkpoint.checkpoint_name

F = TypeVar("F", bound=Callable[..., Any])


def classic_remat() -> Any:
  """Context manager: ``jax.checkpoint`` wrappers built inside it use JAX's classic remat.

  Under ``jax_remat3`` JAX ignores callable policies; a wrapper built (for
  Flax: applied) inside this context binds the classic implementation, which
  consults them. A no-op on JAX versions without ``jax_remat3``.
  """
  return _jax.remat3(False)


def _check_names(api: str, policy: Policy, closed: Any,
                 rules: Callable[[], Any] | None = None) -> None:
  want_names = policy.referenced_names()
  want_prims = policy.checked_primitives()
  if not want_names and not want_prims:
    return
  have_names, have_prims = _jaxpr.tags_and_primitives(closed)
  if (want_names - have_names or want_prims - have_prims) and rules is not None:
    # Tags and ops inside custom_vjp forwards and custom_jvp rules show up only once the
    # function is differentiated: look there before calling a name missing.
    more = rules()
    if more is not None:
      extra_names, extra_prims = _jaxpr.tags_and_primitives(more)
      have_names, have_prims = have_names | extra_names, have_prims | extra_prims
  missing = sorted(want_names - have_names)
  if missing:
    raise ValueError(
        f"`{api}`: policy {policy!r} refers to checkpoint names {missing} that the "
        f"function never tags. Names it tags: {sorted(have_names) or 'none'}. Fix the "
        "spelling, or tag the value with `remat_kit.checkpoint_name(x, name)`; pass "
        "`check_names=False` only if the name is tagged in some calls but not this one.")
  missing_p = sorted(want_prims - have_prims)
  if missing_p:
    raise ValueError(
        f"`{api}`: policy {policy!r} refers to primitives {missing_p} that the function "
        f"never uses. Primitives it uses: {sorted(have_prims)}.")


@overload
def remat(fn: F, *, policy: Any = ..., static_argnums: int | Sequence[int] = ...,
          static_argnames: str | Sequence[str] = ..., prevent_cse: Any = ...,
          check_names: bool = ...) -> F: ...
@overload
def remat(fn: None = None, *, policy: Any = ..., static_argnums: int | Sequence[int] = ...,
          static_argnames: str | Sequence[str] = ..., prevent_cse: Any = ...,
          check_names: bool = ...) -> Callable[[F], F]: ...
def remat(fn: Callable[..., Any] | None = None, *, policy: Any = None,
          static_argnums: int | Sequence[int] = (),
          static_argnames: str | Sequence[str] = (),
          prevent_cse: Any = True, check_names: bool = True) -> Any:
  """``jax.checkpoint`` with config policies and checks; bare or with arguments.

  A drop-in for ``jax.checkpoint``: the same arguments mean the same things,
  inputs are traced (Python and NumPy values become arrays) whatever the
  policy, and nothing of the user's outlives the returned wrapper. One
  deliberate difference: a policy naming a tag ``fn`` never makes raises
  (JAX saves nothing, silently); pass ``check_names=False`` for JAX's behaviour.

  Static arguments, the one rule of :func:`remat` and
  :func:`remat_kit.flax.remat_policy`: those named in ``static_argnums``
  (positions) or ``static_argnames`` (names; a position passed by keyword is static
  too), as in ``jax.checkpoint``, and values JAX cannot trace (a ``str``, an enum
  member, a tuple of these). Everything else is traced, Python scalars included.

  Args:
    fn: the function to rematerialize. Omit it to use ``remat`` as a
      decorator with arguments.
    policy: anything :func:`remat_kit.policies.from_config` accepts: a policy,
      a preset string such as ``"save_dots"``, a dict such as
      ``{"qkv": "save", "*": "recompute"}``, ``True``/``None`` (full remat, as
      ``jax.checkpoint``'s default) or ``False`` (no remat).
    static_argnums: positions of arguments that are Python values, not arrays
      (flags such as ``train``). They must be hashable.
    static_argnames: names of such arguments.
    prevent_cse: as in ``jax.checkpoint``: a bool, or a pytree prefix of the
      arguments with a bool per subtree (keep True except inside ``scan``).
    check_names: at trace time, raise if a name the policy refers to is not
      tagged anywhere in ``fn`` (its custom rules included).

  Returns:
    ``fn`` rematerialized: the same values, and the same gradients up to float
    rounding (the recomputation may be fused differently), less saved memory.

  Raises:
    ValueError: for a policy name that ``fn`` never tags, or bad static args.
    TypeError: for an unhashable static argument, a bad ``prevent_cse`` or a
      non-callable ``fn``.

  Example:
    >>> import jax, jax.numpy as jnp, remat_kit as rk
    >>> @rk.remat(policy="save:h")
    ... def layer(w, x):
    ...   h = rk.checkpoint_name(jnp.tanh(x @ w), "h")
    ...   return jnp.sin(h) @ w
    >>> w, x = jnp.eye(3), jnp.ones((2, 3))
    >>> jax.grad(lambda w: layer(w, x).sum())(w).shape
    (3, 3)
  """
  if fn is None:
    return functools.partial(remat, policy=policy, static_argnums=static_argnums,
                             static_argnames=static_argnames, prevent_cse=prevent_cse,
                             check_names=check_names)
  if not callable(fn):
    raise TypeError(f"`remat`: `fn` must be callable, got {fn!r}.")
  pol = from_config(policy)
  cse = _args.check_prevent_cse(prevent_cse)
  argnums = _args.as_tuple(static_argnums, "remat", "static_argnums", int)
  argnames = _args.as_tuple(static_argnames, "remat", "static_argnames", str)
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    sig = None
  if argnames:
    if sig is None:
      raise ValueError(f"`remat`: cannot read the signature of {fn!r} for `static_argnames`.")
    unknown = [n for n in argnames if n not in sig.parameters]
    if unknown:
      raise ValueError(
          f"`remat`: `static_argnames` {unknown} are not parameters of "
          f"{getattr(fn, '__name__', fn)}; its parameters are {list(sig.parameters)}.")
    positional = [n for n, p in sig.parameters.items()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    name_pos = tuple(positional.index(n) for n in argnames if n in positional)
  else:
    name_pos = ()
  num_names: dict[int, str] = {}
  if argnums and sig is not None:
    # A static position may be passed by keyword: it is static under its name too.
    positional = [n for n, p in sig.parameters.items()
                  if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.POSITIONAL_ONLY]
    num_names = {i: positional[i] for i in argnums if 0 <= i < len(positional)
                 and sig.parameters[positional[i]].kind is not inspect.Parameter.POSITIONAL_ONLY}
    argnames = argnames + tuple(n for n in num_names.values() if n not in argnames)

  needs_trace = bool(pol.excluded_names()) or (
      check_names and bool(pol.referenced_names() or pol.checked_primitives()))
  static_set = bool(argnums or name_pos or argnames)
  # The wrapper's own caches: the function of the dynamic arguments per static values
  # (JAX's trace cache keys on it), the checkpointed function, the resolved policy.
  dyn_fns, built, resolved_cache = _args.LRU(), _args.LRU(), _args.LRU()

  @functools.wraps(fn)
  def wrapper(*args: Any, **kwargs: Any) -> Any:
    auto = tuple(i for i, a in enumerate(args) if _args.untraceable(a))
    auto_kw = tuple(k for k, v in kwargs.items() if _args.untraceable(v))
    if not static_set and not kwargs and not auto:
      key, dyn_fn, dyn = (), fn, args  # JAX's trace cache sees `fn` itself
      dyn_cse = cse if isinstance(cse, bool) else _args.cse_for(cse, args, {}, (), ())
    else:
      key, raw, dyn, static_pos, kw_dyn = _args.split_statics(
          fn, argnums, name_pos + auto, argnames + auto_kw, args, kwargs, num_names)
      if key is None:  # an unhashable static value: traced anew, as jax.checkpoint does
        dyn_fn = _args.dyn_fn(fn, *raw)
        return _dispatch.checkpoint(dyn_fn, _resolve(dyn_fn, pol, check_names, dyn)
                                    if needs_trace else pol,
                                    cse if isinstance(cse, bool) else _args.cse_for(
                                        cse, args, kwargs, static_pos, kw_dyn))(*dyn)
      dyn_fn = dyn_fns.get(key) or dyn_fns.put(key, _args.dyn_fn(fn, *key))
      dyn_cse = cse if isinstance(cse, bool) else _args.cse_for(cse, args, kwargs, static_pos,
                                                           kw_dyn)
    resolved = pol
    if needs_trace:
      leaves, tree = jax.tree_util.tree_flatten(dyn)
      rkey = (key, tree, tuple(_jaxpr.aval_key(jax.typeof(x)) for x in leaves))
      resolved = resolved_cache.get(rkey) or resolved_cache.put(
          rkey, _resolve(dyn_fn, pol, check_names, dyn))
    bkey = (key, resolved, _args.freeze(dyn_cse), _jax.remat3_enabled())
    ck = built.get(bkey) or built.put(bkey, _dispatch.checkpoint(dyn_fn, resolved, dyn_cse))
    return ck(*dyn)

  wrapper.policy = pol  # type: ignore[attr-defined]
  return wrapper


def _resolve(fn: Callable[..., Any], pol: Policy, check_names: bool,
             dyn: tuple[Any, ...]) -> Policy:
  """Checks ``pol``'s names against ``fn`` and fills in excluded producers (cached by the
  caller per static values, policy and argument shapes: the trace is the costly part)."""
  closed = jax.make_jaxpr(fn)(*dyn)
  if check_names:
    _check_names("remat", pol, closed, lambda: _rules_jaxpr(fn, dyn))
  excluded = pol.excluded_names()
  return pol.with_producers(_jaxpr.producer_signatures(closed, excluded)) if excluded else pol


def _rules_jaxpr(fn: Callable[..., Any], dyn: tuple[Any, ...]) -> Any:
  """The jaxpr of ``fn``'s forward-and-backward, where custom_vjp forwards and custom_jvp
  rules run (and tag what they tag); None where ``fn`` cannot be differentiated."""
  try:
    return jax.make_jaxpr(lambda *xs: jax.vjp(fn, *xs))(*dyn)
  except Exception:  # noqa: BLE001 - integer inputs, non-differentiable ops: primal only
    return None


def remat_sequential(fns: Sequence[Callable[[Any], Any]], segments: int, *,
                     policy: Any = None, prevent_cse: bool = True) -> Callable[[Any], Any]:
  """Chains single-input layer functions, rematerializing them in segments.

  The JAX counterpart of PyTorch's ``checkpoint_sequential``: ``fns`` is split
  into ``segments`` contiguous groups of near-equal length; every group but the
  last runs under :func:`remat`, so only each group's input is kept, and the
  last group runs normally (its activations are needed at once by the
  backward pass).

  Memory: about ``segments`` boundary activations plus one group's
  activations; ``segments = sqrt(len(fns))`` balances the two. Compute: one
  extra forward pass over all groups but the last.

  Args:
    fns: layer functions ``x -> x``.
    segments: number of groups, between 1 and ``len(fns)``.
    policy: the policy inside each rematerialized group.
    prevent_cse: as in ``jax.checkpoint``.

  Returns:
    A function ``x -> y`` applying every function of ``fns`` in order.

  Raises:
    ValueError: if ``fns`` is empty or ``segments`` is out of range.
    TypeError: if an element of ``fns`` is not callable.
  """
  fns = list(fns)
  if not fns:
    raise ValueError("`remat_sequential`: `fns` is empty; pass at least one layer function.")
  if not all(callable(f) for f in fns):
    bad = [f for f in fns if not callable(f)]
    raise TypeError(f"`remat_sequential`: `fns` must all be callable, got {bad!r}.")
  if not isinstance(segments, int) or isinstance(segments, bool) or not 1 <= segments <= len(fns):
    raise ValueError(
        f"`remat_sequential`: `segments` must be an int in [1, {len(fns)}] (the number of "
        f"layers), got {segments!r}.")
  bounds = [round(i * len(fns) / segments) for i in range(segments + 1)]
  groups = [fns[a:b] for a, b in zip(bounds, bounds[1:])]

  def chain(group: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def run(x: Any) -> Any:
      for f in group:
        x = f(x)
      return x
    return run

  staged = [remat(chain(g), policy=policy, prevent_cse=prevent_cse, check_names=False)
            for g in groups[:-1]] + [chain(groups[-1])]

  def apply(x: Any) -> Any:
    for g in staged:
      x = g(x)
    return x

  return apply


@functools.cache
def _min_sum_factors(n: int, levels: int) -> tuple[int, ...]:
  """The exact factorization of ``n`` into ``levels`` factors with the least sum."""
  if levels == 1:
    return (n,)
  divisors = [f for f in range(1, math.isqrt(n) + 1) if n % f == 0]
  divisors += [n // f for f in divisors]
  return min(((f,) + _min_sum_factors(n // f, levels - 1) for f in set(divisors)),
             key=lambda c: (sum(c), c))


def scan_carries(length: int, levels: Sequence[int]) -> int:
  """How many carries a nested scan with these level lengths keeps at its peak.

  The model :func:`remat_scan` runs: the outer scan keeps one carry per group
  (``levels[0]`` groups of ``prod(levels[1:])`` layers, the last one short
  when the length does not divide); while a group's backward runs, its
  recomputation keeps the carries of the levels inside it. A flat scan
  (``levels == (length,)``) keeps ``length``.

  Args:
    length: the number of layers scanned.
    levels: the level lengths, outermost first, as :func:`level_lengths`
      returns them (or ``(length,)`` for a flat scan).

  Returns:
    The number of carries kept at the peak.

  >>> scan_carries(64, (8, 8)), scan_carries(61, (4, 4, 4)), scan_carries(61, (61,))
  (16, 11, 61)
  """
  levels = tuple(levels)
  if len(levels) == 1 or length <= 1:
    return length
  inner = math.prod(levels[1:])
  full, rem = divmod(length, inner)
  if full == 0:
    return scan_carries(length, level_lengths(length, len(levels) - 1))
  tail = 1 + scan_carries(rem, level_lengths(rem, len(levels) - 1)) if rem else 0
  return full + max(scan_carries(inner, levels[1:]), tail)


@functools.lru_cache(maxsize=4096)
def level_lengths(length: int, levels: int) -> tuple[int, ...]:
  """Group lengths, outermost first, for a ``levels``-deep nested scan.

  Chooses the level lengths that keep the fewest carries (see
  :func:`scan_carries`): about ``levels * length ** (1 / levels)``. The inner
  levels always divide their group exactly; when ``length`` does not divide,
  the outer level's last group is short and is planned the same way on its
  own, so uneven lengths lose little. Among plans that keep as many carries,
  one without a short group (the layers reshape without copies), then the
  shortest short group, wins. When nesting would keep no fewer carries than a
  flat scan (very short stacks), the flat ``(length,)`` is returned.

  Args:
    length: the number of layers, >= 1.
    levels: the nesting depth, >= 1 (1: a flat scan).

  Returns:
    ``levels`` group lengths, outermost first, or ``(length,)``.

  Raises:
    ValueError: if ``length`` or ``levels`` is not an int >= 1.

  >>> level_lengths(64, 2)
  (8, 8)
  >>> level_lengths(16, 3)  # a short last group keeps fewer carries than (2, 2, 4)
  (3, 2, 3)
  >>> level_lengths(37, 2)
  (7, 6)
  >>> level_lengths(61, 3), scan_carries(61, level_lengths(61, 3))
  ((4, 4, 4), 11)
  """
  _args.int_at_least("level_lengths", "levels", levels, 1)
  _args.int_at_least("level_lengths", "length", length, 1)
  if levels == 1 or length <= 2:
    return (length,)
  # Inner group sizes to try: within 4x of the ideal length ** ((levels - 1) / levels).
  ideal = length ** ((levels - 1) / levels)
  sizes = range(max(1, int(ideal / 4)), min(length, math.ceil(ideal * 4)) + 1)
  best: tuple[int, ...] = (length,)
  best_key: tuple[Any, ...] = (length + 1,)
  for q in sizes:
    inner = _min_sum_factors(q, levels - 1)
    cand = (-(-length // q),) + inner
    rem = length % q
    key = (scan_carries(length, cand), rem, cand)  # then no short group, then the shortest
    if key < best_key:
      best, best_key = cand, key
  return best if best_key[0] < length else (length,)


def remat_scan(body: Callable[[Any, Any], tuple[Any, Any]], carry: Any, xs: Any, *,
               policy: Any = None, levels: int | Sequence[int] | None = None,
               length: int | None = None, prevent_cse: bool = False,
               check_names: bool = True) -> tuple[Any, Any]:
  """``lax.scan`` over layers with the body rematerialized, optionally nested.

  Flat (``levels=None``), the scan keeps one carry per layer and recomputes
  inside each layer as ``policy`` says: memory grows like L. With ``levels=d``
  (d >= 2 levels), the layers are scanned in nested groups of about
  ``L ** (1/d)`` and each group is rematerialized as a whole, so the scan
  keeps about ``d * L ** (1/d)`` carries (``2 * sqrt(L)`` for d=2) at the cost
  of ``d - 1`` extra forward passes. Lengths that do not factor evenly work
  with an int ``levels``: the last group is the short one (:func:`level_lengths`);
  a tuple of level lengths must multiply to the number of layers.

  Args:
    body: ``(carry, x) -> (carry, y)``, one layer. ``x`` is the layer's slice
      of ``xs`` (its parameters, for a stack of layers).
    carry: the initial carry (the activations entering the first layer).
    xs: a pytree whose leaves have the layer count as leading axis, or None.
    policy: the policy inside each layer (see :func:`remat`).
    levels: None or 1 for a flat scan; an int d >= 2 for d nested levels of
      automatic size; or a tuple of level lengths, outermost first, whose
      product is the layer count.
    length: the layer count; needed only when ``xs`` is None.
    prevent_cse: passed to the per-layer checkpoint (False is right in scans).
    check_names: as in :func:`remat`.

  Returns:
    ``(carry, ys)`` as ``lax.scan`` returns them.

  Raises:
    ValueError: for an inconsistent ``length``/``xs`` or bad ``levels``.
    TypeError: for a bool ``levels``, or level lengths that are not ints.
  """
  if isinstance(levels, bool):
    raise TypeError(f"`remat_scan`: `levels` must be None, an int number of levels (>= 2 to "
                    f"nest) or a tuple of level lengths, got {levels!r}.")
  paths = jax.tree_util.tree_flatten_with_path(xs)[0]
  leaves = [leaf for _, leaf in paths]
  for path, leaf in paths:
    if not getattr(leaf, "shape", ()):
      raise ValueError(
          f"`remat_scan`: leaf `xs{jax.tree_util.keystr(path)}` is "
          f"{'a scalar' if hasattr(leaf, 'shape') else type(leaf).__name__}; every leaf of "
          "`xs` needs the layer count as its leading axis (close over per-model values "
          "in `body` instead).")
  lengths = {f"xs{jax.tree_util.keystr(p)}": int(leaf.shape[0]) for p, leaf in paths}
  if len(set(lengths.values())) > 1:
    listed = ", ".join(f"{k}: {v}" for k, v in lengths.items())
    raise ValueError(f"`remat_scan`: the leaves of `xs` have different leading lengths "
                     f"(layer counts): {listed}. Stack the same number of layers in each.")
  if leaves:
    n = leaves[0].shape[0]
    if n == 0:
      raise ValueError("`remat_scan`: `xs` has 0 layers; there is nothing to scan.")
    if length is not None and length != n:
      raise ValueError(f"`remat_scan`: `length`={length} but `xs` has {n} layers.")
  elif length is None:
    raise ValueError("`remat_scan`: `xs` is empty, so pass `length=` (the number of layers).")
  else:
    n = length
  if levels is None or levels == 1:
    nest: tuple[int, ...] = (n,)
  elif isinstance(levels, int) and not isinstance(levels, bool):
    if levels < 1:
      raise ValueError(f"`remat_scan`: `levels` must be >= 1, got {levels!r}.")
    nest = level_lengths(n, levels)
  else:
    nest = _args.as_tuple(levels, "remat_scan", "levels", int)
    if any(g < 1 for g in nest) or math.prod(nest) != n:
      raise ValueError(
          f"`remat_scan`: level lengths `levels`={nest} multiply to {math.prod(nest)}, "
          f"not the {n} layers. Pass an int number of levels to have them chosen, "
          "uneven lengths included.")
  step = remat(body, policy=policy, prevent_cse=prevent_cse, check_names=check_names)
  return _nested_scan(step, carry, xs, n, nest, prevent_cse)


def _nested_scan(step: Callable[..., Any], carry: Any, xs: Any, n: int,
                 levels: tuple[int, ...], prevent_cse: bool) -> tuple[Any, Any]:
  if len(levels) == 1 or n <= 1:
    return lax.scan(step, carry, xs, length=n)
  inner_levels = levels[1:]
  inner = math.prod(inner_levels)
  full, rem = divmod(n, inner)

  def group(levels_g: tuple[int, ...], size: int) -> Callable[..., Any]:
    def run(c: Any, xs_g: Any) -> tuple[Any, Any]:
      return _nested_scan(step, c, xs_g, size, levels_g, prevent_cse)
    return jax.checkpoint(run, prevent_cse=prevent_cse)  # full remat per group

  head = full * inner
  xs_head = jax.tree_util.tree_map(
      lambda a: a[:head].reshape((full, inner) + a.shape[1:]), xs)
  carry, ys = lax.scan(group(inner_levels, inner), carry, xs_head, length=full)
  ys = jax.tree_util.tree_map(lambda a: a.reshape((head,) + a.shape[2:]), ys)
  if rem == 0:
    return carry, ys
  # The short last group, planned on its own (slicing the stacked inputs, which XLA copies).
  xs_tail = jax.tree_util.tree_map(lambda a: a[head:], xs)
  carry, ys_tail = group(level_lengths(rem, len(inner_levels)), rem)(carry, xs_tail)
  ys = jax.tree_util.tree_map(lambda a, b: jax.numpy.concatenate([a, b]), ys, ys_tail)
  return carry, ys


# --------------------------------------------------------------------------
# Rewrites of a function's remat boundaries (the references readouts compare with)
# --------------------------------------------------------------------------
def without_remat(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with every remat boundary removed: same values, everything saved.

  The reference against which recomputation is counted. Works for
  ``jax.checkpoint`` under both remat implementations, inside scans, conds
  and jits.

  Args:
    fn: the function, with remat anywhere inside it.

  Returns:
    A function of the same arguments, traced and evaluated with every remat
    boundary inlined.

  >>> import jax, jax.numpy as jnp
  >>> f = jax.checkpoint(jnp.sin)
  >>> g = without_remat(f)
  >>> "remat" in str(jax.make_jaxpr(f)(1.0)), "remat" in str(jax.make_jaxpr(g)(1.0))
  (True, False)
  """

  return _rewrite(fn, full=False)


def with_full_remat(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with every remat boundary kept but its policy replaced by full remat.

  Args:
    fn: the function, with remat anywhere inside it.
  """
  return _rewrite(fn, full=True)


def with_offload_on_device(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with every remat policy's offloads kept in device memory instead: the same
  tensors saved, none moved to the host (the reference of lint's
  ``offload-costs-memory``).

  Args:
    fn: the function, with remat anywhere inside it.
  """
  return _rewrite(fn, full=_on_device)


def _on_device(policy: Any) -> Any:
  if policy is None:
    return None

  def kept_on_device(prim: Any, *avals: Any, **params: Any) -> Any:
    d = policy(prim, *avals, **params)
    return True if isinstance(d, _jax.Offloadable) else d

  return kept_on_device


def _rewrite(fn: Callable[..., Any], full: Any) -> Callable[..., Any]:
  def rewritten(*args: Any, **kwargs: Any) -> Any:
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args, **kwargs)
    leaves = jax.tree_util.tree_leaves((args, kwargs))
    outs = _jaxpr.eval_inlined(*_jaxpr.closed_parts(closed), *leaves, full=full)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return rewritten
