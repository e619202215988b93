"""Jaxpr facts: tags, primitives, producers, remat equations and their bodies.

Shared by `transforms`, `flax` and `report`; it reads jaxprs only through
:mod:`remat_kit._jax`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax

from remat_kit import _jax

Jaxpr = _jax.Jaxpr
ClosedJaxpr = _jax.ClosedJaxpr
Literal = _jax.Literal
Var = _jax.Var


# --------------------------------------------------------------------------
# Equation layouts: the parameter names of the structured primitives, by JAX version.
# --------------------------------------------------------------------------
def closed_parts(j: Any) -> tuple[Jaxpr, list[Any]]:
  """``(jaxpr, consts)`` of a closed jaxpr (JAX 0.11+: a ``Jaxpr`` that holds its consts)."""
  if isinstance(j, _jax.ClosedJaxpr) and _jax.ClosedJaxpr is not _jax.Jaxpr:
    return j.jaxpr, list(j.consts)
  if isinstance(j, _jax.Jaxpr):
    return j, list(getattr(j, "consts", ()) or ())
  raise _jax.unknown("this jaxpr type", "a ClosedJaxpr or Jaxpr", type(j).__name__)


def as_open(j: Any) -> Jaxpr:
  """The jaxpr of a closed or open jaxpr."""
  return closed_parts(j)[0]


def _require(eqn: Any, *keys: str) -> dict[str, Any]:
  params = eqn.params
  missing = [k for k in keys if k not in params]
  if missing:
    raise _jax.unknown(f"the layout of `{eqn.primitive.name}` equations",
                   f"parameters {list(keys)}", f"parameters {sorted(params)}")
  return params


class ScanLayout(NamedTuple):
  """A ``scan`` equation: ``invars = consts + carry + xs``, ``outvars = carry + ys``."""

  length: int
  num_consts: int
  num_carry: int
  body: Jaxpr
  body_consts: list[Any]


def scan_layout(eqn: Any) -> ScanLayout:
  """The layout of a ``scan`` equation (``num_consts``/``num_carry`` up to JAX 0.10,
  the ``ft_in`` flat tree of (consts, carry, xs) from 0.11)."""
  params = eqn.params
  body, consts = closed_parts(_require(eqn, "length", "jaxpr")["jaxpr"])
  if "num_consts" in params and "num_carry" in params:
    return ScanLayout(params["length"], params["num_consts"], params["num_carry"], body, consts)
  ft_in = params.get("ft_in")
  if ft_in is not None and hasattr(ft_in, "update") and hasattr(ft_in, "unpack"):
    parts = ft_in.update(list(range(len(eqn.invars)))).unpack()
    if len(parts) == 3:
      n_consts, n_carry = len(list(parts[0])), len(list(parts[1]))
      return ScanLayout(params["length"], n_consts, n_carry, body, consts)
  raise _jax.unknown("the layout of `scan` equations",
                 "`num_consts`/`num_carry` or an `ft_in` flat tree of (consts, carry, xs)",
                 f"parameters {sorted(params)}")


class WhileLayout(NamedTuple):
  """A ``while`` equation: ``invars = cond consts + body consts + carry``."""

  cond: Jaxpr
  body: Jaxpr
  cond_nconsts: int
  body_nconsts: int


def while_layout(eqn: Any) -> WhileLayout:
  p = _require(eqn, "cond_jaxpr", "body_jaxpr", "cond_nconsts", "body_nconsts")
  return WhileLayout(as_open(p["cond_jaxpr"]), as_open(p["body_jaxpr"]),
                     p["cond_nconsts"], p["body_nconsts"])


def cond_branches(eqn: Any) -> list[Jaxpr]:
  """The branch jaxprs of a ``cond`` equation."""
  return [as_open(b) for b in _require(eqn, "branches")["branches"]]


# Primitives whose body runs once per application, as a call: (primitive name, parameter).
CALL_BODIES: dict[str, str] = {
    "jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr",
    "remat": "jaxpr",
}


def call_body(eqn: Any) -> Jaxpr | None:
  """The body of a call-like equation (jit, custom rules, remat), or None for others."""
  key = CALL_BODIES.get(eqn.primitive.name)
  if key is None:
    return None
  if key not in eqn.params:
    raise _jax.unknown(f"the layout of `{eqn.primitive.name}` equations", f"a `{key}` parameter",
                   f"parameters {sorted(eqn.params)}")
  return as_open(eqn.params[key])


def is_jit(eqn: Any) -> bool:
  """Whether ``eqn`` is a ``jax.jit`` call (``pjit`` up to JAX 0.6, ``jit`` since)."""
  return eqn.primitive.name in ("jit", "pjit")


def dot_batch_dims(params: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(lhs batch dims, rhs batch dims)`` of a ``dot_general``'s parameters."""
  dn: Any = params.get("dimension_numbers")  # unpacked below; anything else is refused
  try:
    (_, _), (lhs_b, rhs_b) = dn
  except (TypeError, ValueError):
    raise _jax.unknown("the `dot_general` parameters",
                   "`dimension_numbers` = ((lhs contract, rhs contract), (lhs batch, rhs batch))",
                   repr(dn)) from None
  return tuple(lhs_b), tuple(rhs_b)


def dot_contracting_dims(params: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(lhs contracting dims, rhs contracting dims)`` of a ``dot_general``."""
  dn: Any = params.get("dimension_numbers")  # unpacked below; anything else is refused
  try:
    (lc, rc), (_, _) = dn
  except (TypeError, ValueError):
    raise _jax.unknown("the `dot_general` parameters", "`dimension_numbers`", repr(dn)) from None
  return tuple(lc), tuple(rc)


# --------------------------------------------------------------------------
# Walking jaxprs
# --------------------------------------------------------------------------
def sub_jaxprs(params: dict[str, Any]) -> Iterator[Jaxpr]:
  """The jaxprs nested in an equation's parameters (scan, cond, jit, remat)."""
  for v in params.values():
    vals = v if isinstance(v, (list, tuple)) else (v,)
    for x in vals:
      if isinstance(x, (ClosedJaxpr, Jaxpr)):
        yield as_open(x)


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


aval_key = _jax.aval_key


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
        for inv in eqn.invars:
          src = producer.get(inv) if isinstance(inv, Var) else None
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
  return closed_parts(_jax.remat_params(eqn)["jaxpr"])


def policy_of(eqn: Any) -> Any:
  """The policy a remat equation carries (None for full remat), either implementation."""
  return _jax.remat_params(eqn).get("policy")


def has_remat(jaxpr: Jaxpr) -> bool:
  """Whether ``jaxpr`` (or a jaxpr nested in it) has a remat boundary."""
  return any(is_remat(e) for e in walk(jaxpr))


def remat_equations(jaxpr: Jaxpr) -> Iterator[tuple[Any, int]]:
  """Every remat equation under ``jaxpr`` with the product of the scan trip counts around it."""

  def visit(j: Jaxpr, layers: int) -> Iterator[tuple[Any, int]]:
    for eqn in j.eqns:
      if is_remat(eqn):
        yield eqn, layers
      inner = layers * scan_layout(eqn).length if eqn.primitive.name == "scan" else layers
      for sub in sub_jaxprs(eqn.params):
        yield from visit(sub, inner)
      hi = inner_jaxpr_of_hi(eqn.params)
      if hi is not None:
        yield from visit(hi, inner)

  yield from visit(jaxpr, 1)


def _inline_closed(cj: ClosedJaxpr, full: Any, marks: Marks | None) -> ClosedJaxpr:
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in cj.in_avals]
  return jax.make_jaxpr(
      lambda *xs: eval_inlined(cj.jaxpr, cj.consts, *xs, full=full, marks=marks))(*avals)


class Marks:
  """Scope labels that let compiled ops be traced back to remat sites and names.

  :func:`eval_inlined` with ``marks`` re-binds every remat boundary as it was
  (same policy, same implementation) with its body under the named scope
  ``rks<i>`` (``i`` its index in :func:`remat_equations` order), and every op whose
  output is tagged by `checkpoint_name` under ``rkn<k>``. The scopes reach the
  jaxpr's ``name_stack`` and the HLO ``op_name`` metadata and change nothing
  else.
  """

  SITE = re.compile(r"\brks(\d+)\b")
  NAME = re.compile(r"\brkn(\d+)\b")

  def __init__(self, jaxpr: Jaxpr):
    self.sites = {id(e): i for i, (e, _) in enumerate(remat_equations(jaxpr))}
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


# The primitives that do no work on a value, in one place (readouts, the planner and the
# name crediting below all read these):
# copies of the value (JAX marks what a remat saves with a reduce_precision);
COPIES = frozenset("reduce_precision copy copy_p".split())
# the value unchanged: a copy, a name, a placement, a barrier;
SAME_VALUE = COPIES | frozenset("name device_put optimization_barrier".split())
# the same elements in another shape (the same buffer);
RESHAPES = frozenset("reshape squeeze expand_dims".split())
# part of the input.
SLICES = frozenset("slice dynamic_slice".split())
# What passes a name on: XLA may keep the output of such an op for a named value.
PASS_ON = (SAME_VALUE - {"name"}) | {"reshape", "convert_element_type"}


def eval_inlined(jaxpr: Jaxpr, consts: Sequence[Any], *args: Any, full: Any = False,
                 marks: Marks | None = None) -> list[Any]:
  """Evaluates ``jaxpr`` with every remat boundary inlined (its body run as is).

  With ``full``, each remat boundary is kept but its policy becomes full remat; with
  ``full`` a function, it is kept with policy ``full(policy)`` (on the same remat
  implementation).
  With ``marks``, each is kept as it was, and labelled (see :class:`Marks`).
  Remat inside scans, conds and jits is reached by rewriting their bodies.
  """
  tagged = {}  # the value a name tags (its producer is marked) -> the name
  passed = {}  # a named value passed on unchanged (reduce_precision, a cast, ...) -> the name
  if marks is not None:
    for eqn in jaxpr.eqns:
      n = _jax.checkpoint_name_of(eqn.primitive, eqn.params)
      if n is not None:
        tagged.update({v: n for v in eqn.invars if isinstance(v, Var)})
        passed.update({v: n for v in eqn.outvars})
      elif (eqn.primitive.name in PASS_ON and eqn.invars and len(eqn.outvars) == 1
            and isinstance(eqn.invars[0], Var) and eqn.invars[0] in passed):
        # What remat saves may be this op's output, not the named one's: XLA fuses the
        # named op into it.
        passed[eqn.outvars[0]] = tagged[eqn.outvars[0]] = passed[eqn.invars[0]]

  def step(eqn: Any, invals: list[Any]) -> list[Any]:
    name = next((tagged[v] for v in eqn.outvars if v in tagged), None)
    # `tagged` is filled only with `marks`.
    scope = marks.name_scope(name, eqn.primitive.name) if name and marks is not None else None
    with _jax.eqn_context(eqn), (
        jax.named_scope(scope) if scope else contextlib.nullcontext()):
      return _eval_eqn(eqn, invals, full, marks)

  return evaluate(jaxpr, consts, args, step)


def evaluate(jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any],
             step: Callable[[Any, list[Any]], Sequence[Any]]) -> list[Any]:
  """Runs ``jaxpr`` equation by equation, each as ``step(eqn, input values)`` returns
  its outputs: the one interpreter loop of :func:`eval_inlined` and the testing kit's
  recorder, which differ only in what they do at an equation."""
  env: dict[Any, Any] = {}
  read = lambda v: v.val if isinstance(v, Literal) else env[v]
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    outs = step(eqn, [read(v) for v in eqn.invars])
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _eval_eqn(eqn: Any, invals: list[Any], full: Any, marks: Marks | None) -> Any:
  if is_remat(eqn):
    body, body_consts = remat_body(eqn)
    run = lambda *xs: eval_inlined(body, body_consts, *xs, full=full, marks=marks)
    if callable(full):
      params = _jax.remat_params(eqn)
      with _jax.remat3(_jax.remat_uses_remat3(eqn)):
        return jax.checkpoint(run, policy=full(params.get("policy")),
                              prevent_cse=params.get("prevent_cse", True))(*invals)
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
  m = marked_jaxpr(fn, *args, **kwargs)
  return m.run, m.marks, m.leaves


class Marked(NamedTuple):
  """:func:`marked`, with the jaxpr of ``fn`` it was built from (traced once)."""

  run: Any  # a function of the flat leaves
  marks: Marks
  leaves: list[Any]
  jaxpr: Jaxpr  # of fn, on the flat leaves
  consts: list[Any]


def marked_jaxpr(fn: Any, *args: Any, **kwargs: Any) -> Marked:
  """:func:`marked`, keeping the jaxpr of ``fn`` (for FLOPs and remat sites)."""
  leaves, tree = jax.tree_util.tree_flatten((args, kwargs))

  def flat(*xs: Any) -> Any:
    a, k = jax.tree_util.tree_unflatten(tree, xs)
    return fn(*a, **k)

  closed, out_shape = jax.make_jaxpr(flat, return_shape=True)(*leaves)
  jaxpr, consts = closed_parts(closed)
  marks = Marks(jaxpr)
  out_tree = jax.tree_util.tree_structure(out_shape)

  def run(*xs: Any) -> Any:
    outs = eval_inlined(jaxpr, consts, *xs, marks=marks)
    return jax.tree_util.tree_unflatten(out_tree, outs)

  return Marked(run, marks, leaves, jaxpr, consts)
