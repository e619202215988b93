"""The JAX boundary: every fact remat_kit needs from JAX beyond its stable API.

No other module of remat_kit imports ``jax._src`` or ``jax.interpreters``.
Each fact comes from JAX's public API where the installed version has it
(``jax.ad_checkpoint``, ``jax.checkpoint_policies``, ``jax.extend.core``,
``jax.config``); where it has none, it is *discovered* from public calls (the
primitive a traced ``checkpoint_name`` binds, the type of a public policy
object) rather than imported from a private path. One private import is left,
gated by feature detection: ``jax._src.config``'s thread-local ``jax_remat3``
override, with a public ``jax.config.update`` fallback.

Versions: JAX 0.10.0 and later. JAX 0.10.0 has no ``jax_remat3`` and its
policies are plain functions (no policy classes); from 0.10.2 on, the policy
objects are frozen dataclasses, which ``jax_remat3`` recognises by type.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.extend.core as _xcore
import jax.extend.source_info_util  # noqa: F401  (jax.extend.source_info_util)
from jax import ad_checkpoint as _ad

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())
MIN_JAX = (0, 10, 0)

if JAX_VERSION < MIN_JAX:  # pragma: no cover - refused by pyproject's bound
  raise ImportError(
      f"remat_kit needs JAX >= {'.'.join(map(str, MIN_JAX))}; found jax {jax.__version__}. "
      "Upgrade with `pip install -U jax jaxlib`.")

# --------------------------------------------------------------------------
# Jaxpr types and remat decisions: public in every admitted version.
# --------------------------------------------------------------------------
Jaxpr = _xcore.Jaxpr
ClosedJaxpr = _xcore.ClosedJaxpr
Literal = _xcore.Literal
Var = _xcore.Var
Primitive = _xcore.Primitive

Saveable = _ad.Saveable
Recompute = _ad.Recompute
Offloadable = _ad.Offloadable
checkpoint_name = _ad.checkpoint_name


def aval_key(aval: Any) -> tuple[Any, str]:
  """Shape and dtype of an abstract value, ignoring weak types and sharding."""
  return (tuple(getattr(aval, "shape", ())), str(getattr(aval, "dtype", "")))


def ensure_decision(value: Any) -> Any:
  """A policy's return value as ``Saveable``, ``Recompute`` or an ``Offloadable``."""
  if value is True:
    return Saveable
  if value is False:
    return Recompute
  if value is Saveable or value is Recompute or isinstance(value, _ad.Offloadable):
    return value
  raise TypeError(
      f"a remat policy returned {value!r} of type {type(value).__name__}; it must return "
      "a bool, `jax.ad_checkpoint.Saveable`, `Recompute` or an `Offloadable(src=, dst=)`.")


# --------------------------------------------------------------------------
# JAX's policy classes (the only policies jax_remat3 honours), found by type.
# --------------------------------------------------------------------------
def _policy_class(public_name: str, example: Any) -> type | None:
  """JAX's class ``public_name`` from ``jax.checkpoint_policies``, else the type of
  a public example object when that object is a (dataclass) policy, else None."""
  cp = jax.checkpoint_policies
  cls = getattr(cp, public_name, None)
  if isinstance(cls, type):
    return cls
  try:
    obj = example(cp)
  except Exception:  # noqa: BLE001 - a factory this version lacks
    return None
  t = type(obj)
  return None if t.__name__ == "function" or not hasattr(t, "__dataclass_fields__") else t


# Typed Any: classes found at import time, whose fields (read after an isinstance
# check) are the installed JAX's.
JaxSaveOnlyTheseNames: Any = _policy_class(
    "SaveOnlyTheseNames", lambda cp: cp.save_only_these_names("n"))
JaxSaveAnyNamesButThese: Any = _policy_class(
    "SaveAnyNamesButThese", lambda cp: cp.save_any_names_but_these("n"))
JaxSaveAndOffloadOnlyTheseNames: Any = _policy_class(
    "SaveAndOffloadOnlyTheseNames", lambda cp: cp.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=("n",),
        offload_src="device", offload_dst="pinned_host"))
JaxDotsSaveable: Any = _policy_class("DotsSaveable", lambda cp: cp.dots_saveable)
JaxOffloadDotWithNoBatchDims: Any = _policy_class(
    "OffloadDotWithNoBatchDims",
    lambda cp: cp.offload_dot_with_no_batch_dims("device", "pinned_host"))
everything_saveable = jax.checkpoint_policies.everything_saveable
dots_saveable = jax.checkpoint_policies.dots_saveable
dots_with_no_batch_dims_saveable = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
nothing_saveable = jax.checkpoint_policies.nothing_saveable


def single_device_sharding(device: Any) -> Any:
  """A sharding that puts a whole array on ``device``.

  ``jax.sharding.make_single_device_sharding`` where this JAX has it (0.12.1
  deprecates constructing ``SingleDeviceSharding`` directly), else the class.
  """
  make = getattr(jax.sharding, "make_single_device_sharding", None)
  if make is not None:
    return make(device)
  return jax.sharding.SingleDeviceSharding(device)


def is_symbolic_zero(tangent: Any) -> bool:
  """Whether a ``custom_jvp`` rule (``symbolic_zeros=True``) got a symbolic zero tangent:
  the input does not depend on what is differentiated."""
  return isinstance(tangent, jax.custom_derivatives.SymbolicZero)


# --------------------------------------------------------------------------
# The jax_remat3 flag.
# --------------------------------------------------------------------------
@functools.cache
def has_remat3() -> bool:
  """Whether the installed JAX has the ``jax_remat3`` flag (0.10.2 and later).

  Cached: ``jax.config.values`` builds a dict of every flag on each access, and the
  jaxpr walkers ask once per equation.
  """
  return "jax_remat3" in jax.config.values


def remat3_enabled() -> bool:
  """Whether ``jax_remat3`` is on right now (thread-local overrides included)."""
  if not has_remat3():
    return False
  state = _remat3_state()
  if state is not None:
    return bool(state.value)
  return bool(jax.config.values["jax_remat3"])


@functools.cache
def _remat3_state() -> Any:
  """JAX's private thread-local ``jax_remat3`` state, or None where it moved."""
  try:
    from jax._src import config as _config  # the one private import

    state = getattr(_config, "remat3", None)
  except ImportError:  # pragma: no cover - a JAX that moved it
    return None
  if state is None or not hasattr(state, "value") or not callable(state):
    return None  # pragma: no cover
  return state


@contextlib.contextmanager
def remat3(enabled: bool) -> Iterator[None]:
  """Runs the block with ``jax_remat3`` set to ``enabled`` (a no-op where JAX lacks it).

  ``jax.checkpoint`` picks its implementation when it wraps (or, in Flax,
  applies) a function, so a wrapper built inside ``remat3(False)`` binds the
  classic ``remat`` primitive, whose partial evaluation consults any callable
  policy. Uses JAX's thread-local override where it exists, else a global
  ``jax.config.update`` restored on exit.
  """
  if not has_remat3():
    yield
    return
  state = _remat3_state()
  if state is not None:
    with state(enabled):
      yield
    return
  old = jax.config.values["jax_remat3"]  # pragma: no cover - fallback
  jax.config.update("jax_remat3", enabled)  # pragma: no cover
  try:  # pragma: no cover
    yield
  finally:  # pragma: no cover
    jax.config.update("jax_remat3", old)


# --------------------------------------------------------------------------
# What remat looks like in a jaxpr, discovered by tracing public calls.
# --------------------------------------------------------------------------
class Markers(NamedTuple):
  """How one remat implementation shows up in a jaxpr."""

  name_primitive: Any  # the primitive `checkpoint_name` binds
  name_classes: tuple[type, ...]  # remat3: the hi-primitive classes of the tags in `_prim`
  remat_primitive: Any  # the primitive `jax.checkpoint` binds
  remat_class: type | None  # remat3: the hi-primitive class carried in `_prim`


def _single_eqn(fn: Any) -> Any:
  closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((2,), "float32"))
  if len(closed.jaxpr.eqns) != 1:  # pragma: no cover - a JAX that lowers these otherwise
    raise RuntimeError(
        f"remat_kit cannot recognise remat in jax {jax.__version__}: tracing a single "
        f"`{getattr(fn, '__name__', fn)}` gave {len(closed.jaxpr.eqns)} equations. "
        "Please report this with your JAX version.")
  return closed.jaxpr.eqns[0]


@functools.cache
def markers(remat3_on: bool) -> Markers:
  """The primitives (and remat3 hi-primitive classes) of each implementation."""
  tags = [checkpoint_name]
  if hasattr(_ad, "checkpoint_name_fwd"):  # JAX 0.11+: a tag of its own under remat3
    tags.append(_ad.checkpoint_name_fwd)
  with remat3(remat3_on):
    name_eqns = [_single_eqn(lambda x, t=t: t(x, "probe")) for t in tags]
    remat_eqn = _single_eqn(jax.checkpoint(lambda x: x * 2.0))
  prims = {e.primitive for e in name_eqns}
  if len(prims) != 1:  # pragma: no cover - a JAX whose tags bind different primitives
    raise unknown("what `checkpoint_name` binds", "one primitive for every tag",
                  sorted(p.name for p in prims))
  name_cls = tuple(dict.fromkeys(type(e.params["_prim"]) for e in name_eqns
                                 if "_prim" in e.params))
  remat_cls = type(remat_eqn.params["_prim"]) if "_prim" in remat_eqn.params else None
  return Markers(name_eqns[0].primitive, name_cls, remat_eqn.primitive, remat_cls)


@functools.cache
def _all_markers() -> tuple[Markers, ...]:
  return (markers(False), markers(True)) if has_remat3() else (markers(False),)


def checkpoint_name_of(prim: Any, params: dict[str, Any]) -> str | None:
  """The ``checkpoint_name`` tag an equation carries, under either implementation."""
  for m in _all_markers():
    if prim is m.name_primitive:
      if not m.name_classes:
        return params.get("name")
      if isinstance(params.get("_prim"), m.name_classes):
        return params["_prim"].name
  return None


def is_remat(eqn: Any) -> bool:
  """Whether ``eqn`` is a remat boundary (``jax.checkpoint``), either implementation."""
  for m in _all_markers():
    if eqn.primitive is m.remat_primitive:
      return m.remat_class is None or isinstance(eqn.params.get("_prim"), m.remat_class)
  return False


def eqn_context(eqn: Any) -> Any:
  """A context that re-binds ``eqn`` with its own source line and name stack, as
  ``jax.core.eval_jaxpr`` does (public ``jax.extend.source_info_util``)."""
  siu = getattr(jax.extend, "source_info_util", None)
  if siu is None or not hasattr(siu, "user_context"):  # pragma: no cover - older JAX
    return contextlib.nullcontext()
  name_stack = siu.current_name_stack() + eqn.source_info.name_stack
  return siu.user_context(eqn.source_info.traceback, name_stack=name_stack)


def remat_uses_remat3(eqn: Any) -> bool:
  """Whether a remat equation was bound by the jax_remat3 implementation."""
  if not has_remat3():
    return False
  m = markers(True)
  return eqn.primitive is m.remat_primitive and (
      m.remat_class is None or isinstance(eqn.params.get("_prim"), m.remat_class))


def remat_params(eqn: Any) -> dict[str, Any]:
  """A remat equation's parameters (``jaxpr``, ``policy``, ...), either implementation."""
  inner = eqn.params.get("_prim")
  if inner is not None and isinstance(getattr(inner, "params", None), dict):
    return inner.params
  return eqn.params


def hi_inner_jaxpr(params: dict[str, Any]) -> Jaxpr | None:
  """The jaxpr carried inside a remat3 hi-primitive's parameters, if any."""
  inner = getattr(params.get("_prim"), "params", None)
  if isinstance(inner, dict):
    j = inner.get("jaxpr")
    if isinstance(j, ClosedJaxpr):
      return j.jaxpr
    if isinstance(j, Jaxpr):
      return j
  return None


def jax_policy_names(policy: Any) -> frozenset[str]:
  """The checkpoint names one of JAX's own policies refers to, where they can be read.

  JAX's policy classes carry them as fields. Where a JAX version returns a
  plain function instead (``save_and_offload_only_these_names`` before the
  class existed, every name policy in JAX 0.10.0), the names are read from
  the function's closure: an implementation detail, so a miss returns fewer
  names, never an error.
  """
  names: set[str] = set()
  for attr in ("names", "saveable_names", "names_which_can_be_saved",
               "names_which_can_be_offloaded"):
    v = getattr(policy, attr, None)
    if isinstance(v, (set, frozenset, tuple, list)):
      names.update(x for x in v if isinstance(x, str))
  for cell in getattr(policy, "__closure__", None) or ():
    try:
      v = cell.cell_contents
    except ValueError:
      continue
    if isinstance(v, (set, frozenset, tuple, list)) and v and all(isinstance(x, str) for x in v):
      names.update(v)
  return frozenset(names)


def closure_policy_kind(policy: Any) -> str | None:
  """Which of JAX's policy *factories* made ``policy``, where that JAX returns closures.

  JAX 0.10.0 and 0.12.1 return plain functions from ``save_only_these_names``,
  ``save_any_names_but_these``, ``save_and_offload_only_these_names`` and
  ``offload_dot_with_no_batch_dims`` (0.10.2 to 0.12.0 return classes). Returns
  the factory's name, or None.
  """
  module = getattr(policy, "__module__", "") or ""
  qual = getattr(policy, "__qualname__", "") or ""
  if not module.startswith("jax.") or "<locals>" not in qual:
    return None
  factory = qual.split(".<locals>", 1)[0]
  return factory if factory in _CLOSURE_FACTORIES else None


# JAX's policy factories that return closures in some versions (0.10.0 all of them; 0.12.1
# again, its policy classes gone).
_CLOSURE_FACTORIES = ("save_only_these_names", "save_any_names_but_these",
                      "save_and_offload_only_these_names", "offload_dot_with_no_batch_dims")


def closure_vars(policy: Any) -> dict[str, Any]:
  """The variables a closure policy of JAX's closes over, by name (``offload_src``,
  ``names_which_can_be_saved``, ...): how a factory's arguments are read back where
  JAX returns a plain function. Empty where there is no closure."""
  code = getattr(policy, "__code__", None)
  cells = getattr(policy, "__closure__", None) or ()
  out: dict[str, Any] = {}
  for name, cell in zip(getattr(code, "co_freevars", ()), cells):
    try:
      out[name] = cell.cell_contents
    except ValueError:  # pragma: no cover - an empty cell
      continue
  return out


def name_primitive_name() -> str:
  """The name of the primitive the classic ``checkpoint_name`` binds (``"name"``).

  A policy is called with it at every tag, under either implementation.
  """
  return markers(False).name_primitive.name


@functools.cache
def remat3_consulted() -> frozenset[str]:
  """The primitives at which ``jax_remat3`` calls a plain callable policy.

  Discovered by tracing: a recording policy is handed to ``jax.checkpoint``
  under ``jax_remat3`` around a tag, a matmul, a convolution and a ``sin``.
  JAX 0.12 calls it at the tag (``name``), ``dot_general`` and
  ``conv_general_dilated``; 0.10.2 and 0.11 call no plain callable (they
  recognise their own policy classes by type); without the flag, empty.
  """
  if not has_remat3():
    return frozenset()
  seen: set[str] = set()

  def record(prim: Any, *_: Any, **__: Any) -> bool:
    seen.add(prim.name)
    return False

  def f(x: Any, w: Any, k: Any) -> Any:
    y = checkpoint_name(jax.numpy.sin(x @ w), "probe")
    z = jax.lax.conv_general_dilated(y[None, None], k, (1, 1), "SAME")
    return jax.numpy.sin(z).sum()

  s = jax.ShapeDtypeStruct
  with remat3(True):
    ck = jax.checkpoint(f, policy=record)
    jax.make_jaxpr(jax.grad(ck, argnums=(0, 1, 2)))(
        s((4, 4), "float32"), s((4, 4), "float32"), s((1, 1, 3, 3), "float32"))
  return frozenset(seen)


# --------------------------------------------------------------------------
# Errors for JAX structures remat_kit does not know.
# --------------------------------------------------------------------------
class UnknownJaxStructure(RuntimeError):
  """A JAX structure (an equation's parameters, a remat layout) remat_kit does not know."""


def unknown(what: str, expected: str, found: Any) -> UnknownJaxStructure:
  return UnknownJaxStructure(
      f"remat_kit does not know {what} in jax {jax.__version__}: expected {expected}, "
      f"found {found}. remat_kit supports JAX {'.'.join(map(str, MIN_JAX))} to 0.12; "
      "please report this with your JAX version.")


# --------------------------------------------------------------------------
# The compiler's memory analysis.
# --------------------------------------------------------------------------
# `CompiledMemoryStats` fields, in bytes, by the name remat_kit reports them under.
# JAX 0.12 adds the last three; a field this JAX lacks is left out.
MEMORY_FIELDS = {
    "temp_size": "temp_size_in_bytes", "argument_size": "argument_size_in_bytes",
    "output_size": "output_size_in_bytes", "alias_size": "alias_size_in_bytes",
    "generated_code_size": "generated_code_size_in_bytes",
    "host_argument_size": "host_argument_size_in_bytes",
    "host_output_size": "host_output_size_in_bytes",
    "host_alias_size": "host_alias_size_in_bytes",
    "host_temp_size": "host_temp_size_in_bytes",
    "host_generated_code_size": "host_generated_code_size_in_bytes",
    "peak_memory": "peak_memory_in_bytes",
    "total_allocation": "total_allocation_bytes",
    "peak_unpadded_heap": "peak_unpadded_heap_bytes",
    "indefinite_allocations": "indefinite_allocations",
}


def memory_fields(stats: Any) -> dict[str, int]:
  """The integer fields of a ``compiled.memory_analysis()`` result, by short name.

  Raises where the object has none of the fields every admitted JAX reports.
  """
  if stats is None:
    return {}
  out = {k: int(v) for k, f in MEMORY_FIELDS.items()
         if isinstance(v := getattr(stats, f, None), int) and not isinstance(v, bool)}
  if "temp_size" not in out or "argument_size" not in out:
    raise unknown("this compiler's memory analysis",
                   "`temp_size_in_bytes` and `argument_size_in_bytes`",
                   sorted(a for a in dir(stats) if not a.startswith("_")))
  return out


def _binds(remat3_on: bool, name: bool) -> str:
  def one(m: Markers) -> str:
    prim = m.name_primitive if name else m.remat_primitive
    classes = m.name_classes if name else (m.remat_class,) if m.remat_class else ()
    return prim.name + (f"[{', '.join(c.__name__ for c in classes)}]" if classes else "")
  return "; ".join(one(m) for m in _all_markers())


def _scan_params() -> list[str]:
  closed = jax.make_jaxpr(lambda c: jax.lax.scan(lambda c, _: (c, c), c, None, length=2))(0.0)
  return sorted(closed.jaxpr.eqns[0].params)


@functools.cache
def remat3_decided_at() -> str:
  """When ``jax.checkpoint`` picks its implementation: ``"built"`` (JAX 0.10.2, 0.11) or
  ``"called"`` (0.12), discovered by building under one setting and calling under the
  other."""
  with remat3(False):
    ck = jax.checkpoint(lambda x: x * 2.0)
  with remat3(True):
    eqn = _single_eqn(ck)
  m = markers(True)
  return "called" if eqn.primitive is m.remat_primitive and (
      m.remat_class is None or isinstance(eqn.params.get("_prim"), m.remat_class)) else "built"


def version_report() -> dict[str, Any]:
  """What this module found in the installed JAX (shown by ``python -m remat_kit``)."""
  return {
      "jax": jax.__version__,
      "jax_remat3 flag": has_remat3(),
      "jax_remat3 on by default": bool(jax.config.values.get("jax_remat3", False)),
      "jax_remat3 calls plain callable policies at": sorted(remat3_consulted()) or None,
      "jax_remat3 picks the implementation when the wrapper is": (
          remat3_decided_at() if has_remat3() else None),
      "checkpoint_name binds (classic; remat3)": _binds(False, True),
      "jax.checkpoint binds (classic; remat3)": _binds(False, False),
      "scan equation layout": "+".join(sorted(set(_scan_params()) & {
          "num_consts", "num_carry", "ft_in", "ft_out"})),
      "ClosedJaxpr is Jaxpr": ClosedJaxpr is Jaxpr,
      "checkpoint_name_fwd": hasattr(_ad, "checkpoint_name_fwd"),
      "remat3 thread-local override (private jax._src.config.remat3)":
          _remat3_state() is not None if has_remat3() else None,
      **{f"policy class {n}": c is not None for n, c in [
          ("SaveOnlyTheseNames", JaxSaveOnlyTheseNames),
          ("SaveAnyNamesButThese", JaxSaveAnyNamesButThese),
          ("SaveAndOffloadOnlyTheseNames", JaxSaveAndOffloadOnlyTheseNames),
          ("DotsSaveable", JaxDotsSaveable),
          ("OffloadDotWithNoBatchDims", JaxOffloadDotWithNoBatchDims)]},
  }
