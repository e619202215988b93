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
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from remat_kit import _args, targets
from remat_kit import _xla as _dumps
from remat_kit.report.buffers import (
  backward_start,
  buffer_kind,
  feeds_loop,
  instr_of,
  is_host,
  memory_of,
  name_of,
  primitive,
  temp_kind,
)
from remat_kit.report.compiled import (
  Compilation,
  compilation,
  layer_of,
)
from remat_kit.report.table import format_bytes, format_table, short_layer
from remat_kit.report.tensor import Tensor

__all__ = ["PeakReport", "PeakRow", "explain_peak", "peak_of"]

# The kinds a peak row can have, in the order tables list them (the whole vocabulary,
# with the residual rows' kinds: remat_kit.report.tensor.KINDS).
KINDS = ("parameter", "input", "optimizer state", "gradient", "output", "constant",
         "activation", "backward temporary", "forward temporary", "temporary",
         "split-K partials", "workspace", "copy context", "prefetch", "tuple table",
         "packing", "other")


@dataclasses.dataclass(frozen=True)
class PeakRow:
  """One buffer live at the peak.

  Attributes:
    bytes: its size (counted once however many values share it).
    name: the `checkpoint_name` of the op that made it, or None.
    op: the jaxpr primitive (from the HLO ``op_name``) or the argument name.
    kind: one of :data:`remat_kit.report.tensor.KINDS`: parameter, input,
      optimizer state, gradient, output, constant, activation (made in the forward
      pass, read by the backward), backward temporary, forward temporary,
      temporary (neither), a buffer that is no tensor of the model (split-K
      partials, workspace, copy context, prefetch, tuple table), packing (temp
      memory the compiler reserved but could not fill at this point), other.
    source: the user's source line that made it, where the compiler kept it.
    instruction: the HLO instruction(s) whose value it holds.
    memory: "device", or "on-chip" for a TPU VMEM buffer.
    shape: its shape (``()`` where the dump does not say).
    dtype: its dtype name, or "".
    layer: the module path or scan body that made it, or "".
  """

  bytes: int
  name: str | None
  op: str | None
  kind: str
  source: str | None
  instruction: str
  memory: str = "device"
  shape: tuple[int, ...] = ()
  dtype: str = ""
  layer: str = ""

  @property
  def tensor(self) -> Tensor:
    """The row as the shared tensor record."""
    return Tensor(self.op or "", self.source or "", self.layer, tuple(self.shape), self.dtype,
                  self.bytes, self.kind, self.name)


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
                      "source": r.source, "instruction": r.instruction, "memory": r.memory,
                      "shape": list(r.shape), "dtype": r.dtype, "layer": r.layer}
                     for r in self.rows]}

  def to_json(self, **kwargs: Any) -> str:
    return json.dumps(self.to_dict(), **kwargs)

  def table(self) -> str:
    total = max(self.peak_bytes, 1)
    kinds = [[k, format_bytes(b), f"{100 * b / total:.0f}%"] for k, b in self.by_kind.items()]
    rows = [[format_bytes(r.bytes), r.kind, r.op or "-", r.name or "-",
             short_layer(r.layer),
             (r.source or "-").split(" (")[0],
             (("x".join(map(str, r.shape)) or "()") + " " + r.dtype) if r.dtype else "-",
             r.memory if r.memory != "device" else ""]
            for r in self.rows]
    return "\n".join([
        f"== peak {format_bytes(self.peak_bytes)} on {self.target}, at {self.at} ==",
        format_table(["kind", "bytes", "share"], kinds, align="lrr"), "",
        format_table(["bytes", "kind", "op", "name", "layer", "source", "shape", "memory"],
                     rows, align="rlllllll")])

  def __str__(self) -> str:
    return self.table()


def explain_peak(fn: Callable[..., Any], *args: Any, target: Any = None, top: int = 20,
                 argnums: int | Sequence[int] = 0, grad: bool = True,
                 arg_kinds: Sequence[str] | None = None,
                 out_kinds: Sequence[str] | None = None,
                 compiler_options: dict[str, Any] | None = None,
                 donate_argnums: int | Sequence[int] = (),
                 fn_kwargs: Mapping[str, Any] | None = None, static_argnames: Sequence[str] = (),
                 **stray: Any) -> PeakReport:
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
    static_argnames: keyword arguments of ``fn`` passed as Python values, not traced
      (a ``train`` flag); strings and other values JAX cannot trace are static anyway.

  Returns:
    A :class:`PeakReport`; ``to_dict()`` is ``{"peak_bytes", "rows": [{"bytes",
    "name", "op", "kind", "source"}, ...], ...}``.

  Example:
    >>> import jax.numpy as jnp, remat_kit as rk
    >>> def loss(w, x):
    ...   y = rk.checkpoint_name(jnp.exp(x @ w), "wide")
    ...   return jnp.sum(jnp.tanh(y) @ w.T)
    >>> rep = rk.report.explain_peak(loss, jnp.ones((64, 1024)), jnp.ones((32, 64)))
    >>> any(r.name == "wide" and r.kind == "activation" for r in rep.rows)
    True
  """
  kwargs = _args.fn_kwargs_of("explain_peak", fn_kwargs, stray)
  c = compilation(fn, args, kwargs, target=target, argnums=argnums, grad=grad,
                  arg_kinds=arg_kinds, out_kinds=out_kinds, compiler_options=compiler_options,
                  donate_argnums=donate_argnums, api="explain_peak",
                  static_argnames=static_argnames)
  return peak_of(c, top, api="explain_peak")


def peak_of(c: Compilation, top: int = 20, api: str = "explain_peak") -> PeakReport:
  """The :class:`PeakReport` of a compilation, reconciled with the compiler's figures;
  errors name ``api``, the readout the user called."""
  _args.int_at_least(api, "top", top, 1)
  report = _explain(c, top)
  _reconcile(report, c.target, api)
  return report


def _reconcile(report: PeakReport, t: targets.Target, api: str = "explain_peak") -> None:
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
      f"`{api}`: on {t.name}, the buffers read from the compiler's dumps add up to "
      f"{got:,} bytes at the peak, but its memory analysis says {want}. This JAX/XLA "
      f"(jax {jax.__version__}) lays out its dumps in a way remat_kit does not read "
      "correctly; please report it with your JAX version. Compiler figures: "
      f"{dict(c)}.")


# --------------------------------------------------------------------------
# The peak
# --------------------------------------------------------------------------
def _explain(c: Compilation, top: int) -> PeakReport:
  ranges = c.ranges
  best_t = peak_point(c)
  live = [b for b in device_buffers(c) if b.start <= best_t <= b.end]
  rows = resident_rows(c, best_t) + [r for b in live for r in temp_rows(c, b, best_t)]
  live_total = sum(r.bytes for r in rows)
  rows += packing_rows(c, live)
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
  return PeakReport(total, shown, c.target.name, at, dict(c.compiler), by_kind, live_total,
                    by_memory)


# The pieces of the peak, shared with :mod:`remat_kit.report.timeline` (which asks them
# at every program point, so its peak is this report's).
def device_buffers(c: Compilation) -> list[Any]:
  """The temp buffers in device memory (on-chip too): host buffers are not counted."""
  return [b for b in c.buffers if not is_host(b.alloc)]


def peak_point(c: Compilation) -> int:
  """The program point where the live temp buffers add up to the most (the first such)."""
  events: dict[int, int] = {}
  for b in device_buffers(c):
    events[b.start] = events.get(b.start, 0) + b.size
    events[b.end + 1] = events.get(b.end + 1, 0) - b.size
  best_t, best, cur_total = 0, -1, 0
  for t in sorted(events):
    cur_total += events[t]
    if cur_total > best:
      best, best_t = cur_total, t
  return best_t


def resident_rows(c: Compilation, t: int) -> list[PeakRow]:
  """Parameters, outputs and constants: resident for the whole step, labelled by their
  value at ``t``. Constants are what the function closes over (arrays it does not take
  as arguments); the compiler's total allocation counts them."""
  prog, ranges = c.hlo, c.ranges
  leaf_kind, leaf_name, out_kind = c.leaf_kind, c.leaf_name, c.out_kind
  rows: list[PeakRow] = []
  root = {name: i for i, name in enumerate(prog.root)}
  for a in c.allocs:
    if not a.resident or a.color < 0 or a.size == 0 or is_host(a):
      continue
    values = [v for v, _, _ in a.values]
    if a.parameter is not None:
      i = a.parameter
      kind = leaf_kind[i] if i < len(leaf_kind) else "input"
      op = leaf_name[i] if i < len(leaf_name) else f"parameter {i}"
      shape = prog.shape_of(values[0]) if values else None
      dtype, dims = shape if shape else ("", ())
      rows.append(PeakRow(a.size, None, op, kind, f"argument {op}",
                          values[0] if values else op, "device", dims, dtype))
      continue
    if a.constant:
      rows.append(_value_row(a.size, values[0] if values else "constant", "constant", prog,
                             c.marks, "device"))
      continue
    outs = [root[v.split("{")[0]] for v in values if v.split("{")[0] in root]
    default = out_kind[0] if len(set(out_kind)) == 1 else "output"
    kind = out_kind[outs[0]] if outs and outs[0] < len(out_kind) else default
    now = [v for v in values if v in ranges and ranges[v][0] <= t <= ranges[v][1]]
    v = (now or values or ["?"])[-1]
    rows.append(_value_row(a.size, v, kind, prog, c.marks, "device"))
  return rows


def held_value(c: Compilation, b: Any, t: int) -> str:
  """The value temp buffer ``b`` holds at ``t`` (the earliest still live, when an in-place
  op is writing over it there), named by any value it carried."""
  prog, ranges, values = c.hlo, c.ranges, list(b.values)
  now = [v for v in values if ranges[v][0] <= t <= ranges[v][1]] or values
  named = [x for x in now + values if prog.info.get(x.split("{")[0], ("", ""))[1]]
  return (named or now)[0]  # label it by a value the compiler kept an op_name for


def temp_rows(c: Compilation, b: Any, t: int) -> list[PeakRow]:
  """The rows of temp buffer ``b`` at program point ``t``: what the forward leaves the
  backward is named as :meth:`Compilation.residuals` names it (a scan's stacked value by
  the slices it holds, a split matmul as its tensor and its partial sums); every other
  value by the op that made it. The rows' bytes add up to the buffer's."""
  prog, values = c.hlo, list(b.values)
  v = held_value(c, b, t)
  kinds = [temp_kind(prog, x) for x in values]
  kind = ("activation" if c.carried(b)  # made before the backward, read in it
          or "activation" in kinds else temp_kind(prog, v))
  row = _value_row(b.size, ",".join(values), kind, prog, c.marks, memory_of(b.alloc), v)
  name = row.name or next((n for x in values if (n := name_of(prog, c.marks, x))), None)
  row = dataclasses.replace(row, name=name)
  if kind == "activation" and c.carried(b):
    return [dataclasses.replace(row, name=row.name or res.name, op=res.primitive or row.op,
                                source=res.source, shape=res.shape, dtype=res.dtype,
                                layer=res.layer, kind=res.kind, bytes=res.bytes)
            for res in c.residual_rows(b)]
  made = prog.producer(v, b.size) or instr_of(v)
  other = buffer_kind(prog, v, made, prog.own(made)[0], row.dtype)
  if other not in ("activation", "argument"):  # no tensor of the model: say what it is
    row = dataclasses.replace(row, kind=other)
  arg = prog.argument_of(made) if prog.own(made)[0] == "parameter" else None
  if arg is not None and arg < len(c.leaf_name):  # XLA's name for it is "xs[1]"
    row = dataclasses.replace(row, op=c.leaf_name[arg])
  return [row]


def packing_rows(c: Compilation, live: Sequence[Any]) -> list[PeakRow]:
  """The runtime reserves each temp allocation whole for the step; what the compiler
  could not fill while ``live`` are live (its packing of buffers over time) is held too."""
  used: dict[int, int] = {}
  for b in live:
    used[b.alloc.index] = used.get(b.alloc.index, 0) + b.size
  return [PeakRow(a.size - used.get(a.index, 0), None, None, "packing", None,
                  f"allocation {a.index}: temp not in use at the peak", memory_of(a))
          for a in c.allocs
          if not a.resident and a.color >= 0 and not is_host(a)
          and a.size > used.get(a.index, 0)]


def _value_row(size: int, label: str, kind: str, prog: _dumps.Program, marks: Any, memory: str,
               value: str | None = None) -> PeakRow:
  held = value or label.split(",")[-1]
  instr = held.split("{")[0]
  opcode, op_name, source = prog.info.get(instr, ("?", "", None))
  made = prog.producer(held, size)
  if made is not None and prog.own(made)[1]:
    opcode, op_name, source = prog.own(made)
  op = _primitive(op_name) or opcode
  shape = prog.shape_of(held)
  dtype, dims = shape if shape else ("", ())
  return PeakRow(size, name_of(prog, marks, instr), op, kind, source, label, memory, dims,
                 dtype, layer_of(op_name))


# Shared with the other readouts (kept under their old names here).
_primitive = primitive
_feeds_loop = feeds_loop
_backward_start = backward_start
_temp_kind = temp_kind
_is_host = is_host
_memory = memory_of
