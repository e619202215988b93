"""Jaxpr facts: tags, primitives, producers, remat equations and their bodies.

Shared by `transforms`, `flax` and `report`; it reads jaxprs only through
:mod:`remat_kit._jax`.
"""

from __future__ import annotations

import contextlib
import re
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


def _inline_closed(cj: ClosedJaxpr, full: bool, marks: Marks | None) -> ClosedJaxpr:
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in cj.in_avals]
  return jax.make_jaxpr(
      lambda *xs: eval_inlined(cj.jaxpr, cj.consts, *xs, full=full, marks=marks))(*avals)


class Marks:
  """Scope labels that let compiled ops be traced back to remat sites and names.

  :func:`eval_inlined` with ``marks`` re-binds every remat boundary as it was
  (same policy, same implementation) with its body under the named scope
  ``rks<i>`` (``i`` its index in :func:`remat_sites` order), and every op whose
  output is tagged by `checkpoint_name` under ``rkn<k>``. The scopes reach the
  jaxpr's ``name_stack`` and the HLO ``op_name`` metadata and change nothing
  else.
  """

  SITE = re.compile(r"\brks(\d+)\b")
  NAME = re.compile(r"\brkn(\d+)\b")

  def __init__(self, jaxpr: Jaxpr):
    self.sites = {id(e): i for i, (e, _) in enumerate(remat_sites(jaxpr))}
    self.names: list[tuple[str, str]] = []  # (checkpoint name, primitive that made it)

  def name_scope(self, name: str, primitive: str) -> str:
    if (name, primitive) not in self.names:
      self.names.append((name, primitive))
    return f"rkn{self.names.index((name, primitive))}"

  def site_of(self, text: str) -> int | None:
    """The innermost remat site a name stack or op_name lies in."""
    found = self.SITE.findall(text)
    return int(found[-1]) if found else None

  def name_of(self, text: str, primitive: str) -> str | None:
    """The `checkpoint_name` of a ``primitive`` op with this name stack or op_name.

    Only the op that made the tagged value counts: the other ops in its scope
    (its derivative's, say) are not the tagged tensor.
    """
    found = self.NAME.findall(text)
    if not found:
      return None
    name, prim = self.names[int(found[-1])]
    return name if prim == primitive else None


def eval_inlined(jaxpr: Jaxpr, consts: Sequence[Any], *args: Any, full: bool = False,
                 marks: Marks | None = None) -> list[Any]:
  """Evaluates ``jaxpr`` with every remat boundary inlined (its body run as is).

  With ``full``, each remat boundary is kept but its policy becomes full remat.
  With ``marks``, each is kept as it was, and labelled (see :class:`Marks`).
  Remat inside scans, conds and jits is reached by rewriting their bodies.
  """
  env: dict[Any, Any] = {}
  read = lambda v: v.val if isinstance(v, Literal) else env[v]
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  tagged = {}
  if marks is not None:
    for eqn in jaxpr.eqns:
      n = _jax.checkpoint_name_of(eqn.primitive, eqn.params)
      if n is not None:
        tagged.update({v: n for v in eqn.invars if isinstance(v, Var)})
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = next((tagged[v] for v in eqn.outvars if v in tagged), None)
    scope = marks.name_scope(name, eqn.primitive.name) if name else None
    with _jax.eqn_context(eqn), (
        jax.named_scope(scope) if scope else contextlib.nullcontext()):
      outs = _eval_eqn(eqn, invals, full, marks)
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _eval_eqn(eqn: Any, invals: list[Any], full: bool, marks: Marks | None) -> Any:
  if is_remat(eqn):
    body, body_consts = remat_body(eqn)
    run = lambda *xs: eval_inlined(body, body_consts, *xs, full=full, marks=marks)
    if full:
      return jax.checkpoint(run, policy=None)(*invals)
    if marks is None:
      return run(*invals)
    site = marks.sites.get(id(eqn))

    def scoped(*xs: Any) -> Any:
      with jax.named_scope(f"rks{site}") if site is not None else contextlib.nullcontext():
        return run(*xs)

    params = _jax.remat_params(eqn)
    with _jax.remat3(_jax.remat_uses_remat3(eqn)):
      ck = jax.checkpoint(scoped, policy=params.get("policy"),
                          prevent_cse=params.get("prevent_cse", True))
      return ck(*invals)
  params = eqn.primitive.get_bind_params(eqn.params)
  if any(has_remat(sub) or (marks is not None and _has_names(sub))
         for sub in sub_jaxprs(eqn.params)):
    params = dict(params)
    for k, val in params.items():
      if isinstance(val, ClosedJaxpr):
        params[k] = _inline_closed(val, full, marks)
      elif isinstance(val, (tuple, list)) and val and isinstance(val[0], ClosedJaxpr):
        params[k] = type(val)(_inline_closed(c, full, marks) for c in val)
      elif isinstance(val, Jaxpr) and has_remat(val):
        raise ValueError(
            f"`without_remat`: cannot inline remat inside a `{eqn.primitive.name}`.")
  outs = eqn.primitive.bind(*invals, **params)
  return outs if eqn.primitive.multiple_results else [outs]


def _has_names(jaxpr: Jaxpr) -> bool:
  return any(_jax.checkpoint_name_of(e.primitive, e.params) is not None for e in walk(jaxpr))


def marked(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, Marks, list[Any]]:
  """``fn`` re-expressed so that compiled ops carry :class:`Marks` scopes.

  Returns a function of the flat leaves of ``(args, kwargs)``, its marks and
  those leaves.
  """
  leaves, tree = jax.tree_util.tree_flatten((args, kwargs))

  def flat(*xs: Any) -> Any:
    a, k = jax.tree_util.tree_unflatten(tree, xs)
    return fn(*a, **k)

  closed, out_shape = jax.make_jaxpr(flat, return_shape=True)(*leaves)
  marks = Marks(closed.jaxpr)
  out_tree = jax.tree_util.tree_structure(out_shape)

  def run(*xs: Any) -> Any:
    outs = eval_inlined(closed.jaxpr, closed.consts, *xs, marks=marks)
    return jax.tree_util.tree_unflatten(out_tree, outs)

  return run, marks, leaves
