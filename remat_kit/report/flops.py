"""FLOPs from the jaxpr: forward, backward and recomputation, exactly.

XLA's ``cost_analysis`` counts a while/scan body once, and says nothing of
which FLOPs are recomputation. Counting from the jaxpr multiplies scan trip
counts in and is the same on every backend. Recomputation is measured, not
estimated: the gradient is counted as written and again with every remat
boundary inlined (saving everything), and the difference is what remat
recomputes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from remat_kit import _args, _jaxpr
from remat_kit.transforms import without_remat

__all__ = ["count_flops", "eqn_flops", "flop_breakdown", "split"]


# One FLOP per output element.
_ELEMENTWISE = frozenset("""
add sub mul div rem neg max min abs sign exp exp2 log log1p expm1 tanh logistic sin cos tan
sqrt rsqrt cbrt pow integer_pow square erf erfc erf_inv atan2 asin acos atan sinh cosh asinh
acosh atanh select_n clamp nextafter round floor ceil is_finite add_any
""".split())
# One FLOP per input element.
_REDUCTIONS = frozenset("reduce_sum reduce_max reduce_min reduce_prod argmax argmin "
                        "cumsum cumprod cummax cummin reduce_and reduce_or".split())


def _size(aval: Any) -> int:
  return math.prod(getattr(aval, "shape", ()))


def _eqn_flops(eqn: Any) -> int:
  name = eqn.primitive.name
  if name == "dot_general":
    lc, _ = _jaxpr.dot_contracting_dims(eqn.params)
    lhs = eqn.invars[0].aval
    k = math.prod(lhs.shape[d] for d in lc)
    return 2 * _size(eqn.outvars[0].aval) * k
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval
    dn = eqn.params["dimension_numbers"]
    spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial...)
    k = math.prod(rhs.shape[d] for d in spec[1:])
    return 2 * _size(eqn.outvars[0].aval) * k
  if name in _ELEMENTWISE:
    return sum(_size(v.aval) for v in eqn.outvars)
  if name in _REDUCTIONS:
    return _size(eqn.invars[0].aval)
  return 0


def _jaxpr_flops(jaxpr: Any, matmul_only: bool = False) -> int:
  return sum(eqn_flops(eqn, deep=True, matmul_only=matmul_only) for eqn in jaxpr.eqns)


def eqn_flops(eqn: Any, deep: bool = False, matmul_only: bool = False) -> int:
  """FLOPs of one equation by :func:`count_flops`' rule.

  Args:
    eqn: a jaxpr equation.
    deep: count the jaxprs inside it too (a scan's body times its length, a
      cond's dearest branch, a constant-counter while loop's trips); else its
      own op alone.
    matmul_only: count ``dot_general`` and convolutions alone (as PyTorch's
      ``FlopCounterMode`` does).
  """
  name = eqn.primitive.name
  if not deep:
    if matmul_only and name not in ("dot_general", "conv_general_dilated"):
      return 0
    return _eqn_flops(eqn)
  if name == "scan":
    scan = _jaxpr.scan_layout(eqn)
    return scan.length * _jaxpr_flops(scan.body, matmul_only)
  if name == "cond":
    return max(_jaxpr_flops(b, matmul_only) for b in _jaxpr.cond_branches(eqn))
  if name == "while":
    trips = _while_trips(eqn)
    if trips is None:
      raise ValueError(
          "`count_flops`: the function has a while loop whose trip count is not a "
          "constant counter (`i < n` with literal start, bound and step); it is unknown "
          "before it runs. Use `lax.scan` (fixed length) or `lax.fori_loop` with static "
          "bounds, which lowers to a scan.")
    loop = _jaxpr.while_layout(eqn)
    return (trips * _jaxpr_flops(loop.body, matmul_only)
            + (trips + 1) * _jaxpr_flops(loop.cond, matmul_only))
  total = eqn_flops(eqn, matmul_only=matmul_only)
  for sub in _jaxpr.sub_jaxprs(eqn.params):
    total += _jaxpr_flops(sub, matmul_only)
  hi = _jaxpr.inner_jaxpr_of_hi(eqn.params)
  if hi is not None:
    total += _jaxpr_flops(hi, matmul_only)
  return total


def _literal(v: Any) -> Any:
  return v.val if isinstance(v, _jaxpr.Literal) else None


def _while_trips(eqn: Any) -> int | None:
  """Trip count of ``while i < n: i += step`` with literal start, bound and step, else None."""
  cond, body, nc, nb = _jaxpr.while_layout(eqn)
  if len(cond.eqns) != 1 or cond.eqns[0].primitive.name not in ("lt", "le", "ne"):
    return None
  cmp = cond.eqns[0]
  carries = cond.invars[nc:]
  lhs, rhs = cmp.invars
  if lhs not in carries:
    return None
  i = carries.index(lhs)
  bound = _literal(rhs)
  if bound is None and rhs in cond.invars[:nc]:
    bound = _literal(eqn.invars[cond.invars.index(rhs)])
  start = _literal(eqn.invars[nc + nb + i])
  out = body.outvars[i]
  inc = next((e for e in body.eqns if out in e.outvars), None)
  if inc is None or inc.primitive.name != "add" or inc.invars[0] is not body.invars[nb + i]:
    return None
  step = _literal(inc.invars[1])
  if None in (bound, start, step) or step <= 0:
    return None
  span = int(bound) - int(start) + (1 if cmp.primitive.name == "le" else 0)
  if cmp.primitive.name == "ne" and span % int(step):
    return None
  return max(0, -(-span // int(step)))


def count_flops(fn: Callable[..., Any], *args: Any, fn_kwargs: Mapping[str, Any] | None = None,
                static_argnames: Sequence[str] = (), **stray: Any) -> int:
  """FLOPs of ``fn`` counted from its jaxpr, scan trip counts multiplied in.

  The rule: ``dot_general`` costs 2·(output size)·(contracted size), exactly;
  a convolution 2·(output size)·(kernel size per output); an elementwise op
  one per output element; a reduction one per input element; data movement
  (reshape, transpose, slicing, broadcasting, casts) nothing. ``scan`` bodies
  count once per iteration; ``while`` loops with a constant counter
  (``i < n``, literal start and step) count ``trips`` bodies and ``trips + 1``
  conditions; other while loops are refused; ``cond`` counts its dearest
  branch.

  Args:
    fn: the function to count (a gradient, for the backward pass).
    *args: its positional arguments (arrays or ``jax.ShapeDtypeStruct``s).
    fn_kwargs: its keyword arguments.
    static_argnames: those of ``fn_kwargs`` passed as Python values, not traced.

  Returns:
    The FLOP count.

  Raises:
    ValueError: for a while loop whose trip count is not a constant counter.

  Example:
    >>> import jax.numpy as jnp, remat_kit as rk
    >>> rk.report.count_flops(lambda a, b: a @ b, jnp.ones((4, 8)), jnp.ones((8, 16)))
    1024
  """
  call = _args.bind("count_flops", fn, args,
                    _args.fn_kwargs_of("count_flops", fn_kwargs, stray), static_argnames)
  return _jaxpr_flops(jax.make_jaxpr(call.fn)(*call.args, **call.kwargs).jaxpr)




def flop_breakdown(fn: Callable[..., Any], *args: Any, argnums: int | Sequence[int] = 0,
                   fn_kwargs: Mapping[str, Any] | None = None,
                   static_argnames: Sequence[str] = (), **stray: Any) -> dict[str, int | float]:
  """Forward, backward and recomputation FLOPs of ``jax.grad(fn)``, from the jaxpr.

  ``forward`` is ``fn`` alone; ``total`` is the gradient as written; the
  gradient with remat inlined is ``forward + backward``; ``recompute`` is the
  rest, and ``recompute_pct`` is it relative to the gradient without remat.

  Args:
    fn: a scalar function.
    *args: its positional arguments (arrays or ``jax.ShapeDtypeStruct``s).
    argnums: which arguments the gradient is taken with respect to (as in
      ``jax.grad``).
    fn_kwargs: its keyword arguments (not differentiated).
    static_argnames: those of ``fn_kwargs`` passed as Python values, not traced.

  Returns:
    ``{"forward", "backward", "recompute", "total", "recompute_pct",
    "recompute_matmul"}``; the last counts matmuls and convolutions alone (as
    PyTorch's ``FlopCounterMode``).

  Raises:
    ValueError: as :func:`count_flops`.

  Example:
    >>> import jax.numpy as jnp, remat_kit as rk
    >>> f = rk.remat(lambda w, x: jnp.sum(jnp.tanh(x @ w) @ w), policy="full")
    >>> fb = rk.report.flop_breakdown(f, jnp.ones((4, 4)), jnp.ones((2, 4)))
    >>> fb["forward"], fb["recompute"]
    (144, 72)
  """
  call = _args.bind("flop_breakdown", fn, args,
                    _args.fn_kwargs_of("flop_breakdown", fn_kwargs, stray), static_argnames,
                    argnums)
  a, kw, nums = call.args, call.kwargs, call.argnums or (0,)
  forward = jax.make_jaxpr(call.fn)(*a, **kw).jaxpr
  grad = jax.make_jaxpr(jax.grad(call.fn, argnums=nums))(*a, **kw).jaxpr
  plain = jax.make_jaxpr(jax.grad(without_remat(call.fn), argnums=nums))(*a, **kw).jaxpr
  return split(forward, grad, plain)


def split(forward: Any, grad: Any, plain: Any) -> dict[str, int | float]:
  """The forward/backward/recompute split (:func:`flop_breakdown`'s dict) from three
  jaxprs: the function, its gradient as written, its gradient with remat inlined."""
  total, plain_total, fwd = _jaxpr_flops(grad), _jaxpr_flops(plain), _jaxpr_flops(forward)
  recompute = total - plain_total
  return {"forward": fwd, "backward": plain_total - fwd, "recompute": recompute,
          "total": total, "recompute_pct": 100.0 * recompute / plain_total if plain_total else 0.0,
          "recompute_matmul": _jaxpr_flops(grad, True) - _jaxpr_flops(plain, True)}
