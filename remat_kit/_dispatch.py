"""Classic remat or ``jax_remat3``: decided here, once, for every caller.

JAX has two remat implementations. The classic one (``remat_p``) consults any
callable policy during partial evaluation. ``jax_remat3`` (a flag since JAX
0.10.2) recognises only JAX's own policy classes by type and treats every
other callable as "save nothing", silently. So a remat_kit policy is applied:

* not at all (``skip``) when it saves everything: the same values, no boundary;
* as ``policy=None`` (``full``) for full remat, under either implementation;
* as JAX's own class (``native``) when one expresses it exactly and remat3 is on;
* otherwise on the classic implementation (``classic``), which consults it.

:data:`TO_JAX` is the table from our policy types to JAX's classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from remat_kit import _jax
from remat_kit.policies import (
    NamePlan,
    Offload,
    OffloadNames,
    Policy,
    SaveAnyNamesBut,
    SaveDots,
    SaveEverything,
    SaveNames,
    SaveNothing,
    from_config,
)

__all__ = ["Plan", "TO_JAX", "apply_transform", "checkpoint", "plan", "to_jax_policy"]


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
    NamePlan: lambda p: _name_plan(p.save, p.offload, p.src, p.dst),
    Offload: _offload,
}


class Plan(NamedTuple):
  """How a policy is applied now.

  Attributes:
    kind: ``"skip"`` (no remat boundary), ``"full"``, ``"native"`` or ``"classic"``.
    policy: what to hand to ``jax.checkpoint`` (None for full remat).
  """

  kind: str
  policy: Any


def _native(policy: Policy) -> Any:
  translate = TO_JAX.get(type(policy))
  return None if translate is None else translate(policy)


def plan(policy: Policy, remat3: bool | None = None) -> Plan:
  """How ``policy`` is applied under the current (or the given) remat implementation."""
  if isinstance(policy, SaveEverything):
    return Plan("skip", None)
  if isinstance(policy, SaveNothing):
    return Plan("full", None)
  remat3 = _jax.remat3_enabled() if remat3 is None else remat3
  if not remat3:
    return Plan("classic", policy)
  native = None if policy.excluded_names() else _native(policy)
  return Plan("native", native) if native is not None else Plan("classic", policy)


def checkpoint(fn: Callable[..., Any], policy: Policy, prevent_cse: bool = True
               ) -> Callable[..., Any]:
  """``jax.checkpoint(fn)`` applying ``policy`` faithfully under either implementation."""
  p = plan(policy)
  if p.kind == "skip":
    return fn
  if p.kind == "classic":
    with _jax.remat3(False):
      return jax.checkpoint(fn, policy=p.policy, prevent_cse=prevent_cse)
  return jax.checkpoint(fn, policy=p.policy, prevent_cse=prevent_cse)


def apply_transform(transform: Callable[..., Any], fn: Callable[..., Any], policy: Policy,
                    static_argnums: tuple[int, ...], prevent_cse: bool, args: list[Any]) -> Any:
  """``transform(fn, policy=...)(*args)`` for a Flax transform (``nn.checkpoint``,
  ``nnx.remat``), which calls ``jax.checkpoint`` when applied: the classic
  implementation is selected around the call, not the wrap."""
  p = plan(policy)
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
  ``eqx.filter_checkpoint``, ``hk.remat``) pass the policy to JAX, and under
  ``jax_remat3`` JAX honours only its own classes: anything else, remat_kit
  policies included, is treated as "save nothing" without a word. This
  returns JAX's own object where one means the same (``None`` for full
  remat, ``everything_saveable`` for none), and raises where none exists.

  Args:
    policy: anything :func:`remat_kit.policies.from_config` accepts.

  Returns:
    A policy for ``jax.checkpoint(..., policy=...)`` valid under both implementations.

  Raises:
    ValueError: if JAX has no class for it; the message says to use
      :func:`remat_kit.remat` (or the classic implementation) instead.

  Example:
    >>> import jax, remat_kit as rk
    >>> rk.to_jax_policy("save:qkv")
    SaveOnlyTheseNames(saveable_names=frozenset({'qkv'}))
  """
  pol = from_config(policy)
  if isinstance(pol, SaveEverything):
    return _jax.everything_saveable
  if isinstance(pol, SaveNothing):
    return None
  native = None if pol.excluded_names() else _native(pol)
  if native is None:
    raise ValueError(
        f"`to_jax_policy`: JAX {jax.__version__} has no policy class for {pol!r}, so a "
        "`jax.checkpoint`-based wrapper would treat it as 'save nothing' under "
        "`jax_remat3`. Apply it with `remat_kit.remat` (functions) or "
        "`remat_kit.flax.remat_policy` (modules), which run it on JAX's classic remat, "
        "or build the wrapper inside `remat_kit.classic_remat()`.")
  return native
