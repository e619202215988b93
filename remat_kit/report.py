"""What remat costs: saved residuals, compiled memory and FLOPs.

* :func:`saved_residuals` lists what the backward pass keeps, one row per
  tensor, telling function arguments (parameters: no extra memory) from
  activations.
* :func:`compiled_memory` is XLA's memory analysis of the compiled gradient.
* :func:`count_flops` counts FLOPs from the jaxpr, with scan trip counts
  multiplied in (XLA's ``cost_analysis`` counts a loop body once).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from remat_kit import _compat, _jaxpr

__all__ = [
    "Residual",
    "saved_residuals",
    "activation_bytes",
    "compiled_memory",
    "count_flops",
    "live_peak_bytes",
]


@dataclasses.dataclass(frozen=True)
class Residual:
  """One tensor the backward pass keeps.

  Attributes:
    name: its `checkpoint_name`, or None.
    shape: its shape.
    dtype: its dtype name.
    bytes: its size in bytes.
    kind: "argument" (an input: parameters or data, no extra memory),
      "activation" (computed in the forward pass) or "constant".
    memory: "device", or "host" for a tensor offloaded to host memory.
    primitive: the primitive that produced it (activations only).
    source: JAX's own description.
  """

  name: str | None
  shape: tuple[int, ...]
  dtype: str
  bytes: int
  kind: str
  primitive: str | None
  source: str
  memory: str = "device"

  @property
  def label(self) -> str:
    """The name if tagged, else the producing primitive, else the kind."""
    return self.name or self.primitive or self.kind


# Ops that only re-view their input: a residual reached from an argument
# through these is part of the argument (a parameter slice), not new memory.
_VIEWS = frozenset("reshape squeeze expand_dims slice dynamic_slice transpose "
                   "reduce_precision copy copy_p".split())


def _arg_names(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
  paths = jax.tree_util.tree_flatten_with_path((args, kwargs))[0]
  return [jax.tree_util.keystr(p) for p, _ in paths]


def saved_residuals(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Residual]:
  """The tensors the backward pass of ``fn`` keeps, one row each.

  Unlike JAX's ``print_saved_residuals``, a residual that is an argument or
  a view of one (a reshape or slice of stacked parameters in a scan) is
  reported as ``kind="argument"``: it costs no extra memory.

  Args:
    fn: a function of arrays (its vjp is taken with respect to all of them).
    *args: example arguments; only shapes and dtypes matter.
    **kwargs: more arguments.

  Returns:
    One :class:`Residual` per saved tensor.

  Example:
    >>> import jax.numpy as jnp, remat_kit as rk
    >>> f = rk.remat(lambda x: jnp.sin(jnp.sin(x)).sum(), policy="full")
    >>> [(r.kind, r.shape) for r in rk.report.saved_residuals(f, jnp.ones(3))]
    [('argument', (3,))]
  """
  leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
  names = _arg_names(args, kwargs)

  def flat_fn(*xs: Any) -> Any:
    a, k = jax.tree_util.tree_unflatten(tree, xs)
    return fn(*a, **k)

  closed, out_shape = jax.make_jaxpr(lambda *xs: jax.vjp(flat_fn, *xs),
                                     return_shape=True)(*leaves)
  jaxpr = closed.jaxpr
  num_res = len(jax.tree_util.tree_leaves(out_shape[1]))
  res_vars = jaxpr.outvars[len(jaxpr.outvars) - num_res:]
  producer = {v: e for e in jaxpr.eqns for v in e.outvars}
  invar_index = {v: i for i, v in enumerate(jaxpr.invars)}
  constvars = set(jaxpr.constvars)
  rows, seen = [], set()
  for v in res_vars:
    if isinstance(v, _jaxpr.Literal) or v in constvars:
      rows.append(_row(v.aval, None, "constant", None, "a constant"))
      continue
    if v in seen:  # the same tensor returned twice is stored once
      continue
    seen.add(v)
    if v in invar_index:
      rows.append(_row(v.aval, None, "argument", None, f"argument {names[invar_index[v]]}"))
      continue
    eqn = producer[v]
    memory = "host" if "host" in str(getattr(v.aval, "memory_space", "")).lower() else "device"
    name = _compat.checkpoint_name_of(eqn.primitive, eqn.params)
    src = eqn
    while name is None and src.primitive.name in ("reduce_precision", "device_put"):
      inner = src.invars[0]
      if inner not in producer:
        break
      src = producer[inner]
      name = _compat.checkpoint_name_of(src.primitive, src.params)
    base = v
    while base in producer and producer[base].primitive.name in _VIEWS:
      base = producer[base].invars[0]
    if base in invar_index:
      rows.append(_row(v.aval, None, "argument", eqn.primitive.name,
                       f"view of argument {names[invar_index[base]]}"))
      continue
    prim = "name" if name is not None else src.primitive.name
    if prim == "jit":
      prim = f"jit:{src.params.get('name', '')}"
    where = " (offloaded to host)" if memory == "host" else ""
    rows.append(_row(v.aval, name, "activation", prim, f"output of {prim}{where}", memory))
  return rows


def _row(aval: Any, name: str | None, kind: str, prim: str | None, source: str,
         memory: str = "device") -> Residual:
  shape = tuple(int(d) for d in getattr(aval, "shape", ()))
  if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key):
    # A typed PRNG key array: its size is that of the underlying key data.
    itemsize = jax.random.key_data(jax.random.key(0)).nbytes
    dtype_name = str(aval.dtype)
  else:
    itemsize = np.dtype(aval.dtype).itemsize
    dtype_name = np.dtype(aval.dtype).name
  return Residual(name, shape, dtype_name, math.prod(shape) * itemsize, kind, prim,
                  source, memory)


def activation_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
  """Total bytes of saved activations (arguments excluded)."""
  return sum(r.bytes for r in saved_residuals(fn, *args, **kwargs) if r.kind == "activation")


_MEMORY_FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
    "host_argument_size_in_bytes",
    "host_output_size_in_bytes",
    "host_alias_size_in_bytes",
    "host_temp_size_in_bytes",
    "host_generated_code_size_in_bytes",
)


def compiled_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
  """XLA's memory analysis of ``jax.jit(fn)`` compiled for these arguments.

  Returns:
    A JSON-serializable dict with the byte fields of
    ``compiled.memory_analysis()``, ``peak_bytes`` (temp + argument + output -
    alias, which matched the live peak on an H100 to within 0.01 MiB) and the
    ``backend`` it came from.
  """
  compiled = jax.jit(fn).lower(*args, **kwargs).compile()
  ma = compiled.memory_analysis()
  out: dict[str, Any] = {"backend": jax.default_backend()}
  for f in _MEMORY_FIELDS:
    v = getattr(ma, f, None)
    if v is not None:
      out[f.removesuffix("_in_bytes")] = int(v)
  out["peak_bytes"] = (out.get("temp_size", 0) + out.get("argument_size", 0)
                       + out.get("output_size", 0) - out.get("alias_size", 0))
  return out


def live_peak_bytes(device: Any = None) -> int | None:
  """The device's live peak bytes in use, or None where the backend has none (CPU)."""
  device = device or jax.devices()[0]
  stats = device.memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return int(stats["peak_bytes_in_use"])


# --------------------------------------------------------------------------
# FLOPs from the jaxpr
# --------------------------------------------------------------------------

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
    (lc, _), _ = eqn.params["dimension_numbers"]
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


def _jaxpr_flops(jaxpr: Any) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "scan":
      total += eqn.params["length"] * _jaxpr_flops(eqn.params["jaxpr"].jaxpr)
    elif name == "cond":
      total += max(_jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    elif name == "while":
      raise ValueError(
          "`count_flops`: the function has a while loop, whose trip count is unknown "
          "before it runs; use `lax.scan` (fixed length) or `lax.fori_loop` with static "
          "bounds, which lowers to a scan.")
    else:
      total += _eqn_flops(eqn)
      for sub in _jaxpr.sub_jaxprs(eqn.params):
        total += _jaxpr_flops(sub)
      hi = _jaxpr.inner_jaxpr_of_hi(eqn.params)
      if hi is not None:
        total += _jaxpr_flops(hi)
  return total


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
  """FLOPs of ``fn`` counted from its jaxpr, scan trip counts multiplied in.

  The rule: ``dot_general`` costs 2·(output size)·(contracted size), exactly;
  a convolution 2·(output size)·(kernel size per output); an elementwise op
  one per output element; a reduction one per input element; data movement
  (reshape, transpose, slicing, broadcasting, casts) nothing. ``scan`` bodies
  count once per iteration; ``cond`` counts its dearest branch.

  Example:
    >>> import jax.numpy as jnp, remat_kit as rk
    >>> rk.report.count_flops(lambda a, b: a @ b, jnp.ones((4, 8)), jnp.ones((8, 16)))
    1024
  """
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  return _jaxpr_flops(closed.jaxpr)
