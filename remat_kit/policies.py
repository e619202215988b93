"""Rematerialization policies as values.

A policy decides, for every intermediate value of a checkpointed function,
whether the forward pass **saves** it for the backward pass, **offloads** it to
host memory, or lets the backward pass **recompute** it.

Every policy here is a frozen, hashable dataclass with a readable ``repr`` and
is itself a valid ``jax.checkpoint`` policy::

  >>> import jax, remat_kit as rk
  >>> policy = rk.policies.save_only_these_names("qkv") | rk.policies.dots_saveable()
  >>> policy
  Union(policies=(SaveNames(names=('qkv',)), SaveDots(no_batch_dims=False)))
  >>> f = jax.checkpoint(lambda x: x * 2, policy=policy)  # accepted as is

Policies compose with ``|`` (save if either saves) and ``&`` (save only if
both save), and :func:`from_config` builds them from booleans, strings and
dicts, so they can live in a config file.

Use :func:`remat_kit.remat` rather than ``jax.checkpoint`` to apply them: it
checks that every name a policy refers to is actually tagged in the function,
keeps working under ``jax_remat3`` (which silently ignores callable policies),
and makes :func:`save_anything_except_these_names` really exclude its names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from remat_kit import _compat

__all__ = [
    "Policy",
    "SaveEverything",
    "SaveNothing",
    "SaveDots",
    "SaveNames",
    "OffloadNames",
    "NamePlan",
    "SaveAnyNamesBut",
    "SaveAnythingExcept",
    "SavePrimitives",
    "SaveBySize",
    "Offload",
    "Union",
    "Intersection",
    "CallablePolicy",
    "SKIP_CHECKPOINT",
    "FULL_REMAT",
    "everything_saveable",
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "save_only_these_names",
    "offload_these_names",
    "save_any_names_but_these",
    "save_anything_except_these_names",
    "save_these_primitives",
    "save_by_size",
    "offload",
    "save_from_both_policies",
    "save_from_all_policies",
    "save_if_all_policies_save",
    "from_config",
    "register",
    "registered",
]

Decision = Any  # _compat.Saveable | _compat.Recompute | _compat.Offloadable

_ACTIONS = ("save", "offload", "recompute")
DEFAULT_OFFLOAD_SRC = "device"
DEFAULT_OFFLOAD_DST = "pinned_host"

# Returned by `Policy.native()` when the policy saves everything: the
# fastest and most faithful translation is not to checkpoint at all.
SKIP_CHECKPOINT = object()
# Returned by `Policy.native()` for full remat: `jax.checkpoint(policy=None)`.
FULL_REMAT = object()


def _names(names: Iterable[str], api: str) -> tuple[str, ...]:
  """Validates and sorts a collection of `checkpoint_name` tags."""
  if isinstance(names, str):
    names = (names,)
  out = []
  for n in names:
    if not isinstance(n, str) or not n:
      raise TypeError(
          f"`{api}`: every name must be a non-empty str, got {n!r}. "
          "Pass the strings you gave to `checkpoint_name`.")
    out.append(n)
  return tuple(sorted(set(out)))


class Policy:
  """Base class of remat_kit policies.

  Subclasses implement :meth:`decide`; calling a policy (as ``jax.checkpoint``
  does, with a primitive, the input avals and the equation's parameters)
  returns ``True``/``False`` or JAX's ``Offloadable`` marker.
  """

  def decide(self, prim: Any, avals: tuple[Any, ...], params: dict[str, Any]) -> Decision:
    raise NotImplementedError

  def __call__(self, prim: Any, *avals: Any, **params: Any) -> Any:
    d = self.decide(prim, avals, params)
    if d is _compat.Saveable:
      return True
    if d is _compat.Recompute:
      return False
    return d  # Offloadable

  # Composition -------------------------------------------------------------
  def __or__(self, other: Any) -> Union:
    return save_from_both_policies(self, other)

  def __ror__(self, other: Any) -> Union:
    return save_from_both_policies(other, self)

  def __and__(self, other: Any) -> Intersection:
    return save_if_all_policies_save(self, other)

  def __rand__(self, other: Any) -> Intersection:
    return save_if_all_policies_save(other, self)

  # Introspection -----------------------------------------------------------
  def referenced_names(self) -> frozenset[str]:
    """The `checkpoint_name` tags this policy refers to."""
    return frozenset()

  def referenced_primitives(self) -> frozenset[str]:
    """The primitive names this policy refers to."""
    return frozenset()

  def excluded_names(self) -> frozenset[str]:
    """Names whose producers must be recomputed (see `SaveAnythingExcept`)."""
    return frozenset()

  def with_producers(self, producers: frozenset[tuple[Any, ...]]) -> Policy:
    """This policy with the producers of its excluded names filled in."""
    return self

  def native(self) -> Any:
    """This policy in a form `jax_remat3` understands, or None if it has none.

    `jax_remat3` recognises a handful of JAX's own policy classes by type and
    treats every other callable as "save nothing". `remat_kit.remat` uses the
    native form when there is one and JAX's classic implementation otherwise.
    """
    return None


# --------------------------------------------------------------------------
# Leaf policies
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SaveEverything(Policy):
  """Saves every intermediate: the same memory and compute as no remat."""

  def decide(self, prim, avals, params):
    return _compat.Saveable

  def native(self):
    return SKIP_CHECKPOINT


@dataclasses.dataclass(frozen=True)
class SaveNothing(Policy):
  """Full remat: saves only the inputs; the backward pass reruns the forward.

  Memory: the function's inputs only. Compute: one extra forward pass.
  """

  def decide(self, prim, avals, params):
    return _compat.Recompute

  def native(self):
    return FULL_REMAT


def _is_dot(prim: Any, params: dict[str, Any], no_batch_dims: bool) -> bool:
  name = getattr(prim, "name", "")
  if name == "dot_general":
    if not no_batch_dims:
      return True
    (_, _), (lhs_b, rhs_b) = params["dimension_numbers"]
    return not lhs_b and not rhs_b
  return name == "conv_general_dilated" and not no_batch_dims


@dataclasses.dataclass(frozen=True)
class SaveDots(Policy):
  """Saves the outputs of matrix multiplies (and convolutions).

  Everything elementwise (activations, norms, dropout masks) is recomputed.
  Memory: one tensor per matmul. Compute: the cheap, memory-bound ops again.

  Attributes:
    no_batch_dims: if True, save only `dot_general`s without batch dimensions
      (projections, not attention's batched ``q @ k``), and no convolutions.
  """

  no_batch_dims: bool = False

  def decide(self, prim, avals, params):
    return _compat.Saveable if _is_dot(prim, params, self.no_batch_dims) else _compat.Recompute

  def referenced_primitives(self):
    return frozenset({"dot_general"})

  def native(self):
    return _compat.JaxDotsSaveable(self.no_batch_dims)


@dataclasses.dataclass(frozen=True)
class SaveNames(Policy):
  """Saves the values tagged with these `checkpoint_name`s; recomputes the rest.

  Attributes:
    names: the `checkpoint_name` tags to save.
  """

  names: tuple[str, ...]

  def __post_init__(self):
    object.__setattr__(self, "names", _names(self.names, "SaveNames(names=...)"))

  def decide(self, prim, avals, params):
    n = _compat.checkpoint_name_of(prim, params)
    return _compat.Saveable if n is not None and n in self.names else _compat.Recompute

  def referenced_names(self):
    return frozenset(self.names)

  def native(self):
    return _compat.JaxSaveOnlyTheseNames(frozenset(self.names))


@dataclasses.dataclass(frozen=True)
class OffloadNames(Policy):
  """Moves the values with these names to host memory; recomputes the rest.

  Memory: device memory as full remat for these tensors, host memory for
  them instead. Compute: a device-to-host copy forward and back.

  Attributes:
    names: the `checkpoint_name` tags to offload.
    src: memory kind the values live in (``"device"``).
    dst: memory kind to offload to (``"pinned_host"``).
  """

  names: tuple[str, ...]
  src: str = DEFAULT_OFFLOAD_SRC
  dst: str = DEFAULT_OFFLOAD_DST

  def __post_init__(self):
    object.__setattr__(self, "names", _names(self.names, "OffloadNames(names=...)"))

  def decide(self, prim, avals, params):
    n = _compat.checkpoint_name_of(prim, params)
    if n is not None and n in self.names:
      return _compat.Offloadable(src=self.src, dst=self.dst)
    return _compat.Recompute

  def referenced_names(self):
    return frozenset(self.names)

  def native(self):
    if _compat.JaxSaveAndOffloadOnlyTheseNames is None:
      return None
    return _compat.JaxSaveAndOffloadOnlyTheseNames(
        frozenset(), frozenset(self.names), self.src, self.dst)


@dataclasses.dataclass(frozen=True)
class NamePlan(Policy):
  """A per-name plan: save some names, offload others, recompute the rest.

  Built from a dict by :func:`from_config`, e.g.
  ``{"attn_out": "save", "mlp_hidden": "offload", "*": "recompute"}``.

  Attributes:
    save: names to keep on device.
    offload: names to move to host memory.
    src: memory kind of offloaded values.
    dst: memory kind to offload to.
  """

  save: tuple[str, ...] = ()
  offload: tuple[str, ...] = ()
  src: str = DEFAULT_OFFLOAD_SRC
  dst: str = DEFAULT_OFFLOAD_DST

  def __post_init__(self):
    save = _names(self.save, "NamePlan(save=...)")
    off = _names(self.offload, "NamePlan(offload=...)")
    both = sorted(set(save) & set(off))
    if both:
      raise ValueError(
          f"`NamePlan`: names {both} are both saved and offloaded. Give each "
          "name one action: 'save', 'offload' or 'recompute'.")
    object.__setattr__(self, "save", save)
    object.__setattr__(self, "offload", off)

  def decide(self, prim, avals, params):
    n = _compat.checkpoint_name_of(prim, params)
    if n is None:
      return _compat.Recompute
    if n in self.save:
      return _compat.Saveable
    if n in self.offload:
      return _compat.Offloadable(src=self.src, dst=self.dst)
    return _compat.Recompute

  def referenced_names(self):
    return frozenset(self.save) | frozenset(self.offload)

  def native(self):
    if not self.offload:
      return _compat.JaxSaveOnlyTheseNames(frozenset(self.save))
    if _compat.JaxSaveAndOffloadOnlyTheseNames is None:
      return None
    return _compat.JaxSaveAndOffloadOnlyTheseNames(
        frozenset(self.save), frozenset(self.offload), self.src, self.dst)


@dataclasses.dataclass(frozen=True)
class SaveAnyNamesBut(Policy):
  """Saves every named value except these names; recomputes unnamed values."""

  names: tuple[str, ...]

  def __post_init__(self):
    object.__setattr__(self, "names", _names(self.names, "SaveAnyNamesBut(names=...)"))

  def decide(self, prim, avals, params):
    n = _compat.checkpoint_name_of(prim, params)
    return _compat.Saveable if n is not None and n not in self.names else _compat.Recompute

  def referenced_names(self):
    return frozenset(self.names)

  def native(self):
    return _compat.JaxSaveAnyNamesButThese(frozenset(self.names))


@dataclasses.dataclass(frozen=True)
class SaveAnythingExcept(Policy):
  """Saves everything except the values with these names.

  JAX's ``save_anything_except_these_names`` saves everything: refusing to
  save a named value only makes JAX save the unnamed value just before the
  tag, the same tensor. This policy really drops them: under
  :func:`remat_kit.remat`, the operation that produces each excluded value is
  recomputed from its own inputs on the backward pass.

  Handed straight to ``jax.checkpoint`` it can only refuse the tag itself, as
  JAX's does; apply it with :func:`remat_kit.remat`, which finds each excluded
  tensor's producer at trace time (``producers``). A producer is recognised by
  its primitive and input shapes, so an identical op elsewhere in the function
  is recomputed too: more compute, never more memory than promised.

  Memory: as no remat, less the excluded tensors (plus the producer's inputs
  where nothing else keeps them). Compute: one op per excluded tensor.
  """

  names: tuple[str, ...]
  producers: frozenset[tuple[Any, ...]] = dataclasses.field(default=frozenset(), repr=False)

  def __post_init__(self):
    object.__setattr__(self, "names", _names(self.names, "SaveAnythingExcept(names=...)"))
    object.__setattr__(self, "producers", frozenset(self.producers))

  def decide(self, prim, avals, params):
    n = _compat.checkpoint_name_of(prim, params)
    if n is not None:
      return _compat.Recompute if n in self.names else _compat.Saveable
    if self.producers:
      sig = (prim.name, tuple((tuple(getattr(a, "shape", ())), str(getattr(a, "dtype", "")))
                              for a in avals))
      if sig in self.producers:
        return _compat.Recompute
    return _compat.Saveable

  def referenced_names(self):
    return frozenset(self.names)

  def excluded_names(self):
    return frozenset(self.names)

  def with_producers(self, producers):
    return dataclasses.replace(self, producers=frozenset(producers))


@dataclasses.dataclass(frozen=True)
class SavePrimitives(Policy):
  """Saves the outputs of the named primitives, e.g. ``("dot_general", "exp")``."""

  primitives: tuple[str, ...]

  def __post_init__(self):
    object.__setattr__(
        self, "primitives", _names(self.primitives, "SavePrimitives(primitives=...)"))

  def decide(self, prim, avals, params):
    return _compat.Saveable if getattr(prim, "name", None) in self.primitives else _compat.Recompute

  def referenced_primitives(self):
    return frozenset(self.primitives)


def _out_bytes(prim: Any, avals: tuple[Any, ...], params: dict[str, Any]) -> int:
  """Bytes of an equation's outputs, from the primitive's abstract evaluation."""
  out = prim.abstract_eval(*avals, **params)
  if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], (set, frozenset)):
    out = out[0]  # (avals, effects)
  outs = out if isinstance(out, (list, tuple)) else [out]
  total = 0
  for a in outs:
    shape = getattr(a, "shape", None)
    dtype = getattr(a, "dtype", None)
    if shape is None or dtype is None:
      continue
    total += math.prod(shape) * np.dtype(dtype).itemsize
  return total


@dataclasses.dataclass(frozen=True)
class SaveBySize(Policy):
  """Saves every op output whose size in bytes lies in ``[min_bytes, max_bytes]``.

  Small tensors (per-token statistics, norms) are cheap to keep and can be
  expensive to recompute through; large ones are where remat pays. Combine
  with ``&``, e.g. ``dots_saveable() & save_by_size(max_bytes=2**20)``.

  Attributes:
    min_bytes: smallest output to save.
    max_bytes: largest output to save; None for no limit.
  """

  min_bytes: int = 0
  max_bytes: int | None = None

  def __post_init__(self):
    for field in ("min_bytes", "max_bytes"):
      v = getattr(self, field)
      if v is None and field == "max_bytes":
        continue
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"`SaveBySize`: `{field}` must be an int >= 0, got {v!r}.")
    if self.max_bytes is not None and self.max_bytes < self.min_bytes:
      raise ValueError(
          f"`SaveBySize`: `max_bytes`={self.max_bytes} is below "
          f"`min_bytes`={self.min_bytes}; swap them.")

  def decide(self, prim, avals, params):
    if _compat.checkpoint_name_of(prim, params) is not None:
      return _compat.Recompute  # the tag's input is judged instead
    try:
      n = _out_bytes(prim, avals, params)
    except Exception:  # noqa: BLE001 - a primitive we cannot size is not saved
      return _compat.Recompute
    if n < self.min_bytes or (self.max_bytes is not None and n > self.max_bytes):
      return _compat.Recompute
    return _compat.Saveable


@dataclasses.dataclass(frozen=True)
class CallablePolicy(Policy):
  """Wraps a plain ``policy(prim, *avals, **params)`` function.

  `jax_remat3` ignores plain callables; wrapped, it still applies (through
  JAX's classic remat). The function must be hashable (a module-level def).
  """

  fn: Callable[..., Any]

  def decide(self, prim, avals, params):
    return _compat.ensure_enum(self.fn(prim, *avals, **params))


# --------------------------------------------------------------------------
# Combinators
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Offload(Policy):
  """Offloads to host what ``policy`` would save, instead of keeping it."""

  policy: Policy
  src: str = DEFAULT_OFFLOAD_SRC
  dst: str = DEFAULT_OFFLOAD_DST

  def decide(self, prim, avals, params):
    d = self.policy.decide(prim, avals, params)
    if d is _compat.Recompute:
      return d
    return _compat.Offloadable(src=self.src, dst=self.dst)

  def referenced_names(self):
    return self.policy.referenced_names()

  def referenced_primitives(self):
    return self.policy.referenced_primitives()

  def excluded_names(self):
    return self.policy.excluded_names()

  def with_producers(self, producers):
    return dataclasses.replace(self, policy=self.policy.with_producers(producers))

  def native(self):
    if (self.policy == SaveDots(no_batch_dims=True)
        and _compat.JaxOffloadDotWithNoBatchDims is not None):
      return _compat.JaxOffloadDotWithNoBatchDims(self.src, self.dst)
    if isinstance(self.policy, SaveNames):
      return OffloadNames(self.policy.names, self.src, self.dst).native()
    return None


def _flatten(kind: type, policies: Iterable[Policy]) -> tuple[Policy, ...]:
  out: list[Policy] = []
  for p in policies:
    out.extend(p.policies if isinstance(p, kind) else (p,))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Union(Policy):
  """Saves a value if any policy saves it; else offloads if any offloads it."""

  policies: tuple[Policy, ...]

  def decide(self, prim, avals, params):
    offload = None
    for p in self.policies:
      d = p.decide(prim, avals, params)
      if d is _compat.Saveable:
        return d
      if offload is None and isinstance(d, _compat.Offloadable):
        offload = d
    return offload if offload is not None else _compat.Recompute

  def referenced_names(self):
    return frozenset().union(*(p.referenced_names() for p in self.policies))

  def referenced_primitives(self):
    return frozenset().union(*(p.referenced_primitives() for p in self.policies))

  def excluded_names(self):
    return frozenset().union(*(p.excluded_names() for p in self.policies))

  def with_producers(self, producers):
    return dataclasses.replace(
        self, policies=tuple(p.with_producers(producers) for p in self.policies))


@dataclasses.dataclass(frozen=True)
class Intersection(Policy):
  """Keeps a value only if every policy keeps it (offloads if any offloads)."""

  policies: tuple[Policy, ...]

  def decide(self, prim, avals, params):
    offload = None
    for p in self.policies:
      d = p.decide(prim, avals, params)
      if d is _compat.Recompute:
        return d
      if offload is None and isinstance(d, _compat.Offloadable):
        offload = d
    return offload if offload is not None else _compat.Saveable

  def referenced_names(self):
    return frozenset().union(*(p.referenced_names() for p in self.policies))

  def referenced_primitives(self):
    return frozenset().union(*(p.referenced_primitives() for p in self.policies))

  def excluded_names(self):
    return frozenset().union(*(p.excluded_names() for p in self.policies))

  def with_producers(self, producers):
    return dataclasses.replace(
        self, policies=tuple(p.with_producers(producers) for p in self.policies))


# --------------------------------------------------------------------------
# Factories (JAX's vocabulary)
# --------------------------------------------------------------------------


def everything_saveable() -> SaveEverything:
  """Save everything: no remat."""
  return SaveEverything()


def nothing_saveable() -> SaveNothing:
  """Save nothing: full remat."""
  return SaveNothing()


def dots_saveable() -> SaveDots:
  """Save matmul and convolution outputs; recompute the rest."""
  return SaveDots(no_batch_dims=False)


def dots_with_no_batch_dims_saveable() -> SaveDots:
  """Save matmuls without batch dimensions (projections); recompute the rest."""
  return SaveDots(no_batch_dims=True)


def save_only_these_names(*names: str) -> SaveNames:
  """Save only the values tagged with these names."""
  return SaveNames(names)


def offload_these_names(*names: str, src: str = DEFAULT_OFFLOAD_SRC,
                        dst: str = DEFAULT_OFFLOAD_DST) -> OffloadNames:
  """Offload the values tagged with these names to host memory."""
  return OffloadNames(names, src, dst)


def save_any_names_but_these(*names: str) -> SaveAnyNamesBut:
  """Save every named value except these names; recompute unnamed values."""
  return SaveAnyNamesBut(names)


def save_anything_except_these_names(*names: str) -> SaveAnythingExcept:
  """Save everything except the values tagged with these names."""
  return SaveAnythingExcept(names)


def save_these_primitives(*primitives: str) -> SavePrimitives:
  """Save the outputs of these primitives (by name, e.g. ``"dot_general"``)."""
  return SavePrimitives(primitives)


def save_by_size(*, min_bytes: int = 0, max_bytes: int | None = None) -> SaveBySize:
  """Save op outputs whose size in bytes lies in ``[min_bytes, max_bytes]``."""
  return SaveBySize(min_bytes, max_bytes)


def offload(policy: Any, *, src: str = DEFAULT_OFFLOAD_SRC,
            dst: str = DEFAULT_OFFLOAD_DST) -> Offload:
  """Offload to host what ``policy`` would save."""
  return Offload(from_config(policy), src, dst)


def save_from_both_policies(policy_1: Any, policy_2: Any) -> Union:
  """Logical OR of two policies (JAX's name for it)."""
  return save_from_all_policies(policy_1, policy_2)


def save_from_all_policies(*policies: Any) -> Union:
  """Save a value if any of the policies saves it."""
  if not policies:
    raise ValueError("`save_from_all_policies` needs at least one policy.")
  return Union(_flatten(Union, [from_config(p) for p in policies]))


def save_if_all_policies_save(*policies: Any) -> Intersection:
  """Save a value only if every policy saves it."""
  if not policies:
    raise ValueError("`save_if_all_policies_save` needs at least one policy.")
  return Intersection(_flatten(Intersection, [from_config(p) for p in policies]))


# --------------------------------------------------------------------------
# Registry and config
# --------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[[], Policy]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register(name: str, factory: Callable[[], Policy], description: str = "") -> None:
  """Adds a preset to the registry that :func:`from_config` reads.

  Args:
    name: the config string, e.g. ``"save_qkv"``.
    factory: a zero-argument callable returning a policy.
    description: one line on what it saves, shown by :func:`registered`.

  Raises:
    ValueError: if ``name`` is taken or not a valid preset name.
  """
  if not isinstance(name, str) or not name or any(c in name for c in "|&:,* "):
    raise ValueError(
        f"`register`: `name` must be a non-empty str without '|&:,* ', got {name!r}.")
  if name in _REGISTRY:
    raise ValueError(f"`register`: preset {name!r} already exists; pick another name.")
  _REGISTRY[name] = factory
  _DESCRIPTIONS[name] = description


def registered() -> dict[str, str]:
  """The preset names and what each saves."""
  return dict(_DESCRIPTIONS)


_T = "transformer names: qkv, attn_scores, attn_probs, attn_out, mlp_hidden, mlp_out"

for _name, _factory, _desc in [
    ("full", SaveNothing, "full remat: save only inputs, recompute everything"),
    ("nothing_saveable", SaveNothing, "alias of 'full'"),
    ("none", SaveEverything, "no remat: save every intermediate"),
    ("everything_saveable", SaveEverything, "alias of 'none'"),
    ("save_dots", lambda: SaveDots(False), "save matmul/conv outputs"),
    ("dots_saveable", lambda: SaveDots(False), "alias of 'save_dots'"),
    ("save_dots_no_batch", lambda: SaveDots(True),
     "save matmuls without batch dims (projections, not attention scores)"),
    ("dots_with_no_batch_dims_saveable", lambda: SaveDots(True), "alias of 'save_dots_no_batch'"),
    ("minimal", lambda: SaveDots(True), "MaxText's 'minimal': alias of 'save_dots_no_batch'"),
    ("save_qkv", lambda: SaveNames(("qkv",)), f"save the qkv projection ({_T})"),
    ("save_attn_out", lambda: SaveNames(("attn_out",)), "save the attention output"),
    ("save_qkv_attn_out", lambda: SaveNames(("qkv", "attn_out")),
     "save qkv and attention output"),
    ("save_attn_probs", lambda: SaveNames(("attn_probs",)), "save the attention probabilities"),
    ("save_mlp_hidden", lambda: SaveNames(("mlp_hidden",)), "save the MLP hidden activation"),
    ("save_block_io", lambda: SaveNames(("attn_out", "mlp_out")),
     "save the attention and MLP outputs"),
    ("save_all_but_attn_probs", lambda: SaveAnythingExcept(("attn_probs",)),
     "save everything except the attention probabilities"),
    ("offload_dots", lambda: Offload(SaveDots(True)),
     "offload matmuls without batch dims to pinned host memory"),
    ("offload_qkv", lambda: OffloadNames(("qkv",)), "offload qkv to pinned host memory"),
]:
  register(_name, _factory, _desc)

_PREFIXES: dict[str, Callable[[tuple[str, ...]], Policy]] = {
    "save": lambda ns: SaveNames(ns),
    "offload": lambda ns: OffloadNames(ns),
    "except": lambda ns: SaveAnythingExcept(ns),
    "names_but": lambda ns: SaveAnyNamesBut(ns),
    "prims": lambda ns: SavePrimitives(ns),
}


def _choices() -> str:
  presets = ", ".join(repr(n) for n in sorted(_REGISTRY))
  prefixes = ", ".join(f"'{p}:<name>,...'" for p in _PREFIXES)
  return (f"presets: {presets}; forms: {prefixes}; combine with '|' (union) or "
          "'&' (intersection); a bool; None; a dict of name -> "
          "'save'|'offload'|'recompute'; or a Policy")


def _from_string(s: str) -> Policy:
  text = s.strip()
  if "|" in text:
    return save_from_all_policies(*[_from_string(t) for t in text.split("|")])
  if "&" in text:
    return save_if_all_policies_save(*[_from_string(t) for t in text.split("&")])
  if ":" in text:
    prefix, _, rest = text.partition(":")
    prefix = prefix.strip()
    names = tuple(n.strip() for n in rest.split(",") if n.strip())
    if prefix not in _PREFIXES:
      raise ValueError(
          f"`from_config`: unknown prefix {prefix!r} in {s!r}. Valid: {_choices()}.")
    if not names:
      raise ValueError(f"`from_config`: {s!r} names no tensors after '{prefix}:'.")
    return _PREFIXES[prefix](names)
  if text in _REGISTRY:
    return _REGISTRY[text]()
  import difflib

  close = difflib.get_close_matches(text, list(_REGISTRY), n=3)
  hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
  raise ValueError(f"`from_config`: unknown policy {s!r}.{hint} Valid: {_choices()}.")


def _from_dict(d: Mapping[Any, Any]) -> Policy:
  save, off, rec = [], [], []
  default = "recompute"
  for k, v in d.items():
    if not isinstance(k, str):
      raise TypeError(f"`from_config`: dict keys must be tensor names (str), got {k!r}.")
    if v not in _ACTIONS:
      raise ValueError(
          f"`from_config`: {k!r} maps to {v!r}; each value must be one of "
          f"{list(_ACTIONS)}.")
    if k == "*":
      default = v
      continue
    {"save": save, "offload": off, "recompute": rec}[v].append(k)
  if default == "recompute":
    return NamePlan(tuple(save), tuple(off))
  if default == "save":
    if not rec and not off:
      return SaveEverything()
    p: Policy = SaveAnythingExcept(tuple(rec + off))
    return Union((p, OffloadNames(tuple(off)))) if off else p
  raise ValueError(
      "`from_config`: '*': 'offload' would offload every intermediate; name the "
      "tensors to offload instead, with '*': 'recompute' or 'save'.")


def from_config(value: Any) -> Policy:
  """Builds a policy from a config value.

  Args:
    value: one of
      * a :class:`Policy` (returned as is), or one of JAX's policy functions
        and classes (translated);
      * ``True`` or ``None``: full remat; ``False``: no remat;
      * a preset name (see :func:`registered`), a form such as
        ``"save:qkv,attn_out"``, ``"offload:mlp_hidden"``, ``"except:attn_probs"``,
        ``"prims:dot_general,exp"``, or any of these joined with ``|`` / ``&``;
      * a dict mapping tensor names to ``"save"``, ``"offload"`` or
        ``"recompute"``, with ``"*"`` for everything else.

  Returns:
    A hashable policy, valid for ``jax.checkpoint``.

  Raises:
    ValueError: for an unknown string or action; the message lists the choices.
    TypeError: for a value of an unsupported type.

  Example:
    >>> from remat_kit.policies import from_config
    >>> from_config({"attn_out": "save", "mlp_hidden": "offload", "*": "recompute"})
    NamePlan(save=('attn_out',), offload=('mlp_hidden',), src='device', dst='pinned_host')
    >>> from_config("save_dots_no_batch | save:qkv")
    Union(policies=(SaveDots(no_batch_dims=True), SaveNames(names=('qkv',))))
  """
  if isinstance(value, Policy):
    return value
  if value is None or value is True:
    return SaveNothing()
  if value is False:
    return SaveEverything()
  if isinstance(value, str):
    return _from_string(value)
  if isinstance(value, Mapping):
    return _from_dict(value)
  jax_policy = _from_jax_policy(value)
  if jax_policy is not None:
    return jax_policy
  if callable(value):
    try:
      hash(value)
    except TypeError:
      raise TypeError(
          f"`from_config`: callable policy {value!r} is not hashable; jit caches "
          "by policy, so define it as a module-level function or frozen dataclass."
      ) from None
    return CallablePolicy(value)
  raise TypeError(f"`from_config`: cannot build a policy from {value!r}. Valid: {_choices()}.")


def _from_jax_policy(value: Any) -> Policy | None:
  """Translates JAX's own policy objects, so they behave under remat3 too."""
  import jax

  cp = jax.checkpoint_policies
  if value is cp.everything_saveable:
    return SaveEverything()
  if value is cp.nothing_saveable:
    return SaveNothing()
  if isinstance(value, _compat.JaxDotsSaveable):
    return SaveDots(value.only_if_no_batch_dims)
  if isinstance(value, _compat.JaxSaveOnlyTheseNames):
    return SaveNames(tuple(value.saveable_names))
  if (_compat.JaxSaveAndOffloadOnlyTheseNames is not None
      and isinstance(value, _compat.JaxSaveAndOffloadOnlyTheseNames)):
    return NamePlan(tuple(value.names_which_can_be_saved),
                    tuple(value.names_which_can_be_offloaded),
                    value.offload_src, value.offload_dst)
  if isinstance(value, _compat.JaxSaveAnyNamesButThese):
    return SaveAnyNamesBut(tuple(value.names))
  return None
