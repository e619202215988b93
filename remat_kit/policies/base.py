"""The policy protocol and its combinators: `Policy`, `Union`, `Intersection`, `Offload`.

A policy decides, for each intermediate value of a checkpointed function,
whether the forward pass **saves** it, **offloads** it to host memory, or lets
the backward pass **recompute** it. Calling a policy as ``jax.checkpoint``
does (primitive, input avals, equation parameters) returns ``True``/``False``
or JAX's ``Offloadable``, so every policy is a valid ``jax.checkpoint`` policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

from remat_kit import _jax

__all__ = ["Intersection", "Offload", "Policy", "Union", "DEFAULT_OFFLOAD_DST",
           "DEFAULT_OFFLOAD_SRC"]

Decision = Any  # _jax.Saveable | _jax.Recompute | _jax.Offloadable
DEFAULT_OFFLOAD_SRC = "device"
DEFAULT_OFFLOAD_DST = "pinned_host"

def as_policy(value: Any, op: str = "|") -> Policy:
  """``value`` itself if it is a policy; anything else is a ``TypeError`` naming the fix
  (``from_config`` converts strings, dicts and JAX's policies)."""
  if isinstance(value, Policy):
    return value
  raise TypeError(
      f"`{op}` composes remat_kit policies; got {value!r}. Convert it first with "
      f"`remat_kit.policies.from_config({value!r})`, or write the whole policy as one "
      f"config string, e.g. from_config(\"save_dots {op} save:attn_out\").")


def names_arg(names: Iterable[str], api: str) -> tuple[str, ...]:
  """Validates and sorts a collection of `checkpoint_name` tags."""
  if isinstance(names, str):
    names = (names,)
  if not isinstance(names, Iterable):
    raise TypeError(f"`{api}`: `names` must be a str or a sequence of str, got {names!r}. "
                    "Pass the strings you gave to `checkpoint_name`.")
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

  Subclasses implement :meth:`decide`. Composite policies list their parts in
  :meth:`children`; the introspection methods then combine the parts' answers,
  so a combinator is written once.
  """

  def decide(self, prim: Any, avals: tuple[Any, ...], params: dict[str, Any]) -> Decision:
    """What to do with the output of one equation of the checkpointed function.

    Args:
      prim: the equation's primitive (``checkpoint_name``'s for a tag).
      avals: the abstract values of its inputs.
      params: its parameters (a tag's name, a matmul's dimension numbers, ...).

    Returns:
      JAX's ``Saveable``, ``Recompute`` or an ``Offloadable(src, dst)``; calling
      the policy turns the first two into ``True``/``False``.
    """
    raise NotImplementedError

  def __call__(self, prim: Any, *avals: Any, **params: Any) -> Any:
    d = self.decide(prim, avals, params)
    if d is _jax.Saveable:
      return True
    if d is _jax.Recompute:
      return False
    return d  # Offloadable

  # Composition -------------------------------------------------------------
  def __or__(self, other: Any) -> Union:
    return Union.of(self, as_policy(other))

  def __ror__(self, other: Any) -> Union:
    return Union.of(as_policy(other), self)

  def __and__(self, other: Any) -> Intersection:
    return Intersection.of(self, as_policy(other, "&"))

  def __rand__(self, other: Any) -> Intersection:
    return Intersection.of(as_policy(other, "&"), self)

  # Introspection -----------------------------------------------------------
  def children(self) -> tuple[Policy, ...]:
    """The policies this one is built from (none for a leaf)."""
    return ()

  def own_names(self) -> frozenset[str]:
    """The `checkpoint_name` tags this policy itself (not its parts) refers to."""
    return frozenset()

  def referenced_names(self) -> frozenset[str]:
    """The `checkpoint_name` tags this policy refers to."""
    return self.own_names().union(*(c.referenced_names() for c in self.children()))

  def referenced_primitives(self) -> frozenset[str]:
    """The primitive names this policy refers to."""
    return frozenset().union(*(c.referenced_primitives() for c in self.children()))

  def checked_primitives(self) -> frozenset[str]:
    """The primitives the trace-time check requires the function to use: those this
    policy refers to, less ``dot_general`` (a matmul policy applies to any function,
    whether it has matmuls or not)."""
    return self.referenced_primitives() - {"dot_general"}

  def saving_primitives(self) -> frozenset[str] | None:
    """The primitives at whose outputs this policy may save or offload; None for any.

    A tag counts as the primitive ``checkpoint_name`` binds (``"name"``). Where
    every such primitive is one at which ``jax_remat3`` consults a callable
    policy (:func:`remat_kit._jax.remat3_consulted`), the policy runs on
    remat3 as it is; otherwise remat_kit runs it on JAX's classic remat.
    """
    return None

  @property
  def offloads(self) -> bool:
    """Whether this policy may move values to host memory (an offload somewhere in it)."""
    return any(c.offloads for c in self.children())

  def excluded_names(self) -> frozenset[str]:
    """Names whose producers must be recomputed (see `SaveAnythingExcept`)."""
    return frozenset().union(*(c.excluded_names() for c in self.children()))

  def with_producers(self, producers: frozenset[tuple[Any, ...]]) -> Policy:
    """This policy with the producers of its excluded names filled in.

    Args:
      producers: ``(primitive name, input shapes and dtypes)`` signatures of the ops that
        produce the tensors its :meth:`excluded_names` tag, as
        :func:`remat_kit.remat` reads them from the traced function.
    """
    kids = self.children()
    if not kids:
      return self
    return self.with_children(tuple(c.with_producers(producers) for c in kids))

  def with_children(self, children: tuple[Policy, ...]) -> Policy:
    """This composite with its parts replaced.

    Args:
      children: the new parts, in the order of :meth:`children`.
    """
    raise NotImplementedError  # pragma: no cover - leaves have no children


@dataclasses.dataclass(frozen=True)
class Offload(Policy):
  """Offloads to host what ``policy`` would save, instead of keeping it.

  Saves: nothing on the device of what ``policy`` keeps; it goes to ``dst``
  memory. Recomputes: what ``policy`` recomputes, no more: the device memory
  of ``policy``'s saved tensors is traded for host memory and a copy each way
  over the host link.

  Attributes:
    policy: the policy whose saved (or offloaded) values are offloaded.
    src: the memory kind the values live in (``"device"``).
    dst: the memory kind to offload to (``"pinned_host"``).
  """

  policy: Policy
  src: str = DEFAULT_OFFLOAD_SRC
  dst: str = DEFAULT_OFFLOAD_DST

  def decide(self, prim, avals, params):
    d = self.policy.decide(prim, avals, params)
    if d is _jax.Recompute:
      return d
    return _jax.Offloadable(src=self.src, dst=self.dst)

  def children(self):
    return (self.policy,)

  @property
  def offloads(self) -> bool:
    return True

  def saving_primitives(self):
    return self.policy.saving_primitives()

  def with_children(self, children):
    return dataclasses.replace(self, policy=children[0])


def _flatten(kind: type[_Combination], policies: Iterable[Policy]) -> tuple[Policy, ...]:
  out: list[Policy] = []
  for p in policies:
    out.extend(p.policies if isinstance(p, kind) else (p,))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class _Combination(Policy):
  policies: tuple[Policy, ...]

  @classmethod
  def of(cls, *policies: Policy) -> Any:
    """The combination of ``policies``: nested combinations of the same kind flattened,
    duplicates dropped, children in a canonical order (by ``repr``), so that ``a | b``
    equals ``b | a`` and hashes alike (one jit cache entry).

    Args:
      *policies: the policies to combine (remat_kit policies; ``|`` and ``&``
        convert other values first).
    """
    return cls(tuple(sorted(set(_flatten(cls, policies)), key=repr)))

  def children(self):
    return self.policies

  def with_children(self, children):
    return dataclasses.replace(self, policies=children)

  # The decision that settles the combination at once, and the one without it.
  _decisive: ClassVar[Any] = None
  _otherwise: ClassVar[Any] = None

  def decide(self, prim, avals, params):
    offload = None
    for p in self.policies:
      d = p.decide(prim, avals, params)
      if d is self._decisive:
        return d
      if offload is None and isinstance(d, _jax.Offloadable):
        offload = d
    return offload if offload is not None else self._otherwise


@dataclasses.dataclass(frozen=True)
class Union(_Combination):
  """Saves a value if any policy saves it; else offloads if any offloads it.

  Saves: everything any part saves: at least the memory of its largest part,
  at most the parts' sum. Recomputes: only what every part recomputes, so no
  more than its cheapest part.

  Attributes:
    policies: the parts, in canonical order (build it with ``|`` or
      :meth:`of`).
  """

  _decisive = _jax.Saveable
  _otherwise = _jax.Recompute

  def saving_primitives(self):
    parts = [p.saving_primitives() for p in self.policies]
    return None if any(x is None for x in parts) else frozenset().union(*parts)


@dataclasses.dataclass(frozen=True)
class Intersection(_Combination):
  """Keeps a value only if every policy keeps it (offloads if any offloads).

  Saves: only what every part keeps: at most the memory of its smallest part.
  Recomputes: everything any part recomputes, so at least as much as its
  dearest part.

  Attributes:
    policies: the parts, in canonical order (build it with ``&`` or
      :meth:`of`).
  """

  _decisive = _jax.Recompute
  _otherwise = _jax.Saveable

  def saving_primitives(self):
    known = [x for p in self.policies if (x := p.saving_primitives()) is not None]
    return frozenset.intersection(*known) if known else None
