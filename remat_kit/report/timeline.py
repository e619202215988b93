"""Memory over the compiled program's schedule: :func:`memory_timeline`.

:func:`~remat_kit.report.explain_peak` says what is live at one point, the peak;
the timeline says it at every point of the compiled schedule (XLA's live-range
order), from the same dumps and the same classification: the bytes of each kind
(parameter, activation, backward temporary, ...) live at each point, each
buffer's interval, size, `checkpoint_name`, op, shape and source line, and the
peak, whose total is ``explain_peak``'s ``peak_bytes`` exactly.

The total at a point is what the step holds there: the resident buffers
(parameters, outputs), the temp buffers live there, and the part of each temp
allocation the compiler's packing leaves unused there ("packing": the runtime
reserves a temp allocation whole). So the total is the same at every point (the
step's reservation) and the live bytes, the total less the packing, are the hump a
remat policy flattens. Host (offloaded) buffers are not counted, as in
``explain_peak``.

Outputs: :meth:`MemoryTimeline.to_html` (one self-contained page: no network),
:meth:`MemoryTimeline.to_png` (matplotlib) and :meth:`MemoryTimeline.to_dict`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from remat_kit import _args, targets
from remat_kit.report.buffers import instr_of, is_host
from remat_kit.report.compiled import Compilation, compilation
from remat_kit.report.peak import (
    KINDS,
    device_buffers,
    peak_of,
    peak_point,
    resident_rows,
    temp_rows,
)

__all__ = ["MemoryTimeline", "Timeline", "TimelineBuffer", "memory_timeline", "timeline_of"]

# Bottom to top in the stacked chart: what is resident for the whole step first, then
# the rest of explain_peak's kinds in its order.
_RESIDENT = ("parameter", "optimizer state", "input", "constant", "gradient", "output")
ORDER = _RESIDENT + tuple(k for k in KINDS if k not in _RESIDENT)


@dataclasses.dataclass(frozen=True)
class TimelineBuffer:
  """One buffer over the stretch of the schedule where its kind and label hold.

  Attributes:
    start: the first program point it is live at.
    end: the last (inclusive).
    bytes: its size.
    name: the `checkpoint_name` of the op that made it, or None.
    op: the jaxpr primitive that made it, or the argument's name.
    kind: one of :data:`remat_kit.report.tensor.KINDS` (parameter, activation, ...).
    shape: the HLO shape (``()`` where the dump does not say).
    dtype: the HLO dtype, or "".
    source: the user's source line that made it, where the compiler kept it.
    instruction: the HLO value(s) it holds.
    memory: "device", or "on-chip" for a TPU VMEM buffer.
    layer: the module path or scan body that made it, or "".
  """

  start: int
  end: int
  bytes: int
  name: str | None
  op: str | None
  kind: str
  shape: tuple[int, ...] = ()
  dtype: str = ""
  source: str | None = None
  instruction: str = ""
  memory: str = "device"
  layer: str = ""


@dataclasses.dataclass
class Timeline:
  """One compiled program's memory at each of its ``points`` program points.

  Attributes:
    label: the policy (or function) it is of.
    target: the target's name.
    points: how many program points the schedule has.
    by_kind: kind -> bytes live at each point (``points`` ints); "packing" is the
      temp memory reserved but not in use there. The kinds add up to :attr:`total`.
    buffers: every buffer, resident ones over the whole schedule.
    peak_point: the point of the peak (where the live bytes are highest).
    peak_bytes: the total there: ``explain_peak(...).peak_bytes``.
    backward: the point where the backward pass starts (``points`` if none).
    regions: ``(start, end, label)`` runs of points by phase and top scope,
      e.g. "forward · blocks (scan body)".
    ops: ``(start, end, label)`` runs by the scope of the op scheduled there.
    compiler: the compiler's own memory figures.
  """

  label: str
  target: str
  points: int
  by_kind: dict[str, list[int]]
  buffers: list[TimelineBuffer]
  peak_point: int
  peak_bytes: int
  backward: int
  regions: list[tuple[int, int, str]]
  ops: list[tuple[int, int, str]]
  compiler: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def total(self) -> list[int]:
    """The bytes held at each point (all kinds, packing included)."""
    return [int(x) for x in np.sum([np.asarray(v, np.int64) for v in self.by_kind.values()],
                                   axis=0)] if self.by_kind else [0] * self.points

  @property
  def live(self) -> list[int]:
    """The bytes in buffers at each point (the total less the packing)."""
    pack = self.by_kind.get("packing", [0] * self.points)
    return [t - p for t, p in zip(self.total, pack)]

  def live_at(self, point: int, kind: str | None = None) -> list[TimelineBuffer]:
    """The buffers live at ``point`` (of ``kind`` if given), largest first.

    Args:
      point: a program point, from 0 to ``points - 1``.
      kind: only buffers of this kind (``"activation"``, ...); None for all.
    """
    out = [b for b in self.buffers if b.start <= point <= b.end and kind in (None, b.kind)]
    return sorted(out, key=lambda b: -b.bytes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["regions"] = [list(r) for r in self.regions]
    d["ops"] = [list(r) for r in self.ops]
    for b in d["buffers"]:
      b["shape"] = list(b["shape"])
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Timeline:
    """The timeline that :meth:`to_dict` wrote.

    Args:
      d: a dict from :meth:`to_dict` (or its JSON, loaded).
    """
    d = dict(d)
    d["buffers"] = [TimelineBuffer(**dict(b, shape=tuple(b["shape"]))) for b in d["buffers"]]
    d["regions"] = [tuple(r) for r in d["regions"]]
    d["ops"] = [tuple(r) for r in d["ops"]]
    d["by_kind"] = {k: list(v) for k, v in d["by_kind"].items()}
    return cls(**d)


@dataclasses.dataclass
class MemoryTimeline:
  """One :class:`Timeline` per policy, compiled for one target, drawn on one scale.

  Attributes:
    timelines: label -> timeline, in the order given.
    target: the target's name.
    capacity_bytes: the device's memory (HBM per chip) where the target has a
      known chip, else None.
  """

  timelines: dict[str, Timeline]
  target: str
  capacity_bytes: int | None = None

  def __getitem__(self, label: str) -> Timeline:
    return self.timelines[label]

  @property
  def peaks(self) -> dict[str, int]:
    """label -> peak bytes."""
    return {k: t.peak_bytes for k, t in self.timelines.items()}

  def to_dict(self) -> dict[str, Any]:
    return {"target": self.target, "capacity_bytes": self.capacity_bytes,
            "timelines": {k: t.to_dict() for k, t in self.timelines.items()}}

  def to_json(self, **kwargs: Any) -> str:
    """:meth:`to_dict` as a JSON string.

    Args:
      **kwargs: options of ``json.dumps`` (``indent=1``, ...).
    """
    return json.dumps(self.to_dict(), **kwargs)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> MemoryTimeline:
    """The timelines that :meth:`to_dict` wrote.

    Args:
      d: a dict from :meth:`to_dict` (or its JSON, loaded).
    """
    return cls({k: Timeline.from_dict(t) for k, t in d["timelines"].items()}, d["target"],
               d.get("capacity_bytes"))

  def to_html(self, path: str | None = None, title: str | None = None) -> str:
    """The page (one self-contained HTML file); written to ``path`` if given.

    Args:
      path: the file to write (UTF-8); None to only return the page.
      title: the page's title; None for "memory timeline on <target>".

    Returns:
      The HTML text.
    """
    from remat_kit.report.timeline_html import render

    html = render(self, title or f"memory timeline on {self.target}")
    if path is not None:
      with open(path, "w", encoding="utf-8") as f:
        f.write(html)
    return html

  def to_png(self, path: str, dpi: int = 120) -> str:
    """The stacked chart, one panel per policy on one scale, as a PNG at ``path``.

    Args:
      path: the PNG file to write.
      dpi: its resolution in dots per inch (120 by default).

    Returns:
      ``path``.
    """
    from remat_kit.report.timeline_plot import plot

    plot(self, path, dpi)
    return path


def memory_timeline(fn: Callable[..., Any] | Mapping[str, Callable[..., Any]], *args: Any,
                    target: Any = None, policies: Mapping[str, Any] | None = None,
                    argnums: int | Sequence[int] = 0, grad: bool = True,
                    arg_kinds: Sequence[str] | None = None,
                    out_kinds: Sequence[str] | None = None,
                    compiler_options: dict[str, Any] | None = None,
                    donate_argnums: int | Sequence[int] = (),
                    fn_kwargs: Mapping[str, Any] | None = None,
                    static_argnames: Sequence[str] = (),
                    **stray: Any) -> MemoryTimeline:
  """The compiled gradient's (or step's) memory at every point of its schedule.

  Args:
    fn: a scalar loss (its gradient is compiled), or with ``grad=False`` a whole
      step; or a dict ``{label: fn}`` of such functions, one timeline each.
    *args: arrays or ``jax.ShapeDtypeStruct``s.
    target: where to compile (see :mod:`remat_kit.targets`).
    policies: ``{label: policy}``: one timeline per policy, each of ``fn`` called
      with ``policy=`` that value (``fn(*args, policy=value, **fn_kwargs)``), e.g.
      ``{"none": False, "full": True, "save_dots": "save_dots"}`` for a loss that
      builds its model with ``GPT(..., policy=policy)``.
    argnums: the arguments the gradient is taken for (as ``explain_peak``'s).
    grad: compile ``jax.grad(fn)`` (default) or ``fn`` itself, a whole step.
    arg_kinds: the kind of each positional argument's buffers (as ``explain_peak``'s).
    out_kinds: with ``grad=False``, the kind of each top-level output.
    compiler_options: more options for the compile.
    donate_argnums: with ``grad=False``, arguments the outputs may reuse.
    fn_kwargs: keyword arguments of ``fn`` (not differentiated).
    static_argnames: those of ``fn_kwargs`` passed as Python values, not traced.

  Returns:
    A :class:`MemoryTimeline`: ``.timelines[label]`` (a :class:`Timeline`),
    ``.peaks``, ``.to_html(path)``, ``.to_png(path)``, ``.to_dict()``.

  Raises:
    TypeError: ``fn`` is neither callable nor a dict of callables, or ``policies``
      is not a dict, or is given with a dict ``fn``.

  Example:
    >>> import jax.numpy as jnp, remat_kit as rk
    >>> def loss(w, x, policy=False):
    ...   layer = rk.remat(lambda w, x: jnp.tanh(jnp.sin(x @ w) @ w), policy=policy)
    ...   for _ in range(4):
    ...     x = layer(w, x)
    ...   return jnp.sum(x)
    >>> w, x = jnp.ones((256, 256)), jnp.ones((512, 256))
    >>> tl = rk.memory_timeline(loss, w, x, policies={"none": False, "full": True})
    >>> tl.peaks["full"] < 0.7 * tl.peaks["none"]
    True
    >>> tl.peaks["none"] == rk.explain_peak(loss, w, x).peak_bytes
    True
  """
  kwargs = _args.fn_kwargs_of("memory_timeline", fn_kwargs, stray)
  fns = _functions(fn, policies)
  options: dict[str, Any] = dict(argnums=argnums, grad=grad, arg_kinds=arg_kinds, out_kinds=out_kinds,
                 compiler_options=compiler_options, donate_argnums=donate_argnums,
                 static_argnames=static_argnames)
  t = targets.parse_target(target)
  out = {label: timeline_of(compilation(f, args, kwargs, target=target, api="memory_timeline",
                                        **options), label)
         for label, f in fns.items()}
  chip = t.chip
  return MemoryTimeline(out, t.name, chip.hbm_bytes if chip is not None else None)


def _functions(fn: Any, policies: Any) -> dict[str, Callable[..., Any]]:
  if isinstance(fn, Mapping):
    if policies is not None:
      raise TypeError("`memory_timeline`: give either a dict of functions as `fn` or "
                      "`policies` for one function, not both.")
    bad = {k: v for k, v in fn.items() if not callable(v) or not isinstance(k, str)}
    if bad or not fn:
      raise TypeError(f"`memory_timeline`: `fn` as a dict must map str labels to "
                      f"functions, got {dict(fn)!r}.")
    return dict(fn)
  if not callable(fn):
    raise TypeError(f"`memory_timeline`: `fn` must be callable or a dict of label -> "
                    f"function, got {fn!r}.")
  if policies is None:
    return {getattr(fn, "__name__", "fn"): fn}
  if not isinstance(policies, Mapping) or not policies or \
      not all(isinstance(k, str) for k in policies):
    raise TypeError(f"`memory_timeline`: `policies` must be a non-empty dict of label -> "
                    f"policy (each passed to `fn` as `policy=`), got {policies!r}.")
  return {k: functools.partial(fn, policy=p) for k, p in policies.items()}


def timeline_of(c: Compilation, label: str = "fn", api: str = "memory_timeline") -> Timeline:
  """The :class:`Timeline` of a compilation (the classification of ``explain_peak``
  applied at every point: each temp buffer is classified where what it holds changes).

  Args:
    c: the compilation (:func:`~remat_kit.report.compilation`).
    label: the timeline's label ("fn" by default).
  """
  bufs = device_buffers(c)
  n = max([c.horizon] + [b.end + 1 for b in bufs])
  diff: dict[str, np.ndarray] = {}
  rows: list[TimelineBuffer] = []

  def add(kind: str, lo: int, hi: int, size: int) -> None:  # [lo, hi)
    d = diff.setdefault(kind, np.zeros(n + 1, np.int64))
    d[lo] += size
    d[hi] -= size

  best = peak_point(c)
  for r in resident_rows(c, best):
    add(r.kind, 0, n, r.bytes)
    rows.append(TimelineBuffer(0, n - 1, r.bytes, r.name, r.op, r.kind, source=r.source,
                               instruction=r.instruction, memory=r.memory, layer=r.layer))
  used: dict[int, np.ndarray] = {}
  for b in bufs:
    u = used.setdefault(b.alloc.index, np.zeros(n + 1, np.int64))
    u[b.start] += b.size
    u[b.end + 1] -= b.size
    cuts = sorted({b.start, b.end + 1} | {x for v in b.values for x in
                                          (c.ranges[v][0], c.ranges[v][1] + 1)
                                          if b.start < x <= b.end})
    pieces: list[list[Any]] = []
    for lo, hi in zip(cuts, cuts[1:]):
      these = temp_rows(c, b, lo)
      key = tuple((r.kind, r.name, r.op, r.source, r.bytes) for r in these)
      if pieces and pieces[-1][2] == key:
        pieces[-1][1] = hi
      else:
        pieces.append([lo, hi, key, these])
    # What the forward pass leaves the backward is labelled as `residuals()` labels it
    # (a scan's stacked residual by the slices it holds, not by the loop; a split matmul
    # as its tensor and its partial sums).
    for lo, hi, _, these in pieces:
      for row in these:
        add(row.kind, lo, hi, row.bytes)
        dtype, shape = (row.dtype, row.shape) if row.dtype else _shape(c, row.instruction,
                                                                        row.bytes)
        rows.append(TimelineBuffer(lo, hi - 1, row.bytes, row.name, row.op, row.kind, shape,
                                   dtype, row.source, row.instruction, row.memory, row.layer))
  # The packing: each temp allocation less what is in use in it, point by point (as
  # `packing_rows` at the peak).
  pack = np.zeros(n, np.int64)
  for a in c.allocs:
    if not a.resident and a.color >= 0 and not is_host(a):
      in_use = np.cumsum(used[a.index])[:n] if a.index in used else np.zeros(n, np.int64)
      pack += np.maximum(a.size - in_use, 0)
  by_kind = {k: [int(x) for x in np.cumsum(d)[:n]] for k, d in diff.items()}
  if pack.any():
    by_kind["packing"] = [int(x) for x in pack]
  by_kind = {k: by_kind[k] for k in sorted(by_kind, key=_rank)}
  report = peak_of(c, 1, api=api)
  rows.sort(key=lambda r: (r.start, -r.bytes))
  regions, ops = _scopes(c, n)
  return Timeline(label, c.target.name, n, by_kind, rows, best, report.peak_bytes,
                  min(c.backward, n), regions, ops, dict(c.compiler))


def _rank(kind: str) -> int:
  return ORDER.index(kind) if kind in ORDER else len(ORDER) + KINDS.index(kind) \
      if kind in KINDS else len(ORDER) + len(KINDS)


def _shape(c: Compilation, instruction: str, size: int) -> tuple[str, tuple[int, ...]]:
  shape = c.hlo.shape_of(instruction.split(",")[-1]) if instruction else None
  if not shape:
    return "", ()
  dtype, dims = shape
  try:
    item = np.dtype(dtype).itemsize
  except TypeError:
    item = 0
  return (dtype, dims) if int(np.prod(dims, dtype=np.int64)) * item in (size, 0) else (dtype, ())


_SKIP = re.compile(r"\(|^eval_jaxpr$|^rk[sn]\d+$|^(checkpoint|remat2?|cond|branch_\d+)$")


def scope_of(op_name: str) -> tuple[str, str, str]:
  """``(phase, top scope, full scope)`` of an HLO op_name: the phase is "forward"
  (``jvp``), "backward" (``transpose``) or "" (neither: a step's update); the scopes are
  the module path without JAX's transforms, a scan's body shown as "(scan body)"."""
  parts = op_name.split("/")[1:-1] if "/" in op_name else []
  phase = ("backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name
           else "")
  path: list[str] = []
  for i, p in enumerate(parts):
    if p == "while":
      nxt = parts[i + 1] if i + 1 < len(parts) else ""
      path.append("(scan body)" if nxt == "body" else "(scan)")
    elif p in ("body", "cond") and i and parts[i - 1] == "while":
      continue
    elif not _SKIP.search(p):
      path.append(p)
  top = " ".join(path[:2]) if len(path) > 1 and path[1].startswith("(") else \
      (path[0] if path else "")
  return phase, top, "/".join(path).replace("/(", " (")


def _scopes(c: Compilation, n: int) -> tuple[list[tuple[int, int, str]],
                                              list[tuple[int, int, str]]]:
  """Runs of program points by region (phase, top scope) and by op scope."""
  at: dict[int, str] = {}
  for v, (s, _) in c.ranges.items():
    op_name = c.hlo.info.get(instr_of(v), ("", "", None))[1]
    if op_name and (s not in at or len(op_name) > len(at[s])):
      at[s] = op_name
  regions: list[tuple[int, int, str]] = []
  ops: list[tuple[int, int, str]] = []
  cur = ("", "", "")
  for t in range(n):
    if t in at:
      cur = scope_of(at[t])
    region = " · ".join(x for x in cur[:2] if x) or "step"
    op = " · ".join(x for x in (cur[0], cur[2]) if x) or "step"
    for runs, label in ((regions, region), (ops, op)):
      if runs and runs[-1][2] == label:
        runs[-1] = (runs[-1][0], t, label)
      else:
        runs.append((t, t, label))
  return regions, ops
