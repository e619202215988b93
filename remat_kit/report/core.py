"""What remat costs: saved residuals, compiled memory and FLOPs.

* :func:`saved_residuals` lists what the backward pass keeps, one row per
  tensor, telling function arguments (parameters: no extra memory) from
  activations.
* :func:`compiled_memory` is XLA's memory analysis of the compiled gradient.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from remat_kit import _args, _jax, _jaxpr, targets
from remat_kit.report.tensor import Tensor

__all__ = [
    "Residual",
    "saved_residuals",
    "compiled_memory",
    "live_peak_bytes",
    "memory_fields",
]


@dataclasses.dataclass(frozen=True)
class Residual:
  """One tensor the backward pass keeps.

  Attributes:
    name: its `checkpoint_name`, or None. Recovered inside scans and jits,
      where JAX's own ``print_saved_residuals`` loses it.
    shape: its shape (for a residual saved by a scan, with the trip count
      leading: bytes are for all iterations).
    dtype: its dtype name.
    bytes: its size in bytes.
    kind: "argument" (an input or a view of one: parameters, data, no extra
      memory), "argument cast" (an input cast to another dtype, such as bf16
      weights: extra memory, but not an activation), "activation" (computed
      in the forward pass) or "constant".
    primitive: the primitive that produced it.
    source: where it comes from, in words.
    memory: "device", "host" for a tensor offloaded to host memory, or "on-chip" for
      one a TPU keeps in its on-chip memory (VMEM).
    layers: the scan trip counts it is stacked over (1 outside scans), so
      ``bytes / layers`` is its size per layer.
    rule: why it is kept (filled in by :func:`remat_kit.report.memory_report`).
    names: every `checkpoint_name` the buffer carries (one buffer may be
      reached through several names, casts to its own dtype or reshapes; it
      is one row and counted once).
    site: the index (in :func:`remat_kit.report.explain.remat_sites` order)
      of the remat site the residual was produced in, or whose input it is;
      None when neither.
    site_role: "inside" (produced inside remat site ``site``, so kept by its
      policy), "input" (an input of that site, kept to recompute it) or "".
    layer: where in the model it was made: the module path (``"GPT/Dropout_0"``), a
      scan's body (``"GPT/blocks/scan body/GPTBlock"``); "" where unknown.
  """

  name: str | None
  shape: tuple[int, ...]
  dtype: str
  bytes: int
  kind: str
  primitive: str | None
  source: str
  memory: str = "device"
  layers: int = 1
  rule: str = ""
  names: tuple[str, ...] = ()
  site: int | None = None
  site_role: str = ""
  layer: str = ""

  @property
  def label(self) -> str:
    """The name if tagged, else the producing primitive, else the kind."""
    return self.name or self.primitive or self.kind

  @property
  def tensor(self) -> Tensor:
    """The row as the shared tensor record (the per-tensor planner's rows use it too)."""
    return Tensor(self.primitive or "", self.source, self.layer, tuple(self.shape),
                  self.dtype, self.bytes, self.kind, self.name)


# Ops that only re-view their input: a residual reached from an argument
# through these is part of the argument (a parameter slice), not new memory.
_VIEWS = _jaxpr.RESHAPES | _jaxpr.SLICES | _jaxpr.COPIES | {"transpose"}
# Ops that pass their value through unchanged (names and placement).
_PASS = _jaxpr.SAME_VALUE
# Ops whose output is the same buffer as their input (when the dtype is unchanged).
_ALIAS = _PASS | _jaxpr.RESHAPES | {"convert_element_type"}
# Calls whose outputs are their body's outputs.
_CALLS = frozenset(_jaxpr.CALL_BODIES)


def _arg_names(fn: Callable[..., Any], args: dict[int, Any], kwargs: dict[str, Any]
               ) -> list[str]:
  """Each leaf's name: the parameter's (``w``, ``params['dense']['kernel']``), as the
  compiled view names arguments."""
  try:
    params = [p.name for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  except (TypeError, ValueError):
    params = []
  out = []
  for i, a in args.items():
    head = params[i] if i < len(params) else f"arg{i}"
    out += [head + jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(a)[0]]
  for k, v in kwargs.items():
    out += [k + jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(v)[0]]
  return out


@dataclasses.dataclass
class _Frame:
  jaxpr: Any
  producer: dict[Any, Any]
  eqn: Any = None  # the scan or call equation in the parent frame


def _frame(jaxpr: Any, eqn: Any = None) -> _Frame:
  return _Frame(jaxpr, {v: e for e in jaxpr.eqns for v in e.outvars}, eqn)


def _body(eqn: Any) -> Any:
  return _jaxpr.call_body(eqn)


def _follow(v: Any, frames: list[_Frame], through: frozenset[str]
            ) -> tuple[Any, list[_Frame], int, str | None, bool]:
  """Follows ``v`` back through ``through`` ops, into scans and calls, out of bodies.

  Returns the var where it stops (produced by an op not in ``through``, or
  an input), its frames, the scan trip counts passed, the first
  `checkpoint_name` met, and whether a dtype cast was passed.
  """
  frames = list(frames)
  layers, name, cast = 1, None, False
  while True:
    if isinstance(v, _jaxpr.Literal):
      return v, frames, layers, name, cast
    fr = frames[-1]
    eqn = fr.producer.get(v)
    if eqn is None:  # an input of this frame: step out to the parent, if it maps
      if fr.eqn is None:
        return v, frames, layers, name, cast
      i = fr.jaxpr.invars.index(v)
      parent = fr.eqn
      if parent.primitive.name == "scan":
        scan = _jaxpr.scan_layout(parent)
        lo = scan.num_consts + scan.num_carry
        if i < lo:  # a carry or a constant: not a slice of an outer array
          return v, frames, layers, name, cast
      frames.pop()
      v = parent.invars[i]
      continue
    pname = eqn.primitive.name
    n = _jax.checkpoint_name_of(eqn.primitive, eqn.params)
    if n is not None and name is None:
      name = n
    if pname == "scan":
      k = eqn.outvars.index(v)
      scan = _jaxpr.scan_layout(eqn)
      if k < scan.num_carry:
        return v, frames, layers, name, cast
      layers *= scan.length
      body = scan.body
      frames.append(_frame(body, eqn))
      v = body.outvars[k]
      continue
    if pname in _CALLS and _body(eqn) is not None and pname not in through:
      body = _body(eqn)
      frames.append(_frame(body, eqn))
      v = body.outvars[eqn.outvars.index(v)]
      continue
    if n is not None or pname in through:
      if pname == "convert_element_type":
        cast = True
      v = eqn.invars[0]
      continue
    return v, frames, layers, name, cast


def saved_residuals(fn: Callable[..., Any], *args: Any, argnums: int | Sequence[int] | None = None,
                    fn_kwargs: Mapping[str, Any] | None = None,
                    static_argnames: Sequence[str] = (), **stray: Any) -> list[Residual]:
  """The tensors the backward pass of ``fn`` keeps, one row each.

  Unlike JAX's ``print_saved_residuals``, a residual that is an argument or
  a view of one (a reshape or slice of stacked parameters in a scan) is
  reported as ``kind="argument"``: it costs no extra memory. Names and
  producing primitives are recovered inside scans and jits, and a residual
  stacked by a scan records its trip count in ``layers``.

  Args:
    fn: a function of arrays.
    *args: example arguments; only shapes and dtypes matter.
    argnums: the arguments the backward pass differentiates (as ``jax.grad``'s); None
      (the default) for every positional argument, as JAX's own ``saved_residuals``.
    fn_kwargs: keyword arguments of ``fn`` (not differentiated).
    static_argnames: those of ``fn_kwargs`` passed as Python values, not traced.

  Returns:
    One :class:`Residual` per saved tensor.

  Example:
    >>> import jax.numpy as jnp, remat_kit as rk
    >>> f = rk.remat(lambda x: jnp.sin(jnp.sin(x)).sum(), policy="full")
    >>> [(r.kind, r.shape) for r in rk.report.saved_residuals(f, jnp.ones(3))]
    [('argument', (3,))]
  """
  call = _args.bind("saved_residuals", fn, args,
                    _args.fn_kwargs_of("saved_residuals", fn_kwargs, stray), static_argnames,
                    argnums)
  nums = call.argnums if call.argnums is not None else tuple(range(len(call.args)))
  names = _arg_names(fn, dict(zip(call.positions, call.args)), call.kwargs)
  flat_fn, marks, leaves = _jaxpr.marked(call.fn, *call.args, **call.kwargs)
  counts = [len(jax.tree_util.tree_leaves(a)) for a in call.args]
  diff = [j for i in nums for j in range(sum(counts[:i]), sum(counts[:i + 1]))]

  def vjp(*xs: Any) -> Any:  # every leaf an input; the differentiated ones as vjp's
    def of_diff(*d: Any) -> Any:
      full = list(xs)
      for j, x in zip(diff, d):
        full[j] = x
      return flat_fn(*full)
    return jax.vjp(of_diff, *(xs[j] for j in diff))

  closed, out_shape = jax.make_jaxpr(vjp, return_shape=True)(*leaves)
  jaxpr = closed.jaxpr
  num_res = len(jax.tree_util.tree_leaves(out_shape[1]))
  res_vars = jaxpr.outvars[len(jaxpr.outvars) - num_res:]
  top = _frame(jaxpr)
  invar_index = {v: i for i, v in enumerate(jaxpr.invars)}
  constvars = set(jaxpr.constvars)
  rows: list[Residual] = []
  buffers: dict[Any, int] = {}  # one buffer -> its row
  for v in res_vars:
    if isinstance(v, _jaxpr.Literal) or v in constvars:
      rows.append(_row(v.aval, None, "constant", None, "a constant"))
      continue
    memory = "host" if "host" in str(getattr(v.aval, "memory_space", "")).lower() else "device"
    base, frames, _, _, cast = _follow(
        v, [top], _PASS | _VIEWS | {"convert_element_type"})
    if len(frames) == 1 and base in invar_index:
      aval: Any = v.aval  # a ShapedArray; `AbstractValue` declares no dtype
      key: tuple[Any, ...] = ("argument", base, cast, str(aval.dtype), memory)
      if key in buffers:
        continue
      buffers[key] = len(rows)
      what = "cast of argument" if cast else "argument" if base is v else "view of argument"
      rows.append(_row(v.aval, None, "argument cast" if cast else "argument", None,
                       f"{what} {names[invar_index[base]]}", memory))
      continue
    src, frames, layers, name, _ = _follow(v, [top], _PASS)
    buf, bframes, _, bname, _ = _follow_same_buffer(src, frames)
    key = (tuple(id(f.eqn) for f in bframes), buf, memory)
    tags = tuple(n for n in (name, bname, *_names_given(buf, bframes[-1])) if n is not None)
    if key in buffers:  # another name, cast or view of a buffer already counted
      i = buffers[key]
      rows[i] = dataclasses.replace(
          rows[i], names=rows[i].names + tuple(n for n in tags if n not in rows[i].names),
          name=rows[i].name or (tags[0] if tags else None))
      continue
    buffers[key] = len(rows)
    eqn = frames[-1].producer.get(src) if not isinstance(src, _jaxpr.Literal) else None
    site, role = None, ""
    if eqn is not None:
      prim = eqn.primitive.name
      if _jaxpr.is_jit(eqn):
        prim = f"jit:{eqn.params.get('name', '')}"
      site = marks.site_of(str(eqn.source_info.name_stack))
      role = "inside" if site is not None else ""
    else:
      prim = "scan carry" if len(frames) > 1 else "input"
    if not isinstance(src, _jaxpr.Literal):
      # A value another remat site reads (a layer's output feeding the next layer)
      # is kept as that site's input, whichever site made it.
      reader = _consuming_site(src, frames[-1], marks, exclude=site)
      if reader is not None:
        site, role = reader, "input"
    where = " (offloaded to host)" if memory == "host" else ""
    inside = f" in a scan of {layers}" if layers > 1 else ""
    tags = tuple(dict.fromkeys(n for n in (name, *tags) if n is not None))
    rows.append(dataclasses.replace(
        _row(v.aval, name, "activation", prim, f"output of {prim}{inside}{where}", memory,
             layers), names=tags, site=site, site_role=role))
  return rows


def _follow_same_buffer(v: Any, frames: list[_Frame]
                        ) -> tuple[Any, list[_Frame], int, str | None, bool]:
  """Follows ``v`` back through ops that keep its buffer: names, reshapes, casts to
  its own dtype. Stops at a cast that changes the dtype (a new buffer)."""
  dtype = str(v.aval.dtype) if not isinstance(v, _jaxpr.Literal) else ""
  cur, fr = v, list(frames)
  names: list[str] = []
  while True:
    nxt, fr2, layers, name, _ = _follow(cur, fr, _ALIAS)
    if nxt is cur:
      break
    # Step back one op at a time, so a dtype change ends the walk before it.
    eqn = fr[-1].producer.get(cur) if not isinstance(cur, _jaxpr.Literal) else None
    if eqn is None or eqn.primitive.name not in _ALIAS and _jax.checkpoint_name_of(
        eqn.primitive, eqn.params) is None:
      break
    prev = eqn.invars[0]
    if isinstance(prev, _jaxpr.Literal) or str(prev.aval.dtype) != dtype:
      break
    n = _jax.checkpoint_name_of(eqn.primitive, eqn.params)
    if n is not None:
      names.append(n)
    cur = prev
  return cur, fr, 1, (names[0] if names else None), False


def _names_given(v: Any, frame: _Frame) -> list[str]:
  """The `checkpoint_name` s applied to ``v`` downstream (its buffer carries them)."""
  if isinstance(v, _jaxpr.Literal):
    return []
  return [n for e in frame.jaxpr.eqns
          if (n := _jax.checkpoint_name_of(e.primitive, e.params)) is not None
          and any(x is v for x in e.invars)]


def _consuming_site(v: Any, frame: _Frame, marks: Any, exclude: int | None) -> int | None:
  """The remat site (other than ``exclude``) whose forward ops read ``v``: ``v`` is its
  input."""
  for eqn in frame.jaxpr.eqns:
    if any(x is v for x in eqn.invars):
      site = marks.site_of(str(eqn.source_info.name_stack))
      if site is not None and site != exclude:
        return site
  return None


def _row(aval: Any, name: str | None, kind: str, prim: str | None, source: str,
         memory: str = "device", layers: int = 1) -> Residual:
  shape = tuple(int(d) for d in getattr(aval, "shape", ()))
  if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key):
    # A typed PRNG key array: its size is that of the underlying key data.
    itemsize = jax.random.key_data(jax.random.key(0)).nbytes
    dtype_name = str(aval.dtype)
  else:
    itemsize = np.dtype(aval.dtype).itemsize
    dtype_name = np.dtype(aval.dtype).name
  return Residual(name, shape, dtype_name, math.prod(shape) * itemsize, kind, prim,
                  source, memory, layers)


def compiled_memory(fn: Callable[..., Any], *args: Any, target: Any = None,
                    hbm_bytes: bool | None = None, fn_kwargs: Mapping[str, Any] | None = None,
                    static_argnames: Sequence[str] = (), **stray: Any) -> dict[str, Any]:
  """The compiler's memory analysis of ``jax.jit(fn)`` for these arguments.

  Args:
    fn: the function to compile (usually a gradient).
    *args: arrays or ``jax.ShapeDtypeStruct``s.
    target: where to compile (see :mod:`remat_kit.targets`): None for the
      local backend, ``"tpu:v5e:2x2"``, ``"gpu:h100"``, ...
    hbm_bytes: parse the compiled program for ``hbm_bytes_moved``; by
      default only for accelerator targets (their step-time estimate needs it).
    fn_kwargs: keyword arguments of ``fn``.
    static_argnames: those of ``fn_kwargs`` passed as Python values, not traced;
      strings and other values JAX cannot trace are static anyway.

  Returns:
    A JSON-serializable dict with the byte fields of
    ``compiled.memory_analysis()`` (``temp_size``, ``argument_size``, ...,
    and ``peak_memory`` where the compiler reports one), ``peak_bytes``, the
    ``backend`` and ``target``, and ``hbm_bytes_moved`` and ``host_bytes_moved``
    (see :func:`remat_kit.targets.bytes_moved`) where ``hbm_bytes`` asks for them.
    ``peak_bytes`` is the compiler's own peak on TPU and GPU targets;
    locally it is temp + argument + output - alias (which matched the live
    peak on an H100 within 0.01 MiB).
  """
  call = _args.bind("compiled_memory", fn, args,
                    _args.fn_kwargs_of("compiled_memory", fn_kwargs, stray), static_argnames)
  t = targets.parse_target(target)
  # The keyword arguments travel as one positional (traced) dict, so none of them meets
  # `compile_for`'s own parameters.
  with_kwargs = lambda *a: call.fn(*a[:-1], **a[-1])
  return memory_fields(targets.compile_for(with_kwargs, t, *call.args, call.kwargs), t,
                       hbm_bytes)


def memory_fields(compiled: Any, target: Any, hbm_bytes: bool | None = None,
                  fields: dict[str, int] | None = None) -> dict[str, Any]:
  """:func:`compiled_memory`'s dict for an already compiled program (``fields``: its
  ``memory_analysis()`` already read, so it is not read twice)."""
  t = targets.parse_target(target)
  out: dict[str, Any] = {"backend": jax.default_backend() if t.is_local else t.platform,
                         "target": t.name}
  out.update(fields if fields is not None else _jax.memory_fields(compiled.memory_analysis()))
  # What the step holds: every allocation, reserved whole for the step (CPU, GPU; JAX
  # 0.12 reports it as `total_allocation_bytes`); the TPU compiler's own peak.
  out["peak_bytes"] = (out.get("temp_size", 0) + out.get("argument_size", 0)
                       + out.get("output_size", 0) - out.get("alias_size", 0))
  if t.platform == "gpu" and out.get("total_allocation"):
    out["peak_bytes"] = out["total_allocation"]
  elif t.platform == "tpu" and out.get("peak_memory"):
    out["peak_bytes"] = out["peak_memory"]
  if hbm_bytes is None:
    hbm_bytes = not t.is_local
  if hbm_bytes:
    out["hbm_bytes_moved"], out["host_bytes_moved"] = targets.bytes_moved(compiled.as_text())
  return out


def live_peak_bytes(device: Any = None) -> int | None:
  """The device's live peak bytes in use, or None where the backend has none (CPU)."""
  device = device or jax.devices()[0]
  stats = device.memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return int(stats["peak_bytes_in_use"])
