"""One trace, one compile and one read of the compiler's dumps per question.

:func:`~remat_kit.report.memory_report`, :func:`~remat_kit.report.explain_peak`
and :func:`~remat_kit.report.lint` ask about the same compiled gradient.
:func:`compilation` traces the function once (its jaxpr gives the FLOPs and the
remat sites), compiles the gradient once with XLA's dumps, parses them once, and
keeps the result per (function, arguments, policy, target): asking all three
about one function costs one compile. The cache holds at most
:data:`CACHE_SIZE` compilations, keeps no function alive (it holds weak
references) and is emptied by :func:`clear_cache`.

What the compiled program keeps from the forward to the backward pass is read
here too (:meth:`Compilation.residuals`): every buffer made before the backward
pass starts and still live when it does, credited to `checkpoint_name`s and remat
sites through the HLO's op metadata. Unlike the jaxpr's residuals
(:func:`~remat_kit.report.saved_residuals`, the view before XLA), these exist:
XLA fuses most of the jaxpr's intermediate values away, and what it keeps
adds up to at most the compiled peak.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import math
import re
import tempfile
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax

from remat_kit import _args, _jax, _jaxpr, targets
from remat_kit import _xla as _dumps
from remat_kit.report.buffers import (
    Buffer,
    backward_start,
    buffer_kind,
    buffers_of,
    instr_of,
    name_of,
    origin,
    primitive,
    reader_site,
    stacks,
)
from remat_kit.report.core import Residual, memory_fields
from remat_kit.report.explain import RematSite, jaxpr_remat_sites
from remat_kit.report.flops import _jaxpr_flops
from remat_kit.report.flops import split as split_flops

__all__ = ["CACHE_SIZE", "Buffer", "Compilation", "cache_info", "clear_cache", "compilation",
           "from_dumps"]

CACHE_SIZE = 8


@dataclasses.dataclass(eq=False)
class Compilation:
  """A function's gradient (or whole step), traced, compiled and read once.

  Attributes:
    target: where it was compiled.
    compiled: the compiled program (``jax.stages.Compiled``).
    hlo: its optimized HLO (instructions, op_names, source lines, shapes).
    allocs: the compiler's buffer assignment.
    ranges: each value's live range over the scheduled program.
    horizon: the number of program points.
    marks: the scopes that credit compiled ops to remat sites and names.
    leaf_kind: the kind of each flat argument (parameter, input, ...).
    leaf_name: the name of each flat argument (``params['w']``, ...).
    out_kind: the kind of each flat output (gradient, output, ...).
    compiler: the compiler's own memory figures.
    buffers: every buffer of the temp and host allocations.
    backward: the program point where the backward pass starts.
    grad: whether the gradient was compiled (else the function itself).
  """

  target: targets.Target
  compiled: Any
  hlo: _dumps.Program
  allocs: list[_dumps.Alloc]
  ranges: dict[str, tuple[int, int]]
  horizon: int
  marks: _jaxpr.Marks
  leaf_kind: list[str]
  leaf_name: list[str]
  out_kind: list[str]
  compiler: dict[str, int]
  buffers: list[Buffer]
  backward: int
  grad: bool
  _traced: _jaxpr.Marked | None
  _grad_leaves: tuple[int, ...]
  _program_jaxpr: Any
  _flops: dict[str, Any] | None = None
  _memory: dict[str, Any] | None = None
  _residuals: list[Residual] | None = None
  _sources: dict[tuple[str, str], str] | None = None

  @property
  def sites(self) -> list[RematSite]:
    """The remat boundaries of the function, in :attr:`Residual.site` order."""
    return jaxpr_remat_sites(self._trace("sites").jaxpr)

  @property
  def forward_jaxpr(self) -> Any:
    """The jaxpr of the function (not its gradient), on the flat arguments."""
    return self._trace("forward_jaxpr").jaxpr

  def _trace(self, what: str) -> _jaxpr.Marked:
    if self._traced is None:
      raise ValueError(f"`{what}`: this compilation was read from dumps (`from_dumps`) "
                       "and has no traced function; build it with `compilation(fn, ...)`.")
    return self._traced

  def total_flops(self) -> int:
    """FLOPs of the program compiled (the gradient, or with ``grad=False`` the function
    itself), scan trip counts multiplied in: :func:`~remat_kit.report.count_flops` of
    it, from the jaxpr already traced."""
    if self._program_jaxpr is None:
      raise ValueError("`total_flops`: this compilation was read from dumps (`from_dumps`) "
                       "and has no traced program; build it with `compilation(fn, ...)`.")
    return _jaxpr_flops(_jaxpr.closed_parts(self._program_jaxpr)[0])

  def flops(self) -> dict[str, Any]:
    """:func:`~remat_kit.report.flop_breakdown`, from the jaxprs already traced (one more
    trace, of the gradient without remat, from the jaxpr rather than the user's code)."""
    if not self.grad:
      raise ValueError("`flops`: this compilation is of a whole step (grad=False), which "
                       "has no forward/backward split to count.")
    if self._flops is None:
      m = self._trace("flops")
      plain_fn = jax.grad(lambda *xs: _jaxpr.eval_inlined(m.jaxpr, m.consts, *xs)[0],
                          argnums=self._grad_leaves)
      plain = _jaxpr.closed_parts(jax.make_jaxpr(plain_fn)(*m.leaves))[0]
      self._flops = split_flops(m.jaxpr, _jaxpr.closed_parts(self._program_jaxpr)[0], plain)
    return dict(self._flops)

  def memory(self) -> dict[str, Any]:
    """The compiler's memory figures as :func:`~remat_kit.report.compiled_memory` gives
    them (``peak_bytes``, and on an accelerator target ``hbm_bytes_moved``), from the
    program already compiled and its analysis already read."""
    if self.compiled is None:
      raise ValueError("`memory`: this compilation was read from dumps (`from_dumps`) and "
                       "has no compiled program; build it with `compilation(fn, ...)`.")
    if self._memory is None:
      self._memory = memory_fields(self.compiled, self.target, fields=self.compiler)
    return dict(self._memory)

  def residuals(self) -> list[Residual]:
    """What the compiled program carries from the forward to the backward pass.

    One row per buffer made before the backward pass starts and live when it does,
    largest first, each naming its tensor: the op that made it (followed through a
    scan's stacking, fusions, copies and bitcasts: :meth:`remat_kit._xla.Program.producer`),
    the user's source line, its `checkpoint_name` (``name``; every name its values carry
    in ``names``), the layer (the module path, or a scan's body), the remat site
    (``site``, ``site_role``), the HLO shape and dtype, and ``memory`` "host" for a buffer
    offloaded to pinned host memory.

    A buffer that holds no tensor of the model gets a kind that says so, never
    "activation" (see :data:`remat_kit.report.tensor.KINDS`): a matmul's
    ``"split-K partials"`` (the partial sums XLA keeps of a split contraction, beside the
    tensor's own bytes), a library call's ``"workspace"``, an async copy's
    ``"copy context"``, an argument copied on chip (``"prefetch"``), a tuple's pointer
    table (``"tuple table"``). The rows add up to the bytes of the carried buffers; the
    device activation rows to at most the compiled peak.
    """
    if self._residuals is None:
      self._residuals = [r for b in self.buffers + self._in_outputs() if self.carried(b)
                         for r in self.residual_rows(b)]
      self._residuals.sort(key=lambda r: -r.bytes)
    return list(self._residuals)

  def _in_outputs(self) -> list[Buffer]:
    """Values the compiler placed in an output's allocation before the output is written
    (XLA:CPU puts a forward value the backward reads there): buffers of their own to the
    residual rows, though the peak counts the allocation once, whole."""
    roots = {r.split("{")[0] for r in self.hlo.root}
    out = []
    for a in self.allocs:
      if not a.resident or a.parameter is not None or a.constant or a.color < 0:
        continue
      for value, offset, size in a.values:
        if instr_of(value) in roots or value not in self.ranges:
          continue
        # Only what the forward made: an output's buffer also holds the backward's own
        # values (a gradient accumulated in a loop) before the output is final.
        made = self.hlo.producer(value, size)
        op_name = self.hlo.own(made)[1] if made else ""
        if "transpose(" in op_name or not op_name:
          continue
        s, e = self.ranges[value]
        out.append(Buffer(a, offset, size, s, e, (value,)))
    return out

  def carried(self, b: Buffer) -> bool:
    """Whether ``b`` is made in the forward pass and still live when the backward starts."""
    if not (self.grad and b.start < self.backward <= b.end):
      return False
    # A backward op XLA scheduled early (a broadcast of the cotangent) is not carried.
    opcode, op_name, _ = self.hlo.info.get(instr_of(b.values[0]), ("", "", None))
    if "transpose(" in op_name:
      return False
    # An integer scalar is a loop's counter.
    shape = self.hlo.shape_of(b.values[0])
    if shape and shape[1] == () and shape[0].startswith(("int", "uint")):
      return False
    # A buffer that holds, where the backward starts, only a backward loop's own values
    # (its carried cotangents, set up early): not carried.
    across = [v for v in b.values if v in self.ranges
              and self.ranges[v][0] < self.backward <= self.ranges[v][1]]
    loops = [self.hlo.loop_of(instr_of(v)) for v in across]
    return not (across and all(w and "transpose(" in self.hlo.own(w)[1] for w in loops))

  def residual_rows(self, b: Buffer) -> list[Residual]:
    """The residual rows of one carried buffer (two for a split matmul: the tensor and
    its partial sums); their bytes add up to the buffer's."""
    prog, marks = self.hlo, self.marks
    # The value the buffer carries across: the one live where the backward starts (a
    # buffer reused later holds other values too), else a scan's stacked value (the loop
    # body writes each layer's slice into it), else any with an op_name.
    named = [v for v in b.values if prog.info.get(instr_of(v), ("", ""))[1]]
    stacked = [v for v in named if stacks(prog.info[instr_of(v)][1])]
    across = [v for v in b.values if v in self.ranges
              and self.ranges[v][0] < self.backward <= self.ranges[v][1]]
    v = (across or stacked or named or list(b.values))[0]
    made_by = None
    # A loop body's parameter is the scan carry: each layer's input, stacked.
    known = lambda p: p is not None and (prog.own(p)[1] or (
        prog.own(p)[0] == "parameter" and prog.loop_of(p) is not None))
    per_slice = False
    for cand in stacked + [x for x in b.values if x not in stacked]:
      # The slice a scan body writes into the stacked buffer: what made it.
      p = prog.stacked_update(instr_of(cand), b.size)
      if known(p):
        v, made_by, per_slice = cand, p, True
        break
    for cand in ([] if made_by else across + stacked + list(reversed(b.values))):
      p = prog.producer(cand, b.size)
      if known(p):
        v, made_by = cand, p
        break
    if made_by is None:
      made_by = prog.producer(v, b.size) or instr_of(v)
    opcode, op_name, source = prog.own(made_by)
    made_op = opcode
    if not op_name:
      opcode, op_name, source = prog.info.get(instr_of(v), ("?", "", None))
    prim = primitive(op_name) or opcode
    if made_op == "parameter" and any(prog.bodies.get(w) == prog.comp_of.get(made_by)
                                      for w in prog.bodies):
      prim = "scan carry"  # a loop's carried value, stacked for the backward
    own_name = marks.name_of(op_name, prim) if op_name else None
    names = tuple(dict.fromkeys(
        n for n in [own_name, *(name_of(prog, marks, x) for x in b.values)] if n))
    shape = prog.shape_of(v)
    dtype, dims = shape if shape else ("?", ())
    if shape and math.prod(dims) * _itemsize(dtype) > b.size:
      dims = ()  # a buffer XLA packs differently from the value's own shape (a larger
      # buffer is the value padded to the compiler's tiles: its shape holds)
    _, where_made = origin(prog, marks, v)
    site = marks.site_of(op_name) if op_name else None
    if site is None and where_made:
      site = marks.site_of(where_made)
    role = "inside" if site is not None else ""
    if site is None:
      site = reader_site(prog, marks, b.values)
      role = "input" if site is not None else ""
    layers = dims[0] if (per_slice or stacks(prog.info.get(instr_of(v), ("", ""))[1])) \
        and dims else 1
    made_shape = prog.shape_of(made_by)
    if layers == 1 and "while/body" in op_name and dims and made_shape and \
        len(made_shape[1]) == len(dims) - 1:
      layers = dims[0]  # one slice per iteration, stacked (read through a loop's output)
    where = {"host": " (offloaded to host)", "on-chip": " (on-chip)"}.get(b.memory, "")
    kind = buffer_kind(prog, v, made_by, made_op, dtype)
    src = source or self._user_source(op_name) or f"output of {prim}"
    cast = prog.argument_of(made_by) if made_op == "convert" else None
    if kind == "activation" and cast is not None:
      kind = "argument cast"
      arg = self.leaf_name[cast] if cast < len(self.leaf_name) else f"argument {cast}"
      prim, src = "convert", f"argument {arg}, cast to {dtype}"
    if prim == "scan carry":
      loop = prog.loop_of(made_by) or ""
      if not layer_of(op_name):
        op_name = prog.own(loop)[1] + "/body/carry"
      if len(dims) >= 2 and prog.trip_counts.get(loop, dims[0]) == dims[0]:
        layers = dims[0]  # each iteration's input, stacked (the TPU dump gives no count)
    if kind in ("prefetch", "argument"):
      number = next((i for i, x in prog.params.get(prog.comp_of.get(made_by, ""), {}).items()
                     if x == made_by), None)
      arg = (self.leaf_name[number] if number is not None and number < len(self.leaf_name)
             else prim)
      prim, src = arg, (f"a copy of argument {arg} in on-chip memory" if kind == "prefetch"
                        else f"argument {arg}")
    if kind == "prefetch":
      where = ""  # its source says so
    row = Residual(names[0] if names else None, dims, dtype, b.size, kind, prim, src + where,
                   b.memory, layers, names=names, site=site, site_role=role,
                   layer=layer_of(op_name))
    if kind == "activation" and prim == "dot_general" and len(dims) >= 2 and dims[0] > 1 \
        and layers == 1 and prog.feeds_dot_reduce(v):
      # Split-K: the tensor is one of the partial sums' size; the rest is the split's.
      one = b.size // dims[0]
      return [dataclasses.replace(row, shape=dims[1:], bytes=one),
              dataclasses.replace(row, bytes=b.size - one, kind="split-K partials",
                                  source=f"{src}{where}: {dims[0]} partial sums of the "
                                         "matmul, reduced in the backward")]
    return [row]

  def _user_source(self, op_name: str) -> str | None:
    """Where the dump keeps no source line: the traced program's, by name stack and
    primitive (the first equation of the forward jaxpr that matches)."""
    if self._traced is None or not op_name:
      return None
    if self._sources is None:
      from remat_kit.report.tensor import user_source

      found: dict[tuple[str, str], str] = {}
      for eqn in _jaxpr.walk(self._traced.jaxpr):
        src = user_source(eqn)
        if src:
          key = (_plain_path(str(eqn.source_info.name_stack)), eqn.primitive.name)
          found.setdefault(key, src)
      self._sources = found
    prim = primitive(op_name) or ""
    return self._sources.get((_plain_path(op_name.rsplit("/", 1)[0]), prim))


def _plain_path(stack: str) -> str:
  """A name stack or op_name without jit calls, transformations and remat_kit's marks."""
  parts = []
  for p in stack.split("/"):
    m = re.fullmatch(r"(?:jvp|transpose|vmap|remat2?|checkpoint)\((.*)\)", p)
    while m:
      p = m.group(1)
      m = re.fullmatch(r"(?:jvp|transpose|vmap|remat2?|checkpoint)\((.*)\)", p)
    if not p or p.startswith("jit(") or re.fullmatch(r"rk[sn]\d+", p):
      continue
    parts.append(p)
  return "/".join(parts)


def layer_of(op_name: str) -> str:
  """Where in the model an op lies, from its op_name: the module path (``"GPT/Dropout_0"``),
  a scan's body written ``"<scan>/scan body"``; "" where the op_name says nothing."""
  path = _plain_path(op_name).split("/")[:-1]  # the primitive last
  text = "/".join(path).replace("while/body", "scan body").replace("/while", "")
  return text


# --------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------
_CACHE: collections.OrderedDict[Any, tuple[Any, Compilation]] = collections.OrderedDict()
_STATS = {"hits": 0, "misses": 0}


def clear_cache() -> None:
  """Forgets every cached compilation."""
  _CACHE.clear()


def cache_info() -> dict[str, int]:
  """``{"hits", "misses", "size"}`` of the compilation cache (a test's view of it)."""
  return dict(_STATS, size=len(_CACHE))


def _fn_ref(fn: Callable[..., Any]) -> tuple[Any, Any] | None:
  """``(key, weak reference)`` for ``fn``, or None where it cannot be weakly referenced
  (then nothing is cached: a strong reference would keep the user's function alive)."""
  if inspect.ismethod(fn):
    try:
      return (id(fn.__self__), id(fn.__func__)), weakref.WeakMethod(fn)
    except TypeError:
      return None
  try:
    return id(fn), weakref.ref(fn)
  except TypeError:
    return None


def _leaf_key(x: Any) -> Any:
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    sh = getattr(x, "sharding", None)
    sh = repr(sh) if isinstance(sh, jax.sharding.NamedSharding) else None
    return (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)), sh)
  return ("python", type(x).__name__)


def _frozen(x: Any) -> Any:
  if isinstance(x, dict):
    return tuple(sorted((k, _frozen(v)) for k, v in x.items()))
  if isinstance(x, (list, tuple)):
    return tuple(_frozen(v) for v in x)
  return x


def compilation(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                target: Any = None, argnums: int | Sequence[int] = 0, grad: bool = True,
                arg_kinds: Sequence[str] | None = None,
                out_kinds: Sequence[str] | None = None,
                compiler_options: dict[str, Any] | None = None,
                donate_argnums: int | Sequence[int] = (), api: str = "explain_peak",
                static_argnames: Sequence[str] = ()) -> Compilation:
  """The gradient of ``fn`` (or ``fn`` with ``grad=False``) on ``target``, compiled once.

  Arguments as :func:`~remat_kit.report.explain_peak`'s (``kwargs`` are its
  ``fn_kwargs``; the static rule is :func:`remat_kit._args.bind`'s); ``api`` is the
  readout the user called, which errors name. A second call with the same function
  object, argument shapes, dtypes and shardings, static values, target and options (and
  the same ``jax_remat3`` setting) returns the same :class:`Compilation` without tracing.
  """
  call = _args.bind(api, fn, args, kwargs, static_argnames, argnums if grad else None)
  t = targets.parse_target(target)
  if arg_kinds is not None and len(arg_kinds) != len(args):
    raise ValueError(f"`{api}`: `arg_kinds` has {len(arg_kinds)} entries for "
                     f"{len(args)} positional arguments: give one kind per argument.")
  donate = (donate_argnums,) if isinstance(donate_argnums, int) else tuple(donate_argnums)
  if donate and grad:
    raise ValueError(f"`{api}`: `donate_argnums` is for a whole step (grad=False); "
                     "a gradient's outputs cannot reuse its arguments.")
  ref = _fn_ref(fn) if call.static is not None else None
  key = None
  if ref is not None:
    leaves, tree = jax.tree_util.tree_flatten((call.args, call.kwargs))
    key = (ref[0], tree, tuple(_leaf_key(x) for x in leaves), call.static, t.name,
           call.argnums, grad, _frozen(arg_kinds), _frozen(out_kinds),
           _frozen(compiler_options or {}), donate, _jax.remat3_enabled(),
           bool(jax.config.jax_enable_x64))
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is not None and hit[0]() == fn:
      _CACHE.move_to_end(key)
      _STATS["hits"] += 1
      return hit[1]
  _STATS["misses"] += 1
  c = _compile(call, _param_names(fn), t, grad, arg_kinds, out_kinds, compiler_options,
               donate, api)
  if key is not None and ref is not None:  # `key` is set exactly when `ref` is
    _CACHE[key] = (ref[1], c)
    while len(_CACHE) > CACHE_SIZE:
      _CACHE.popitem(last=False)
  return c


def _compile(call: _args.Bound, params: list[str], t: targets.Target, grad: bool,
             arg_kinds: Sequence[str] | None, out_kinds: Sequence[str] | None,
             compiler_options: dict[str, Any] | None, donate: tuple[int, ...], api: str
             ) -> Compilation:
  m = _jaxpr.marked_jaxpr(call.fn, *call.args, **call.kwargs)
  kinds = None if arg_kinds is None else [arg_kinds[i] for i in call.positions]
  leaf_kind, leaf_name, grad_leaves = _leaf_labels(
      call.args, call.kwargs, tuple(call.argnums or ()), grad, kinds,
      [params[i] if i < len(params) else f"arg{i}" for i in call.positions])
  target_fn = jax.grad(m.run, argnums=tuple(grad_leaves)) if grad else m.run
  donated = tuple(i for i, a in enumerate(_leaf_args(call.args, call.kwargs))
                  if a is not None and call.positions[a] in donate)
  traced = targets.trace_for(target_fn, t, *m.leaves, keep_unused=True,
                             donate_argnums=donated)
  with tempfile.TemporaryDirectory(prefix="rk_peak_") as d:
    options = dict(compiler_options or {}, xla_dump_to=d)
    compiled = traced.lower().compile(options)
    hlo, assignment, live = (_dumps.read(d, s) for s in (
        "after_optimizations.txt", "after_optimizations-buffer-assignment.txt",
        "after_optimizations-live-range.txt"))
  out_info = getattr(traced, "out_info", None)  # JAX 0.10: not on `Traced` everywhere
  if out_info is None:
    out_info = jax.eval_shape(target_fn, *m.leaves)
  out_kind = _out_labels(out_info, grad, out_kinds, api)
  prog = _dumps.Program(hlo)
  allocs = _dumps.allocations(assignment)
  ranges, horizon = _dumps.live_ranges(live)
  return Compilation(t, compiled, prog, allocs, ranges, horizon, m.marks, leaf_kind,
                     leaf_name, out_kind, _jax.memory_fields(compiled.memory_analysis()),
                     buffers_of(prog, allocs, ranges), backward_start(prog, ranges, horizon),
                     grad, m, tuple(grad_leaves), traced.jaxpr)


def from_dumps(hlo: str, assignment: str, live: str, marks: _jaxpr.Marks,
               leaf_kind: Sequence[str], leaf_name: Sequence[str], out_kind: Sequence[str],
               target: Any, compiler: dict[str, int], grad: bool = True) -> Compilation:
  """A :class:`Compilation` read from dump texts alone (a recorded compile, for tests and
  offline analysis): the peak, its buffers and the residuals, without the traced jaxprs
  (``flops`` and ``sites`` are then unavailable)."""
  prog = _dumps.Program(hlo)
  allocs = _dumps.allocations(assignment)
  ranges, horizon = _dumps.live_ranges(live)
  return Compilation(targets.parse_target(target), None, prog, allocs, ranges, horizon,
                     marks, list(leaf_kind), list(leaf_name), list(out_kind), dict(compiler),
                     buffers_of(prog, allocs, ranges), backward_start(prog, ranges, horizon),
                     grad, None, (), None)


def _itemsize(dtype: str) -> int:
  try:
    return jax.numpy.dtype(dtype).itemsize
  except TypeError:
    return 0


# --------------------------------------------------------------------------
# Labels for arguments and outputs
# --------------------------------------------------------------------------
def _leaf_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[int | None]:
  """The positional argument each flat leaf of ``(args, kwargs)`` belongs to."""
  out: list[int | None] = []
  for i, a in enumerate(args):
    out += [i] * len(jax.tree_util.tree_leaves(a))
  return out + [None] * len(jax.tree_util.tree_leaves(kwargs))


def _param_names(fn: Callable[..., Any]) -> list[str]:
  try:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  except (TypeError, ValueError):
    return []


def _leaf_labels(args: tuple[Any, ...], kwargs: dict[str, Any], nums: tuple[int, ...],
                 grad: bool, arg_kinds: Sequence[str] | None, params: list[str]
                 ) -> tuple[list[str], list[str], list[int]]:
  kinds: list[str] = []
  names: list[str] = []
  grad_leaves: list[int] = []
  for i, a in enumerate(args):
    kind = (arg_kinds[i] if arg_kinds is not None
            else "parameter" if (i in nums or not grad and i == 0) else "input")
    for path, _ in jax.tree_util.tree_flatten_with_path(a)[0]:
      if grad and i in nums:
        grad_leaves.append(len(kinds))
      kinds.append(kind)
      names.append(f"{params[i] if i < len(params) else f'arg{i}'}{jax.tree_util.keystr(path)}")
  for path, _ in jax.tree_util.tree_flatten_with_path(kwargs)[0]:
    kinds.append("input")
    names.append(jax.tree_util.keystr(path).strip("[]'"))
  return kinds, names, grad_leaves


def _out_labels(out_shape: Any, grad: bool, out_kinds: Sequence[str] | None, api: str
                ) -> list[str]:
  if grad:
    return ["gradient"] * len(jax.tree_util.tree_leaves(out_shape))
  if out_kinds is None:
    return ["output"] * len(jax.tree_util.tree_leaves(out_shape))
  tops = list(out_shape) if isinstance(out_shape, (tuple, list)) else [out_shape]
  if len(out_kinds) != len(tops):
    raise ValueError(f"`{api}`: `out_kinds` has {len(out_kinds)} entries for "
                     f"{len(tops)} outputs: give one kind per top-level output.")
  return [k for k, o in zip(out_kinds, tops) for _ in jax.tree_util.tree_leaves(o)]
