"""Walking jaxprs: the names, primitives and producers a function uses.

Private helpers shared by `transforms` and `report`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jax._src import core as _core

from remat_kit import _compat

Jaxpr = _core.Jaxpr
ClosedJaxpr = _core.ClosedJaxpr
Literal = _core.Literal
Var = _core.Var


def sub_jaxprs(params: dict[str, Any]) -> Iterator[Jaxpr]:
  """The jaxprs nested in an equation's parameters (scan, cond, jit, remat)."""
  for v in params.values():
    vals = v if isinstance(v, (list, tuple)) else (v,)
    for x in vals:
      if isinstance(x, ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, Jaxpr):
        yield x


def inner_jaxpr_of_hi(params: dict[str, Any]) -> Jaxpr | None:
  """The jaxpr of a remat3 `RematTraced` hi-primitive, if that is what this is."""
  prim = params.get("_prim")
  inner = getattr(prim, "params", None)
  if isinstance(inner, dict):
    j = inner.get("jaxpr")
    if isinstance(j, ClosedJaxpr):
      return j.jaxpr
    if isinstance(j, Jaxpr):
      return j
  return None


def walk(jaxpr: Jaxpr) -> Iterator[Any]:
  """Every equation of ``jaxpr`` and of the jaxprs nested in it."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in sub_jaxprs(eqn.params):
      yield from walk(sub)
    hi = inner_jaxpr_of_hi(eqn.params)
    if hi is not None:
      yield from walk(hi)


def tags_and_primitives(closed: ClosedJaxpr) -> tuple[frozenset[str], frozenset[str]]:
  """The `checkpoint_name` tags and the primitive names that ``closed`` uses."""
  names, prims = set(), set()
  for eqn in walk(closed.jaxpr):
    n = _compat.checkpoint_name_of(eqn.primitive, eqn.params)
    if n is not None:
      names.add(n)
    prims.add(eqn.primitive.name)
  return frozenset(names), frozenset(prims)


def aval_key(aval: Any) -> tuple[Any, str]:
  """Shape and dtype of an abstract value, ignoring weak types and sharding."""
  return (tuple(getattr(aval, "shape", ())), str(getattr(aval, "dtype", "")))


def producer_signatures(closed: ClosedJaxpr, names: frozenset[str]
                        ) -> frozenset[tuple[Any, ...]]:
  """(primitive name, input shapes) of each op whose output is tagged in ``names``.

  Searches nested jaxprs too. A tagged value that is a function input has no
  producer and adds nothing.
  """
  sigs = set()

  def visit(jaxpr: Jaxpr) -> None:
    producer = {}
    for eqn in jaxpr.eqns:
      for v in eqn.outvars:
        producer[v] = eqn
      n = _compat.checkpoint_name_of(eqn.primitive, eqn.params)
      if n is not None and n in names:
        for v in eqn.invars:
          src = producer.get(v) if isinstance(v, Var) else None
          if src is not None:
            sigs.add((src.primitive.name, tuple(aval_key(x.aval) for x in src.invars)))
      for sub in sub_jaxprs(eqn.params):
        visit(sub)
      hi = inner_jaxpr_of_hi(eqn.params)
      if hi is not None:
        visit(hi)

  visit(closed.jaxpr)
  return frozenset(sigs)
