"""What is live when the compiled gradient reaches its peak: :func:`explain_peak`.

No compiler field answers this directly. XLA:CPU's ``peak_memory_in_bytes``
is smaller than one live buffer; the TPU compiler reports temp 0; the H100
compiler's peak is temp + arguments + output. So the peak is computed from
what the compiler itself decided, read from its dumps
(``compile(compiler_options={"xla_dump_to": dir})``), the same on every
target:

* ``*after_optimizations-buffer-assignment.txt``: each allocation (parameter,
  output, constant, temp) and, in it, each value's offset and size;
* ``*after_optimizations-live-range.txt``: each value's live range over the
  scheduled program;
* ``*after_optimizations.txt``: each instruction's ``op_name`` and source line.

Parameters, outputs and constants have allocations of their own for the whole
step (the runtime makes them before it starts), so they count at every
point (constants baked into the program are not counted: XLA reports them with
the generated code). In a temp allocation, the point is the one where the
values live at once (a buffer shared by several values, an in-place update or
an alias, counted once) add up to the most: ``live_bytes``. The runtime
reserves each temp allocation whole, so what the compiler's packing leaves
unused at that point is held too, and is a "packing" row. ``peak_bytes`` is
the sum: the memory the step holds at its peak. On CPU and GPU that is what
the compiler allocates, temp + arguments + output (JAX 0.12's
``total_allocation_bytes``; its ``peak_memory_in_bytes`` is the heap's peak
without the packing, smaller); on a real H100 it matched the device's
``peak_bytes_in_use``. On TPU it counts on-chip (VMEM) buffers too, in rows
whose ``memory`` says so; the TPU compiler's own ``peak_memory_in_bytes`` (which
counts the program too) is kept in ``compiler``. Every report is checked against
the compiler's figures and raises where they disagree (see ``_reconcile``).

Values are credited by provenance: the function is re-traced with named
scopes on each remat site and each `checkpoint_name`'d op
(:class:`remat_kit._jaxpr.Marks`), which reach the HLO ``op_name``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from remat_kit import _jax, _jaxpr, targets
from remat_kit import _xla as _dumps
from remat_kit.report.core import fn_kwargs_of
from remat_kit.report.table import format_bytes, format_table

__all__ = ["PeakReport", "PeakRow", "compile_explained", "explain_peak"]

KINDS = ("parameter", "input", "optimizer state", "gradient", "output", "saved residual",
         "backward temporary", "forward temporary", "temporary", "packing", "other")


@dataclasses.dataclass(frozen=True)
class PeakRow:
  """One buffer live at the peak.

  Attributes:
    bytes: its size (counted once however many values share it).
    name: the `checkpoint_name` of the op that made it, or None.
    op: the jaxpr primitive (from the HLO ``op_name``) or the argument name.
    kind: one of parameter, input, optimizer state, gradient, output, saved
      residual (made in the forward pass, read by the backward), backward
      temporary, forward temporary, temporary (neither), packing (temp memory the
      compiler reserved but could not fill at this point), other.
    source: the user's source line that made it, where the compiler kept it.
    instruction: the HLO instruction(s) whose value it holds.
    memory: "device", or "on-chip" for a TPU VMEM buffer.
  """

  bytes: int
  name: str | None
  op: str | None
  kind: str
  source: str | None
  instruction: str
  memory: str = "device"


@dataclasses.dataclass
class PeakReport:
  """The buffers live at the compiled program's peak, largest first.

  ``rows`` holds the ``top`` largest buffers and a final "other" row with the
  rest, so the rows add up to ``peak_bytes``.
  """

  peak_bytes: int
  rows: list[PeakRow]
  target: str
  at: str  # the instruction at which the peak is reached
  compiler: dict[str, int]  # the compiler's own fields, for comparison
  by_kind: dict[str, int]  # bytes live at the peak per kind (all buffers, not only top)
  live_bytes: int = 0  # the buffers live at the peak, without the temp packing
  by_memory: dict[str, int] = dataclasses.field(default_factory=dict)  # device, on-chip

  def to_dict(self) -> dict[str, Any]:
    return {"peak_bytes": self.peak_bytes, "live_bytes": self.live_bytes,
            "by_memory": dict(self.by_memory),
            "target": self.target, "at": self.at,
            "compiler": dict(self.compiler), "by_kind": dict(self.by_kind),
            "rows": [{"bytes": r.bytes, "name": r.name, "op": r.op, "kind": r.kind,
                      "source": r.source, "instruction": r.instruction, "memory": r.memory}
                     for r in self.rows]}

  def to_json(self, **kwargs: Any) -> str:
    return json.dumps(self.to_dict(), **kwargs)

  def table(self) -> str:
    total = max(self.peak_bytes, 1)
    kinds = [[k, format_bytes(b), f"{100 * b / total:.0f}%"] for k, b in self.by_kind.items()]
    rows = [[format_bytes(r.bytes), r.kind, r.name or "-", r.op or "-", r.source or "-",
             r.instruction[:40] + (f" ({r.memory})" if r.memory != "device" else "")]
            for r in self.rows]
    return "\n".join([
        f"== peak {format_bytes(self.peak_bytes)} on {self.target}, at {self.at} ==",
        format_table(["kind", "bytes", "share"], kinds, align="lrr"), "",
        format_table(["bytes", "kind", "name", "op", "source", "instruction"], rows,
                     align="rlllll")])

  def __str__(self) -> str:
    return self.table()


def explain_peak(fn: Callable[..., Any], *args: Any, target: Any = None, top: int = 20,
                 argnums: int | Sequence[int] = 0, grad: bool = True,
                 arg_kinds: Sequence[str] | None = None,
                 out_kinds: Sequence[str] | None = None,
                 compiler_options: dict[str, Any] | None = None,
                 donate_argnums: int | Sequence[int] = (),
                 fn_kwargs: Mapping[str, Any] | None = None, **stray: Any) -> PeakReport:
  """What is live when the compiled gradient of ``fn`` reaches its peak.

  Args:
    fn: a scalar loss (its gradient is compiled), or with ``grad=False`` a
      whole step (compiled as is: a training step with its optimizer).
    *args: arrays or ``jax.ShapeDtypeStruct``s.
    target: where to compile (see :mod:`remat_kit.targets`).
    top: how many of the largest buffers get a row of their own.
    argnums: the arguments the gradient is taken for (``grad=True``).
    grad: compile ``jax.grad(fn)`` (default) or ``fn`` itself.
    arg_kinds: the kind of each positional argument's buffers (default:
      "parameter" for ``argnums``, else "input"), e.g.
      ``("parameter", "optimizer state", "input")`` for ``step(params, opt, batch)``.
    out_kinds: with ``grad=False``, the kind of each top-level output
      (default "output").
    compiler_options: more options for the compile.
    donate_argnums: with ``grad=False``, positional arguments whose buffers the
      outputs may reuse (a training step's parameters and optimizer state), as
      ``jax.jit(..., donate_argnums=...)``.
    fn_kwargs: keyword arguments of ``fn`` (not differentiated), kept apart
      from this function's own options.

  Returns:
    A :class:`PeakReport`; ``to_dict()`` is ``{"peak_bytes", "rows": [{"bytes",
    "name", "op", "kind", "source"}, ...], ...}``.

  Example:
    >>> import jax.numpy as jnp, remat_kit as rk
    >>> def loss(w, x):
    ...   y = rk.checkpoint_name(jnp.exp(x @ w), "wide")
    ...   return jnp.sum(jnp.tanh(y) @ w.T)
    >>> rep = rk.report.explain_peak(loss, jnp.ones((64, 1024)), jnp.ones((32, 64)))
    >>> any(r.name == "wide" and r.kind == "saved residual" for r in rep.rows)
    True
  """
  kwargs = fn_kwargs_of("explain_peak", fn_kwargs, stray)
  return compile_explained(fn, args, kwargs, target=target, top=top, argnums=argnums,
                           grad=grad, arg_kinds=arg_kinds, out_kinds=out_kinds,
                           compiler_options=compiler_options,
                           donate_argnums=donate_argnums)[1]


def compile_explained(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                      target: Any = None, top: int = 20, argnums: int | Sequence[int] = 0,
                      grad: bool = True, arg_kinds: Sequence[str] | None = None,
                      out_kinds: Sequence[str] | None = None,
                      compiler_options: dict[str, Any] | None = None,
                      donate_argnums: int | Sequence[int] = ()
                      ) -> tuple[Any, PeakReport]:
  """:func:`explain_peak`, also returning the compiled program (one compile for both)."""
  if not callable(fn):
    raise TypeError(f"`explain_peak`: `fn` must be callable, got {fn!r}.")
  if not isinstance(top, int) or isinstance(top, bool) or top < 1:
    raise ValueError(f"`explain_peak`: `top` must be a positive int, got {top!r}.")
  t = targets.parse_target(target)
  nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
  for a in nums:
    if not isinstance(a, int) or not 0 <= a < len(args):
      raise ValueError(f"`explain_peak`: `argnums` {argnums!r} must index the {len(args)} "
                       "positional arguments.")
  if arg_kinds is not None and len(arg_kinds) != len(args):
    raise ValueError(f"`explain_peak`: `arg_kinds` has {len(arg_kinds)} entries for "
                     f"{len(args)} positional arguments: give one kind per argument.")
  run, marks, leaves = _jaxpr.marked(fn, *args, **kwargs)
  leaf_kind, leaf_name, grad_leaves = _leaf_labels(args, kwargs, nums, grad, arg_kinds,
                                                   _param_names(fn))
  target_fn = jax.grad(run, argnums=tuple(grad_leaves)) if grad else run
  donate = (donate_argnums,) if isinstance(donate_argnums, int) else tuple(donate_argnums)
  if donate and grad:
    raise ValueError("`explain_peak`: `donate_argnums` is for a whole step (grad=False); "
                     "a gradient's outputs cannot reuse its arguments.")
  donated_leaves = tuple(i for i, a in enumerate(_leaf_args(args, kwargs)) if a in donate)
  with tempfile.TemporaryDirectory(prefix="rk_peak_") as d:
    options = dict(compiler_options or {}, xla_dump_to=d)
    compiled = targets.compile_for(target_fn, t, *leaves, compiler_options=options,
                                   keep_unused=True, donate_argnums=donated_leaves)
    hlo, assignment, live = (_dumps.read(d, s) for s in (
        "after_optimizations.txt", "after_optimizations-buffer-assignment.txt",
        "after_optimizations-live-range.txt"))
  compiler = _jax.memory_fields(compiled.memory_analysis())
  out_leaf_kind = _out_labels(jax.eval_shape(target_fn, *leaves), grad, out_kinds)
  ranges, horizon = _dumps.live_ranges(live)
  report = _explain(_dumps.Program(hlo), _dumps.allocations(assignment), ranges, horizon, marks, leaf_kind,
                    leaf_name, out_leaf_kind, top, t.name, compiler)
  _reconcile(report, t)
  return compiled, report


def _reconcile(report: PeakReport, t: targets.Target) -> None:
  """Raises where the explained total disagrees with the compiler's own figures.

  On CPU and GPU the runtime reserves every allocation whole for the step, so the
  peak is what the compiler allocates: ``total_allocation_bytes`` (JAX 0.11+), else
  temp + arguments + output - aliased. On TPU the compiler's figures cover HBM only
  (on-chip VMEM buffers are outside them) and their meaning moves between libtpu
  versions, so the HBM part of the explained peak must lie between the arguments
  plus outputs and the largest of ``peak_memory_in_bytes``,
  ``total_allocation_bytes`` and temp + arguments + outputs.
  """
  c, got = report.compiler, report.peak_bytes
  if t.platform == "tpu":
    # HBM only: on-chip (VMEM) buffers are the compiler's own, outside its figures.
    got = report.by_memory.get("device", got)
    floor = c.get("argument_size", 0) + c.get("output_size", 0) - c.get("alias_size", 0)
    ceiling = max(c.get("peak_memory", 0), c.get("total_allocation", 0),
                  c.get("temp_size", 0) + floor)
    if floor <= got <= 1.005 * ceiling + 4096:
      return
    want = (f"between {floor:,} (arguments + outputs) and {ceiling:,} (the most the "
            "compiler says it allocates) bytes of HBM")
  else:
    ref = c.get("total_allocation")
    what = "total_allocation_bytes"
    if ref is None:
      ref = (c.get("temp_size", 0) + c.get("argument_size", 0) + c.get("output_size", 0)
             - c.get("alias_size", 0))
      what = "temp + argument + output - alias"
    if abs(got - ref) <= 0.005 * ref + 4096:
      return
    want = f"{ref:,} (the compiler's {what})"
  raise RuntimeError(
      f"`explain_peak`: on {t.name}, the buffers read from the compiler's dumps add up to "
      f"{got:,} bytes at the peak, but its memory analysis says {want}. This JAX/XLA "
      f"(jax {jax.__version__}) lays out its dumps in a way remat_kit does not read "
      "correctly; please report it with your JAX version. Compiler figures: "
      f"{dict(c)}.")


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
  kinds, names, grad_leaves = [], [], []
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


def _out_labels(out_shape: Any, grad: bool, out_kinds: Sequence[str] | None) -> list[str]:
  if grad:
    return ["gradient"] * len(jax.tree_util.tree_leaves(out_shape))
  if out_kinds is None:
    return ["output"] * len(jax.tree_util.tree_leaves(out_shape))
  tops = list(out_shape) if isinstance(out_shape, (tuple, list)) else [out_shape]
  if len(out_kinds) != len(tops):
    raise ValueError(f"`explain_peak`: `out_kinds` has {len(out_kinds)} entries for "
                     f"{len(tops)} outputs: give one kind per top-level output.")
  return [k for k, o in zip(out_kinds, tops) for _ in jax.tree_util.tree_leaves(o)]


# --------------------------------------------------------------------------
# The peak
# --------------------------------------------------------------------------
def _explain(prog: _dumps.Program, allocs: list[_dumps.Alloc], ranges: dict[str, tuple[int, int]],
             horizon: int, marks: Any, leaf_kind: list[str], leaf_name: list[str],
             out_kind: list[str], top: int, target: str, compiler: dict[str, int]
             ) -> PeakReport:
  # Buffers of temp allocations: values at one offset whose live ranges touch are one
  # buffer (an in-place update, an alias).
  buffers = []  # (alloc, offset, size, start, end, [values])
  for a in allocs:
    if a.resident or a.color < 0 or _is_host(a):
      continue
    slots: dict[tuple[int, int], list[tuple[int, int, str]]] = {}
    for value, offset, size in a.values:
      if value in ranges:
        slots.setdefault((offset, size), []).append((*ranges[value], value))
    for (offset, size), vals in slots.items():
      vals.sort()
      cur = None
      for s, e, v in vals:
        # Touching ranges are one buffer (an in-place update); so is a loop's initial
        # value and what the loop body writes into it later (the loop carries it).
        if cur is not None and (s <= cur[4] or _feeds_loop(prog, cur[5][-1])):
          cur[4] = max(cur[4], e)
          cur[5].append(v)
        else:
          cur = [a, offset, size, s, e, [v]]
          buffers.append(cur)
  events: dict[int, int] = {}
  for b in buffers:
    events[b[3]] = events.get(b[3], 0) + b[2]
    events[b[4] + 1] = events.get(b[4] + 1, 0) - b[2]
  best_t, best, cur_total = 0, -1, 0
  for t in sorted(events):
    cur_total += events[t]
    if cur_total > best:
      best, best_t = cur_total, t
  live = [b for b in buffers if b[3] <= best_t <= b[4]]
  backward = _backward_start(prog, ranges, horizon)
  rows: list[PeakRow] = []
  # Parameters, outputs, constants: resident for the whole step.
  root = {name: i for i, name in enumerate(prog.root)}
  for a in allocs:
    if not a.resident or a.color < 0 or a.size == 0:
      continue
    memory = "host" if _is_host(a) else "device"
    if memory == "host":
      continue
    values = [v for v, _, _ in a.values]
    if a.parameter is not None:
      i = a.parameter
      kind = leaf_kind[i] if i < len(leaf_kind) else "input"
      op = leaf_name[i] if i < len(leaf_name) else f"parameter {i}"
      rows.append(PeakRow(a.size, None, op, kind, None, values[0] if values else op))
      continue
    if a.constant:  # baked into the program: XLA counts it with the generated code
      continue
    outs = [root[v.split("{")[0]] for v in values if v.split("{")[0] in root]
    default = out_kind[0] if len(set(out_kind)) == 1 else "output"
    kind = out_kind[outs[0]] if outs and outs[0] < len(out_kind) else default
    now = [v for v in values if v in ranges and ranges[v][0] <= best_t <= ranges[v][1]]
    v = (now or values or ["?"])[-1]
    rows.append(_value_row(a.size, v, kind, prog, marks, "device"))
  for a, _, size, _, _, values in live:
    # The value the buffer holds at the peak (the earliest still live, when an
    # in-place op is writing over it there), named by any value it carried.
    now = [v for v in values if ranges[v][0] <= best_t <= ranges[v][1]] or values
    named = [x for x in now + values if prog.info.get(x.split("{")[0], ("", ""))[1]]
    v = (named or now)[0]  # label it by a value the compiler kept an op_name for
    start = min(ranges[x][0] for x in values)
    end = max(ranges[x][1] for x in values)
    kinds = [_temp_kind(prog, x) for x in values]
    kind = ("saved residual" if start < backward <= end  # made before the backward, read in it
            or "saved residual" in kinds else _temp_kind(prog, v))
    row = _value_row(size, ",".join(values), kind, prog, marks, _memory(a), v)
    name = row.name or next((n for n in (_value_row(0, x, "", prog, marks, "", x).name
                                         for x in values) if n), None)
    rows.append(dataclasses.replace(row, name=name))
  live_total = sum(r.bytes for r in rows)
  # The runtime reserves each temp allocation whole for the step; what the compiler
  # could not fill at this point (its packing of buffers over time) is held too.
  used: dict[int, int] = {}
  for a, _, size, _, _, _ in live:
    used[a.index] = used.get(a.index, 0) + size
  for a in allocs:
    if not a.resident and a.color >= 0 and not _is_host(a) and a.size > used.get(a.index, 0):
      rows.append(PeakRow(a.size - used.get(a.index, 0), None, None, "packing", None,
                          f"allocation {a.index}: temp not in use at the peak",
                          _memory(a)))
  total = sum(r.bytes for r in rows)
  by_kind: dict[str, int] = {}
  for r in rows:
    by_kind[r.kind] = by_kind.get(r.kind, 0) + r.bytes
  by_kind = dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))
  rows.sort(key=lambda r: -r.bytes)
  shown, rest = rows[:top], rows[top:]
  if rest:
    shown.append(PeakRow(sum(r.bytes for r in rest), None, None, "other", None,
                         f"{len(rest)} smaller buffers"))
  at = next((v for v, (s, _) in ranges.items() if s == best_t), f"step {best_t}")
  by_memory: dict[str, int] = {}
  for r in rows:
    by_memory[r.memory] = by_memory.get(r.memory, 0) + r.bytes
  return PeakReport(total, shown, target, at, compiler, by_kind, live_total, by_memory)


def _value_row(size: int, label: str, kind: str, prog: _dumps.Program, marks: Any, memory: str,
               value: str | None = None) -> PeakRow:
  instr = (value or label).split(",")[-1].split("{")[0]
  opcode, op_name, source = prog.info.get(instr, ("?", "", None))
  op = _primitive(op_name) or opcode
  return PeakRow(size, marks.name_of(op_name, op) if op_name else None, op, kind, source,
                 label, memory)


def _primitive(op_name: str) -> str | None:
  """The jaxpr primitive at the end of an HLO ``op_name`` ("jit(f)/jvp()/exp" -> "exp")."""
  if not op_name:
    return None
  last = op_name.rsplit("/", 1)[-1]
  return re.sub(r"\(.*\)$", "", last) or None


def _feeds_loop(prog: _dumps.Program, value: str) -> bool:
  """Whether ``value`` is a while loop's initial value (through tuples, bitcasts, ...)."""
  frontier, seen = [value.split("{")[0]], set()
  for _ in range(4):
    nxt = []
    for instr in frontier:
      for user in prog.users.get(instr, []):
        op = prog.info.get(user, ("",))[0]
        if op == "while":
          return True
        if op in ("tuple", "get-tuple-element", "bitcast", "copy") and user not in seen:
          seen.add(user)
          nxt.append(user)
    frontier = nxt
  return False


# Backward ops XLA often schedules early, before any forward work is done.
_EARLY = frozenset("broadcast_in_dim convert_element_type reshape iota".split())


def _backward_start(prog: _dumps.Program, ranges: dict[str, tuple[int, int]],
                    horizon: int) -> int:
  """When the backward pass starts: the first transpose op doing real work."""
  starts = [r[0] for v, r in ranges.items()
            if "transpose(" in (info := prog.info.get(v.split("{")[0], ("", "", None)))[1]
            and _primitive(info[1]) not in _EARLY]
  return min(starts, default=horizon)


def _temp_kind(prog: _dumps.Program, value: str) -> str:
  """Backward temporary (made by the transpose), saved residual (made in the forward
  pass and read by the backward), forward temporary, or temporary (neither)."""
  instr = value.split("{")[0]
  _, op_name, _ = prog.info.get(instr, ("", "", None))
  if "transpose(" in op_name:
    return "backward temporary"
  if "jvp(" in op_name:
    if "while/body" in op_name and _primitive(op_name) == "dynamic_update_slice":
      return "saved residual"  # a forward scan stacking what its backward reads
    readers = prog.users.get(instr, [])
    if any("transpose(" in prog.info.get(u, ("", "", None))[1] for u in readers):
      return "saved residual"
    return "forward temporary"
  return "temporary"


def _is_host(a: _dumps.Alloc) -> bool:
  return a.color == 5  # XLA's pinned-host memory space on GPU and TPU


def _memory(a: _dumps.Alloc) -> str:
  return "device" if a.color == 0 else "host" if a.color == 5 else "on-chip"
