"""Jaxpr facts: tags, primitives, producers, remat equations and their bodies.

Shared by `transforms`, `flax` and `report`; it reads jaxprs only through
:mod:`remat_kit._jax`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax

from remat_kit import _jax

Jaxpr = _jax.Jaxpr
ClosedJaxpr = _jax.ClosedJaxpr
Literal = _jax.Literal
Var = _jax.Var


def sub_jaxprs(params: dict[str, Any]) -> Iterator[Jaxpr]:
  """The jaxprs nested in an equation's parameters (scan, cond, jit, remat)."""
  for v in params.values():
    vals = v if isinstance(v, (list, tuple)) else (v,)
    for x in vals:
      if isinstance(x, ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, Jaxpr):
        yield x


inner_jaxpr_of_hi = _jax.hi_inner_jaxpr
is_remat = _jax.is_remat


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
    n = _jax.checkpoint_name_of(eqn.primitive, eqn.params)
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
      n = _jax.checkpoint_name_of(eqn.primitive, eqn.params)
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


# --------------------------------------------------------------------------
# Remat equations
# --------------------------------------------------------------------------


def remat_body(eqn: Any) -> tuple[Jaxpr, list[Any]]:
  """The body jaxpr of a remat equation and its constants."""
  j = _jax.remat_params(eqn)["jaxpr"]
  if isinstance(j, ClosedJaxpr):
    return j.jaxpr, list(j.consts)
  return j, []


def policy_of(eqn: Any) -> Any:
  """The policy a remat equation carries (None for full remat), either implementation."""
  return _jax.remat_params(eqn).get("policy")


def has_remat(jaxpr: Jaxpr) -> bool:
  """Whether ``jaxpr`` (or a jaxpr nested in it) has a remat boundary."""
  return any(is_remat(e) for e in walk(jaxpr))


def remat_sites(jaxpr: Jaxpr) -> Iterator[tuple[Any, int]]:
  """Every remat equation under ``jaxpr`` with the product of the scan trip counts around it."""

  def visit(j: Jaxpr, layers: int) -> Iterator[tuple[Any, int]]:
    for eqn in j.eqns:
      if is_remat(eqn):
        yield eqn, layers
      inner = layers * eqn.params["length"] if eqn.primitive.name == "scan" else layers
      for sub in sub_jaxprs(eqn.params):
        yield from visit(sub, inner)
      hi = inner_jaxpr_of_hi(eqn.params)
      if hi is not None:
        yield from visit(hi, inner)

  yield from visit(jaxpr, 1)


def _inline_closed(cj: ClosedJaxpr, full: bool) -> ClosedJaxpr:
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in cj.in_avals]
  return jax.make_jaxpr(lambda *xs: eval_inlined(cj.jaxpr, cj.consts, *xs, full=full))(*avals)


def eval_inlined(jaxpr: Jaxpr, consts: Sequence[Any], *args: Any, full: bool = False
                 ) -> list[Any]:
  """Evaluates ``jaxpr`` with every remat boundary inlined (its body run as is).

  With ``full``, each remat boundary is kept but its policy becomes full remat.
  Remat inside scans, conds and jits is reached by rewriting their bodies.
  """
  env: dict[Any, Any] = {}
  read = lambda v: v.val if isinstance(v, Literal) else env[v]
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if is_remat(eqn):
      body, body_consts = remat_body(eqn)
      run = lambda *xs, body=body, c=body_consts: eval_inlined(body, c, *xs, full=full)
      outs = jax.checkpoint(run, policy=None)(*invals) if full else run(*invals)
    else:
      params = eqn.primitive.get_bind_params(eqn.params)
      if any(has_remat(sub) for sub in sub_jaxprs(eqn.params)):
        params = dict(params)
        for k, val in params.items():
          if isinstance(val, ClosedJaxpr):
            params[k] = _inline_closed(val, full)
          elif isinstance(val, (tuple, list)) and val and isinstance(val[0], ClosedJaxpr):
            params[k] = type(val)(_inline_closed(c, full) for c in val)
          elif isinstance(val, Jaxpr) and has_remat(val):
            raise ValueError(
                f"`without_remat`: cannot inline remat inside a `{eqn.primitive.name}`.")
      outs = eqn.primitive.bind(*invals, **params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]
