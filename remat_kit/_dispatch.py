"""Classic remat or ``jax_remat3``: decided here, once, for every caller.

JAX has two remat implementations. The classic one (``remat_p``) consults a
callable policy at every primitive during partial evaluation. ``jax_remat3``
(a flag since JAX 0.10.2, off by default up to 0.12) consults a plain
callable only at some primitives, and treats every other primitive as
"recompute", silently:

* JAX 0.10.2: at none; it recognises its own policy classes by type.
* JAX 0.11: at ``checkpoint_name`` tags, and its classes at matmuls.
* JAX 0.12: at tags, ``dot_general`` and ``conv_general_dilated`` (the classes are gone).

:func:`remat_kit._jax.remat3_consulted` finds which, by tracing. A remat_kit
policy is applied:

* not at all (``skip``) when it saves everything: the same values, no boundary;
* as ``policy=None`` (``full``) for full remat, under either implementation;
* under remat3 (``native``) as itself, where every primitive it may save at
  is one remat3 consults, else as JAX's own class where one means the same;
* otherwise on the classic implementation (``classic``), which consults it.
  The classic implementation is selected both when the wrapper is built
  (JAX up to 0.11 decides there) and when it is called (JAX 0.12 decides there).

:data:`TO_JAX` is the table from our policy types to JAX's classes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from remat_kit import _jax
from remat_kit.policies import (
  Offload,
  OffloadNames,
  Policy,
  SaveAnyNamesBut,
  SaveDots,
  SaveEverything,
  SaveNames,
  SaveNothing,
  SaveOrOffloadNames,
  from_config,
)

__all__ = ["Route", "TO_JAX", "apply_transform", "checkpoint", "route", "to_jax_policy"]


def _make(cls: type | None, *args: Any) -> Any:
  return None if cls is None else cls(*args)


def _name_plan(save: tuple[str, ...], off: tuple[str, ...], src: str, dst: str) -> Any:
  if not off:
    return _make(_jax.JaxSaveOnlyTheseNames, frozenset(save))
  return _make(_jax.JaxSaveAndOffloadOnlyTheseNames, frozenset(save), frozenset(off), src, dst)


def _offload(p: Offload) -> Any:
  if p.policy == SaveDots(no_batch_dims=True):
    return _make(_jax.JaxOffloadDotWithNoBatchDims, p.src, p.dst)
  if isinstance(p.policy, SaveNames):
    return _name_plan((), p.policy.names, p.src, p.dst)
  return None


# Our policy type -> JAX's object that means exactly the same under jax_remat3
# (None where this JAX version has no such class). Types not listed have no
# native form and run on the classic implementation.
TO_JAX: dict[type, Callable[[Any], Any]] = {
    SaveDots: lambda p: _make(_jax.JaxDotsSaveable, p.no_batch_dims),
    SaveNames: lambda p: _make(_jax.JaxSaveOnlyTheseNames, frozenset(p.names)),
    SaveAnyNamesBut: lambda p: _make(_jax.JaxSaveAnyNamesButThese, frozenset(p.names)),
    OffloadNames: lambda p: _name_plan((), p.names, p.src, p.dst),
    SaveOrOffloadNames: lambda p: _name_plan(p.save, p.offload, p.src, p.dst),
    Offload: _offload,
}


class Route(NamedTuple):
  """How a policy is applied now.

  Attributes:
    kind: ``"skip"`` (no remat boundary), ``"full"``, ``"native"`` or ``"classic"``.
    policy: what to hand to ``jax.checkpoint`` (None for full remat).
  """

  kind: str
  policy: Any


def _native(policy: Policy) -> Any:
  """What remat3 honours as meaning exactly ``policy``, or None."""
  if policy.excluded_names():
    return None
  may_save = policy.saving_primitives()
  if may_save is not None and may_save <= _jax.remat3_consulted():
    return policy
  translate = TO_JAX.get(type(policy))
  return None if translate is None else translate(policy)


def route(policy: Policy, remat3: bool | None = None) -> Route:
  """How ``policy`` is applied under the current (or the given) remat implementation."""
  if isinstance(policy, SaveEverything):
    return Route("skip", None)
  if isinstance(policy, SaveNothing):
    return Route("full", None)
  remat3 = _jax.remat3_enabled() if remat3 is None else remat3
  if not remat3:
    return Route("classic", policy)
  native = _native(policy)
  return Route("native", native) if native is not None else Route("classic", policy)


def checkpoint(fn: Callable[..., Any], policy: Policy, prevent_cse: Any = True
               ) -> Callable[..., Any]:
  """``jax.checkpoint(fn)`` applying ``policy`` faithfully under either implementation."""
  p = route(policy)
  if p.kind == "skip":
    return _traced(fn)
  if p.kind != "classic":
    return jax.checkpoint(fn, policy=p.policy, prevent_cse=prevent_cse)
  with _jax.remat3(False):
    ck = jax.checkpoint(fn, policy=p.policy, prevent_cse=prevent_cse)

  @functools.wraps(fn)
  def classic(*args: Any, **kwargs: Any) -> Any:
    with _jax.remat3(False):
      return ck(*args, **kwargs)

  return classic


def _as_array(x: Any) -> Any:
  return x if isinstance(x, jax.Array) else jax.numpy.asarray(x)


def _traced(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with no remat boundary, taking and giving arrays as ``jax.checkpoint`` does
  (a Python float in becomes a weakly typed array; NumPy in, a jax.Array out)."""

  @functools.wraps(fn)
  def traced(*args: Any, **kwargs: Any) -> Any:
    args, kwargs = jax.tree_util.tree_map(_as_array, (args, kwargs))
    return jax.tree_util.tree_map(_as_array, fn(*args, **kwargs))

  return traced


def apply_transform(transform: Callable[..., Any], fn: Callable[..., Any], policy: Policy,
                    static_argnums: tuple[int, ...], prevent_cse: bool, args: list[Any]) -> Any:
  """``transform(fn, policy=...)(*args)`` for a Flax transform (``nn.checkpoint``,
  ``nnx.remat``), which calls ``jax.checkpoint`` when applied: the classic
  implementation is selected around the call, not the wrap."""
  p = route(policy)
  if p.kind == "skip":
    return fn(*args)
  ck = transform(fn, policy=p.policy, static_argnums=static_argnums, prevent_cse=prevent_cse)
  if p.kind == "classic":
    with _jax.remat3(False):
      return ck(*args)
  return ck(*args)


def to_jax_policy(policy: Any) -> Any:
  """``policy`` as an object that ``jax.checkpoint``-based wrappers honour as is.

  Third-party wrappers (``jax.checkpoint``, ``nn.remat``,
  ``eqx.filter_checkpoint``, ``hk.remat``) pass the policy to JAX. Under
  ``jax_remat3`` JAX consults a plain callable only at some primitives
  (tags and matmuls on JAX 0.12, tags on 0.11, none on 0.10.2, which
  recognises its own classes) and recomputes the rest without a word. This
  returns what the installed JAX honours as meaning exactly ``policy`` under
  both implementations:

  * ``None`` for full remat, ``everything_saveable`` for no remat;
  * the policy itself where JAX has no remat3 (0.10.0), or where remat3
    consults callables at every primitive the policy may save at;
  * else JAX's own policy class where one means the same (0.10.2, 0.11).

  Args:
    policy: anything :func:`remat_kit.policies.from_config` accepts.

  Returns:
    A policy for ``jax.checkpoint(..., policy=...)`` valid under both implementations.

  Raises:
    ValueError: where the installed JAX has no such form (a size or
      primitive policy under remat3, say); the message says to use
      :func:`remat_kit.remat` or :func:`remat_kit.classic_remat` instead.

  Example:
    >>> import jax, jax.numpy as jnp, remat_kit as rk
    >>> def f(x):
    ...   h = rk.checkpoint_name(jnp.sin(x), "h")
    ...   return jnp.sin(h).sum()
    >>> ck = jax.checkpoint(f, policy=rk.to_jax_policy("save:h"))
    >>> [(r.kind, r.name) for r in rk.report.saved_residuals(ck, jnp.ones(3))]
    [('argument', None), ('activation', 'h')]
  """
  pol = from_config(policy)
  if isinstance(pol, SaveEverything):
    return _jax.everything_saveable
  if isinstance(pol, SaveNothing):
    return None
  if not _jax.has_remat3():
    return pol
  native = _native(pol)
  if native is None:
    consulted = sorted(_jax.remat3_consulted()) or "no plain callable"
    raise ValueError(
        f"`to_jax_policy`: under `jax_remat3`, JAX {jax.__version__} consults a callable "
        f"policy only at {consulted} and has no policy class for {pol!r}, so a "
        "`jax.checkpoint`-based wrapper would recompute what it saves elsewhere. Apply it "
        "with `remat_kit.remat` (functions) or `remat_kit.flax.remat_policy` (modules), "
        "which run it on JAX's classic remat, or build and call the wrapper inside "
        "`remat_kit.classic_remat()`.")
  return native
