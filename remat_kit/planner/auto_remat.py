"""`auto_remat`: per-tensor remat of any JAX loss, to a byte budget.

``plan = rk.auto_remat(loss, *args, budget="2GiB")`` traces ``loss`` once, finds
its layers and the tensors its backward reads (:mod:`~remat_kit.planner.tensors`),
chooses which to save, offload or recompute with an exact solver
(:mod:`~remat_kit.planner.milp`), and returns a :class:`Plan`: ``plan.fn`` has
``loss``'s signature and the same gradients, and keeps what was chosen.

How a plan is applied: each segment (a layer of a Python loop, a scan body)
becomes one ``rk.remat`` boundary, so the backward recomputes one layer at a
time; inside it the segment runs as a ``jax.custom_jvp`` whose rule evaluates the
segment's JVP jaxpr with a ``checkpoint_name`` (``rk_auto:<segment>:<index>``) on
each chosen tensor, and the boundary's policy saves (or offloads) exactly those
names. Naming the JVP's tensors, not the forward's, is what lets a plan keep what
a derivative reads (``1 - tanh(x)**2``, a relu mask, softmax's output inside its
``custom_jvp``) instead of the value before it.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from remat_kit import _args, _jax, _jaxpr, targets
from remat_kit.planner.milp import Costs, Evaluation, Program, evaluate
from remat_kit.planner.result import parse_bytes
from remat_kit.planner.tensors import PREFIX, Segment, TensorGraph, segment_body, tensor_graph
from remat_kit.policies import SaveNothing, SaveOrOffloadNames
from remat_kit.report.tensor import Tensor
from remat_kit.transforms import remat

__all__ = ["PREFIX", "Plan", "PlanRow", "Planner", "auto_remat", "auto_remat_frontier"]

BUDGET_KINDS = ("saved", "temp", "peak")


@dataclasses.dataclass(frozen=True)
class PlanRow:
  """One tensor of a plan's table.

  Attributes:
    key: its generated `checkpoint_name`.
    tensor: its record (op, source line, layer, shape, dtype, bytes).
    action: "save", "offload" or "recompute" (what the backward does for it).
    recompute_flops: FLOPs of the equation that makes it, over all iterations
      (what recomputing it costs, its inputs aside).
  """

  key: str
  tensor: Tensor
  action: str
  recompute_flops: int

  def to_dict(self) -> dict[str, Any]:
    return {"key": self.key, **self.tensor.to_dict(), "action": self.action,
            "recompute_flops": self.recompute_flops}


@dataclasses.dataclass
class Plan:
  """A per-tensor remat plan (see :func:`auto_remat`).

  Attributes:
    fn: the loss with the plan applied: same signature, same gradients.
    budget: the budget asked for, in bytes (None: the frontier's knee).
    budget_kind: "saved", "temp" or "peak".
    target: the compile target's name.
    saved_bytes: device bytes handed to the backward (layer inputs included).
    offloaded_bytes: bytes offloaded to host memory.
    recompute_flops: FLOPs the backward recomputes.
    recompute_matmul_flops: of those, matmuls and convolutions.
    temp_bytes: the compiled gradient's temp bytes on ``target`` (None if not
      compiled: ``budget_kind="saved"`` without ``compile=True``).
    peak_bytes: its peak (temp plus arguments and outputs, or the compiler's).
    estimated_seconds: the target's roofline step time (accelerators only).
    rows: the per-tensor table: every tensor the backward reads.
    segments: the layers found, in order (label, iterations).
    solver: what the solver reported (status, seconds, gap, size), per solve.
    seconds: the planning time.
  """

  fn: Callable[..., Any]
  budget: int | None
  budget_kind: str
  target: str
  saved_bytes: int
  offloaded_bytes: int
  recompute_flops: int
  recompute_matmul_flops: int
  temp_bytes: int | None
  peak_bytes: int | None
  estimated_seconds: float | None
  rows: list[PlanRow]
  segments: list[tuple[str, int]]
  solver: list[dict[str, Any]]
  seconds: float
  frontier: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  def __repr__(self) -> str:
    return (f"Plan(budget={self.budget!r}, budget_kind={self.budget_kind!r}, "
            f"target={self.target!r}, saved_bytes={self.saved_bytes}, "
            f"offloaded_bytes={self.offloaded_bytes}, recompute_flops={self.recompute_flops}, "
            f"temp_bytes={self.temp_bytes}, tensors={len(self.rows)})")

  @property
  def saved(self) -> list[str]:
    return [r.key for r in self.rows if r.action == "save"]

  @property
  def offloaded(self) -> list[str]:
    return [r.key for r in self.rows if r.action == "offload"]

  def table(self, limit: int | None = 30) -> str:
    """The per-tensor table as text: the largest tensors first."""
    from remat_kit.report.table import format_bytes, format_table

    rows = sorted(self.rows, key=lambda r: -r.tensor.bytes)
    shown = rows if limit is None else rows[:limit]
    body = [[r.tensor.layer, r.tensor.op, r.tensor.name or "", r.tensor.source or "-",
             "x".join(map(str, r.tensor.shape)) + " " + r.tensor.dtype,
             format_bytes(r.tensor.bytes), r.action, f"{r.recompute_flops:,}"]
            for r in shown]
    head = (f"auto_remat plan ({self.budget_kind} budget "
            f"{'-' if self.budget is None else format_bytes(self.budget)}, {self.target}): "
            f"saved {format_bytes(self.saved_bytes)}, offloaded "
            f"{format_bytes(self.offloaded_bytes)}, recompute {self.recompute_flops:,} FLOPs"
            + ("" if self.temp_bytes is None else
               f", compiled temp {format_bytes(self.temp_bytes)}"))
    more = f"\n... {len(rows) - len(shown)} more rows" if len(rows) > len(shown) else ""
    return head + "\n" + format_table(
        ["layer", "op", "name", "source", "shape", "bytes", "action", "op FLOPs"], body) + more

  def to_dict(self) -> dict[str, Any]:
    return {
        "budget": self.budget, "budget_kind": self.budget_kind, "target": self.target,
        "saved_bytes": self.saved_bytes, "offloaded_bytes": self.offloaded_bytes,
        "recompute_flops": self.recompute_flops,
        "recompute_matmul_flops": self.recompute_matmul_flops,
        "temp_bytes": self.temp_bytes, "peak_bytes": self.peak_bytes,
        "estimated_seconds": self.estimated_seconds,
        "segments": [list(s) for s in self.segments], "solver": self.solver,
        "seconds": self.seconds, "rows": [r.to_dict() for r in self.rows],
        "frontier": self.frontier,
    }


# --------------------------------------------------------------------------
# Applying a choice: the rewritten loss
# --------------------------------------------------------------------------
def apply(graph: TensorGraph, saved: set[str], offloaded: set[str],
          offload_kinds: tuple[str, str] = ("device", "pinned_host"),
          argnums: Sequence[int] = (0,), api: str = "auto_remat") -> Callable[..., Any]:
  """The loss of ``graph`` with ``saved`` and ``offloaded`` tensors kept, the rest
  recomputed, one segment (remat boundary) at a time."""
  wrapped = [_segment_fn(graph, seg, saved, offloaded, offload_kinds, argnums, api)
             for seg in graph.segments]
  avals = [(tuple(np.shape(x)), str(x.dtype)) for x in graph.leaves]
  in_tree = graph.in_tree

  def fn(*args: Any) -> Any:
    leaves, tree = jax.tree_util.tree_flatten(tuple(args))
    got = [(tuple(np.shape(x)), str(getattr(x, "dtype", type(x).__name__))) for x in leaves]
    if tree != in_tree or got != avals:
      raise ValueError(
          f"`{api}`: the plan was made for arguments {_describe(in_tree, avals)}; this call "
          f"passes {_describe(tree, got)}. A plan is for the shapes it was planned at: call "
          f"`rk.{api}` again with these arguments.")
    env: dict[Any, Any] = dict(zip(graph.jaxpr.constvars, graph.consts))
    env.update(zip(graph.jaxpr.invars, leaves))
    read = lambda v: v.val if isinstance(v, _jaxpr.Literal) else env[v]
    for seg, run in zip(graph.segments, wrapped):
      outs = run([read(v) for v in seg.in_vars] if seg.scan is None
                 else [read(v) for v in seg.scan.invars])
      env.update(zip(seg.out_vars if seg.scan is None else seg.scan.outvars, outs))
    outs = [read(v) for v in graph.jaxpr.outvars]
    return jax.tree_util.tree_unflatten(graph.out_tree, outs)

  return fn


def _describe(tree: Any, avals: list[tuple[tuple[int, ...], str]]) -> str:
  shown = ", ".join(f"{d}{list(s)}" for s, d in avals[:6])
  return f"{tree.num_leaves} leaves ({shown}{', ...' if len(avals) > 6 else ''})"


def _segment_fn(graph: TensorGraph, seg: Segment, saved: set[str], offloaded: set[str],
                offload_kinds: tuple[str, str], argnums: Sequence[int], api: str
                ) -> Callable[[list[Any]], list[Any]]:
  run, _ = segment_body(graph, seg)
  keys = {v: n.key for v, n in seg.nodes.items()
          if n.candidate and (n.key in saved or n.key in offloaded)}
  save = tuple(sorted(k for k in keys.values() if k in saved))
  off = tuple(sorted(k for k in keys.values() if k in offloaded))
  jvp, consts, diff = seg.jvp, seg.consts, seg.diff
  n_nd = diff.count(False)

  @jax.custom_jvp
  def body(*xs: Any) -> list[Any]:
    return run(*xs)

  def rule(primals: Sequence[Any], tangents: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    nds, dps, dts = [], [], []
    for x, t, d in zip(primals, tangents, diff):
      if d:
        dps.append(x)
        dts.append(_zeros_like(x) if _jax.is_symbolic_zero(t) else t)
      elif not _jax.is_symbolic_zero(t):
        raise ValueError(
            f"`{api}`: the plan was made for gradients with respect to arguments "
            f"{tuple(argnums)}, but this call differentiates a value that depends on other "
            f"arguments too (in {seg.label}). Plan again with `argnums` naming every "
            "argument you differentiate.")
      else:
        nds.append(x)
    outs = _eval_named(jvp, consts, [*nds, *dps, *dts], keys)
    half = len(outs) // 2
    return outs[:half], outs[half:]

  body.defjvp(rule, symbolic_zeros=True)
  if save or off:
    policy: Any = SaveOrOffloadNames(save, off, *offload_kinds)
  else:
    policy = SaveNothing()
  del n_nd
  # Always JAX's classic remat: jax_remat3 (through JAX 0.12) applies a policy to the
  # forward program, where the names inside a custom_jvp rule do not exist yet, and so
  # would recompute what the plan saves. Built and called under it (JAX 0.10.2 and 0.11
  # pick the implementation when a wrapper is built, 0.12 when it is called).
  with _jax.remat3(False):
    ck_ = remat(lambda *xs: body(*xs), policy=policy, prevent_cse=seg.scan is None,
                check_names=False)

  def ck(*xs: Any) -> Any:
    with _jax.remat3(False):
      return ck_(*xs)

  if seg.scan is None:
    return lambda ins: ck(*ins)
  eqn = seg.scan
  layout = _jaxpr.scan_layout(eqn)
  nc, nk = layout.num_consts, layout.num_carry

  def scan(ins: list[Any]) -> list[Any]:
    consts_, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]

    def step(c: Any, x: Any) -> Any:
      outs = ck(*consts_, *c, *x)
      return tuple(outs[:nk]), tuple(outs[nk:])

    c, ys = jax.lax.scan(step, tuple(carry), tuple(xs), length=layout.length,
                         reverse=bool(eqn.params.get("reverse", False)),
                         unroll=eqn.params.get("unroll", 1))
    return [*c, *ys]

  return scan


def _zeros_like(x: Any) -> Any:
  return jax.numpy.zeros(np.shape(x), x.dtype)


def _eval_named(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any],
                keys: dict[Any, str]) -> list[Any]:
  """Evaluates a segment's JVP jaxpr, tagging each chosen tensor with its name."""

  def step(eqn: Any, invals: list[Any]) -> list[Any]:
    with _jax.eqn_context(eqn):
      outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      outs = list(outs) if eqn.primitive.multiple_results else [outs]
      return [_jax.checkpoint_name(x, keys[v]) if v in keys else x
              for v, x in zip(eqn.outvars, outs)]

  return _jaxpr.evaluate(jaxpr, consts, args, step)


# --------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------
def _costs(cost: str, offload: bool, target: targets.Target) -> Costs:
  chip = target.chip
  if cost not in ("flops", "matmul_flops", "time"):
    raise ValueError(f"`auto_remat`: `cost` must be 'flops', 'matmul_flops' or 'time', "
                     f"got {cost!r}.")
  if cost == "time" and chip is None:
    raise ValueError("`auto_remat`: cost='time' needs an accelerator `target` (its chip's "
                     "rates), e.g. target='gpu:h100'; on the local backend use 'flops'.")
  host = None
  if offload:
    if chip is None:
      raise ValueError("`auto_remat`: `offload=True` needs a target with host memory (an "
                       "accelerator target such as 'gpu:h100' or 'tpu:v5e:2x2').")
    # A copy out and one back over the host link, in FLOP-equivalents at the chip's peak.
    seconds_per_byte = 2.0 / chip.host_bandwidth
    host = seconds_per_byte if cost == "time" else seconds_per_byte * chip.peak_flops
  if cost == "time":
    assert chip is not None
    return Costs(1.0 / chip.peak_flops, 1.0 / chip.peak_flops, host, "seconds")
  if cost == "matmul_flops":
    return Costs(1.0, 1e-6, host, "flops")
  return Costs(1.0, 1.0, host, "flops")


def _check_options(budget_kind: str, time_limit_s: Any, argnums: Any, n_args: int
                   ) -> tuple[int, ...]:
  if budget_kind not in BUDGET_KINDS:
    raise ValueError(f"`auto_remat`: `budget_kind` must be one of {BUDGET_KINDS}, got "
                     f"{budget_kind!r}.")
  _args.positive_seconds("auto_remat", "time_limit_s", time_limit_s)
  nums = (argnums,) if isinstance(argnums, int) and not isinstance(argnums, bool) else argnums
  if not isinstance(nums, (tuple, list)) or not nums or not all(
      isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_args for i in nums):
    raise ValueError(f"`auto_remat`: `argnums` must be an int or a tuple of ints in "
                     f"[0, {n_args}), the arguments to differentiate; got {argnums!r}.")
  return tuple(nums)


def _plan_graph(fn: Callable[..., Any], args: Sequence[Any], argnums: tuple[int, ...],
                segments: Any, join_ends: bool = True) -> TensorGraph:
  if not callable(fn):
    raise TypeError(f"`auto_remat`: `fn` must be a function returning a scalar loss, got "
                    f"{type(fn).__name__}.")
  if not args:
    raise ValueError("`auto_remat`: give `fn`'s arguments (arrays or "
                     "jax.ShapeDtypeStructs) after it: auto_remat(fn, params, batch, ...).")
  bad = [type(x).__name__ for x in jax.tree_util.tree_leaves(args)
         if not (hasattr(x, "shape") and hasattr(x, "dtype"))]
  if bad:
    raise TypeError(
        f"`auto_remat`: every argument leaf must be an array or a jax.ShapeDtypeStruct; got "
        f"{sorted(set(bad))}. Close over Python values (functools.partial(fn, train=True)).")
  if segments != "auto" and not (isinstance(segments, int) and not isinstance(segments, bool)
                                 and segments >= 1):
    raise ValueError(f"`auto_remat`: `segments` must be 'auto' or an int >= 1, got "
                     f"{segments!r}.")
  with _jax.remat3(False):  # the JVP jaxprs as the classic remat that applies them sees them
    return tensor_graph(fn, args, argnums, segments, join_ends=join_ends)


def _rows(graph: TensorGraph, ev: Evaluation) -> list[PlanRow]:
  out = []
  action = {"saved": "save", "offloaded": "offload", "recomputed": "recompute"}
  for seg in graph.segments:
    for node in seg.nodes.values():
      st = ev.status.get(node.key, "")
      if st:
        out.append(PlanRow(node.key, node.tensor, action[st],
                           seg.eqn_cost[node.producer] * seg.length))
  return out


@dataclasses.dataclass
class _Solved:
  saved: set[str]
  offloaded: set[str]
  ev: Evaluation
  info: dict[str, Any]


class Planner:
  """One traced loss and its program, solved for as many budgets as asked.

  :func:`auto_remat` and :func:`auto_remat_frontier` each make one; keep one to
  plan the same loss at several budgets without tracing it again
  (``planner.plan(budget, "saved", compile=False)``). The arguments are those of
  :func:`auto_remat`.
  """

  def __init__(self, fn: Callable[..., Any], args: Sequence[Any], *, argnums: Any = 0,
               target: Any = None, offload: bool | None = None, cost: str = "flops",
               segments: int | str = "auto", time_limit_s: float = 30.0,
               verbose: bool = False, join_ends: bool = True):
    t0 = time.perf_counter()
    self.target = targets.parse_target(target)
    self.argnums = _check_options("saved", time_limit_s, argnums, len(args))
    self.args = tuple(args)
    self.time_limit_s = float(time_limit_s)
    self.verbose = verbose
    if offload is None:
      offload = targets.has_host_memory(self.target) and self.target.chip is not None
    self.offload = bool(offload)
    self.costs = _costs(cost, self.offload, self.target)
    self.graph = _plan_graph(fn, self.args, self.argnums, segments, join_ends)
    self.program = Program(self.graph, self.costs)
    self._solved: dict[int, _Solved | None] = {}
    self._compiled: dict[tuple[frozenset[str], frozenset[str]], dict[str, Any]] = {}
    self._fns: dict[tuple[frozenset[str], frozenset[str]], Callable[..., Any]] = {}
    self.trace_seconds = time.perf_counter() - t0
    self._say(f"traced: {len(self.graph.segments)} segments "
              f"({', '.join(s.label for s in self.graph.segments)}), "
              f"{len(self.graph.nodes)} tensors; program {self.program.size[0]} variables, "
              f"{self.program.size[1]} constraints ({self.trace_seconds:.1f} s)")

  def _say(self, msg: str) -> None:
    if self.verbose:
      print(f"auto_remat: {msg}", file=sys.stderr, flush=True)

  # Bounds of the saved-bytes axis.
  @property
  def least_bytes(self) -> int:
    """Saved bytes with nothing saved inside the segments (full remat of each): the
    segments' inputs their recomputation starts from."""
    return evaluate(self.graph, set()).saved_bytes

  @property
  def most_bytes(self) -> int:
    """Saved bytes with every tensor the backward reads kept (no recomputation)."""
    ev = evaluate(self.graph, {n.key for n in self.graph.nodes if n.candidate})
    return ev.saved_bytes

  def solve_saved(self, budget: int) -> _Solved | None:
    if budget in self._solved:
      return self._solved[budget]
    out = self.program.solve(budget, self.time_limit_s)
    if out is None:
      self._solved[budget] = None
      return None
    saved, off, info = out
    ev = evaluate(self.graph, saved, off, self.costs)
    # Only what the backward reads is kept: report (and apply) that.
    saved = {k for k, s in ev.status.items() if s == "saved"}
    off = {k for k, s in ev.status.items() if s == "offloaded"}
    info = {**info, "budget": budget}
    if info.get("time_limited"):
      self._say(f"solve at {budget:,} B hit its {self.time_limit_s} s limit: "
                f"gap {info['gap']:.2%}")
    solved = _Solved(saved, off, ev, info)
    self._solved[budget] = solved
    return solved

  def fn_of(self, solved: _Solved) -> Callable[..., Any]:
    """The loss with ``solved`` applied (one function object per saved set, so that the
    compile cache of :func:`remat_kit.report.compilation` recognises it)."""
    key = (frozenset(solved.saved), frozenset(solved.offloaded))
    if key not in self._fns:
      self._fns[key] = apply(self.graph, solved.saved, solved.offloaded, argnums=self.argnums)
    return self._fns[key]

  def compiled(self, solved: _Solved) -> dict[str, Any]:
    """The compiled gradient's memory fields and estimate on the target, cached."""
    key = (frozenset(solved.saved), frozenset(solved.offloaded))
    if key not in self._compiled:
      from remat_kit.report.compiled import compilation
      from remat_kit.report.core import memory_fields
      from remat_kit.report.estimate import estimate_seconds

      t0 = time.perf_counter()
      c = compilation(self.fn_of(solved), self.args, {}, self.target, argnums=self.argnums,
                      api="auto_remat")
      mem = memory_fields(c.compiled, self.target, hbm_bytes=self.target.chip is not None)
      est = None
      if self.target.chip is not None:
        est, _ = estimate_seconds(c.total_flops(), mem, self.target)
      self._compiled[key] = {"temp_bytes": int(mem["temp_size"]),
                             "peak_bytes": int(mem["peak_bytes"]), "estimated_seconds": est,
                             "seconds": time.perf_counter() - t0}
      self._say(f"compiled plan saving {solved.ev.saved_bytes:,} B: temp "
                f"{mem['temp_size']:,} B, peak {mem['peak_bytes']:,} B "
                f"({self._compiled[key]['seconds']:.1f} s)")
    return self._compiled[key]

  def budgets(self, points: int) -> list[int]:
    lo, hi = self.least_bytes, self.most_bytes
    if hi <= lo:
      return [lo]
    return sorted({int(lo + (hi - lo) * i / (points - 1)) for i in range(points)})

  def frontier(self, points: int = 12, compile: bool = False) -> list[dict[str, Any]]:
    """The Pareto curve of saved bytes against recomputation, a point per budget."""
    pts: list[dict[str, Any]] = []
    for b in self.budgets(points):
      s = self.solve_saved(b)
      if s is None:
        continue
      row = {"budget": b, "saved_bytes": s.ev.saved_bytes,
             "offloaded_bytes": s.ev.offloaded_bytes, "recompute_flops": s.ev.recompute_flops,
             "recompute_matmul_flops": s.ev.recompute_matmul_flops, "cost": s.ev.cost,
             "gap": s.info.get("gap", 0.0), "solve_seconds": s.info["seconds"]}
      if compile:
        row.update(self.compiled(s))
      pts.append(row)
    pts = _pareto(pts)
    knee = _knee(pts)
    for i, p in enumerate(pts):
      p["knee"] = i == knee
    return pts

  def plan(self, budget: int | None, budget_kind: str, compile: bool,
           compiler_share: int | None = None, max_compiles: int = 6) -> Plan:
    """The plan for ``budget`` bytes of ``budget_kind`` (None: the frontier's knee).

    ``compiler_share``: for a compiled budget, what the compiler is expected to add to
    the saved bytes (a caller that has compiled this model before knows it); the first
    saved budget tried is ``budget`` less it. Learnt from the first compile otherwise.
    """
    t0 = time.perf_counter()
    frontier: list[dict[str, Any]] = []
    if budget is None:
      frontier = self.frontier(compile=compile)
      knee = next(p for p in frontier if p["knee"])
      solved = self.solve_saved(knee["budget"])
      assert solved is not None
    elif budget_kind == "saved":
      solved = self.solve_saved(budget)
      if solved is None:
        raise ValueError(
            f"`auto_remat`: no plan fits `budget`={budget:,} bytes saved for the backward; "
            f"the least any plan reaches is {self.least_bytes:,} bytes (each layer's input, "
            "which its recomputation starts from). Raise the budget.")
    else:
      solved = self._fit_compiled(budget, budget_kind, max_compiles, share=compiler_share)
    comp = self.compiled(solved) if (compile or budget_kind != "saved") else None
    return self.plan_of(solved, budget, budget_kind, comp, frontier,
                        self.trace_seconds + time.perf_counter() - t0)

  def plan_of(self, solved: _Solved, budget: int | None = None, budget_kind: str = "saved",
              comp: dict[str, Any] | None = None, frontier: list[dict[str, Any]] | None = None,
              seconds: float = 0.0) -> Plan:
    """The :class:`Plan` of a solved choice (``comp``: its compiled figures, if any)."""
    solves = [dict(s.info) for s in self._solved.values() if s is not None]
    return Plan(self.fn_of(solved), budget, budget_kind, self.target.name,
                solved.ev.saved_bytes, solved.ev.offloaded_bytes, solved.ev.recompute_flops,
                solved.ev.recompute_matmul_flops,
                None if comp is None else comp["temp_bytes"],
                None if comp is None else comp["peak_bytes"],
                None if comp is None else comp["estimated_seconds"],
                _rows(self.graph, solved.ev),
                [(s.label, s.length) for s in self.graph.segments], solves, seconds,
                frontier or [])

  def _fit_compiled(self, budget: int, kind: str, max_compiles: int = 6,
                    share: int | None = None) -> _Solved:
    """The plan of least recomputation found whose compiled ``kind`` bytes fit ``budget``.

    Solve for a saved-bytes budget, compile, and move the saved budget: down by twice
    the excess (at least 5% of the budget: the compiled figure moves in steps, as XLA
    reschedules) where the compiled figure is over, up by the slack where it is under
    by more than 3%, and between the closest fitting and failing saved budgets once both
    are known, until they are within 3% of the budget or ``max_compiles`` plans have
    been compiled. Each saved set is compiled once; the cheapest that fits is returned.
    The first saved budget is ``budget`` less ``share`` (what the compiler adds), else
    ``budget``.
    """
    field = "temp_bytes" if kind == "temp" else "peak_bytes"
    least, most = self.least_bytes, self.most_bytes
    target = min(budget if share is None else budget - share - budget // 200, most)
    best: _Solved | None = None
    fit_at: int | None = None  # the largest saved budget whose plan fit
    over_at: int | None = None  # the smallest whose plan did not
    tried: list[tuple[int, int]] = []
    step = max(budget // 20, 1)
    for _ in range(max_compiles):
      target = max(target, least)
      if (fit_at is not None and target <= fit_at) or (over_at is not None and target >= over_at):
        break
      solved = self.solve_saved(target)
      if solved is None:
        break
      got = self.compiled(solved)[field]
      tried.append((solved.ev.saved_bytes, got))
      if got <= budget:
        if best is None or solved.ev.cost < best.ev.cost:
          best = solved
        fit_at = max(fit_at or 0, target)
        if solved.ev.recompute_flops == 0:
          break
        target = (target + over_at) // 2 if over_at is not None else target + (budget - got)
        if budget - got <= 0.03 * budget and over_at is None:
          break
      else:
        over_at = target if over_at is None else min(over_at, target)
        if target <= least:
          break
        target = ((fit_at + target) // 2 if fit_at is not None
                  else target - max(2 * (got - budget), step))
      if fit_at is not None and over_at is not None and over_at - fit_at <= 0.03 * budget:
        break
    if best is None:
      if not tried:
        raise ValueError(f"`auto_remat`: no plan could be solved for `budget`={budget:,}.")
      raise ValueError(
          f"`auto_remat`: no plan's compiled {kind} fits `budget`={budget:,} bytes on "
          f"{self.target.name}; the least reached was {min(g for _, g in tried):,} bytes "
          f"(tried {len(tried)} plans, down to {min(s for s, _ in tried):,} bytes saved; the "
          f"least any plan saves is {least:,}). Raise the budget, shrink the batch, or slice "
          "it (rk.microbatched_value_and_grad).")
    return best


def _pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
  pts = sorted(points, key=lambda p: (p["saved_bytes"], p["cost"]))
  out: list[dict[str, Any]] = []
  for p in pts:
    if not out or p["cost"] < out[-1]["cost"]:
      out.append(p)
  return out


def _knee(points: list[dict[str, Any]]) -> int:
  """The point farthest below the line between the frontier's ends (normalised axes)."""
  if len(points) < 3:
    return 0
  x = np.array([p["saved_bytes"] for p in points], float)
  y = np.array([p["cost"] for p in points], float)
  x = (x - x.min()) / max(np.ptp(x), 1e-30)
  y = (y - y.min()) / max(np.ptp(y), 1e-30)
  # The line from (0, 1) to (1, 0): distance below it. A straight frontier has no knee:
  # its middle point then.
  d = 1.0 - x - y
  if d.max() <= 1e-9:
    return len(points) // 2
  return int(np.argmax(d))


def auto_remat(fn: Callable[..., Any], *args: Any, budget: int | float | str | None,
               budget_kind: str = "saved", target: Any = None, offload: bool | None = None,
               argnums: int | Sequence[int] = 0, cost: str = "flops",
               segments: int | str = "auto", time_limit_s: float = 30.0,
               compile: bool = False, verbose: bool = False) -> Plan:
  """Per-tensor remat of ``fn``: what to save, offload or recompute to fit ``budget``.

  ``fn`` is any JAX function returning a scalar loss: plain JAX, a Linen or NNX
  ``apply``, a Python loop of layers, a ``lax.scan`` over layers. It needs no
  `checkpoint_name` tags and no policy hook. Its layers are found from the
  traced program (module docs of :mod:`remat_kit.planner.tensors`); each becomes
  one remat boundary, so the backward recomputes one layer at a time.

  Args:
    fn: the loss.
    *args: its positional arguments: arrays or ``jax.ShapeDtypeStruct``s
      (close over anything else, e.g. ``functools.partial(fn, train=True)``).
    budget: bytes (an int, or a string like ``"64MiB"``); None for the knee of
      the frontier (the point past which saving more buys least).
    budget_kind: "saved" (device bytes the forward hands the backward, the
      layers' inputs included: what PyTorch's budget ratio is of), "temp" or
      "peak" (the compiled gradient's, on ``target``: the plan is compiled, and
      never returned over the budget).
    target: where to compile and cost: None (the local backend),
      ``"gpu:h100"``, ``"tpu:v5e:2x2"`` ... (deviceless).
    offload: let the plan offload tensors to host memory (costed at the host
      link's bandwidth): None for "where the target has host memory" (an
      accelerator target), True to require it, False never.
    argnums: the arguments the gradient is taken with respect to.
    cost: what recomputing costs: "flops" (every FLOP, elementwise and RNG
      included), "matmul_flops" (matmuls, as PyTorch's FlopCounterMode counts;
      other FLOPs only break ties) or "time" (the target's roofline: FLOPs at
      the chip's peak, offloads at the host link).
    segments: "auto" (the layers found) or an int (that many segments of equal
      FLOPs, cut where least is live).
    time_limit_s: the solver's limit per solve; a solve it cuts short reports
      the gap left in ``plan.solver``.
    compile: compile the plan's gradient on ``target`` (temp, peak, estimated
      time) even for ``budget_kind="saved"``.
    verbose: progress on stderr.

  Returns:
    A :class:`Plan`; ``plan.fn`` is ``fn`` with the plan applied.

  Raises:
    ValueError: for bad options, or a budget no plan fits (the message gives the
      least bytes any plan reaches).
    TypeError: for a ``fn`` that does not return a scalar float, or arguments
      that are not arrays.

  Example:
    >>> import jax, jax.numpy as jnp, remat_kit as rk
    >>> def loss(ws, x):
    ...   for w in ws:                       # a Python loop of layers, no tags
    ...     x = x + jnp.tanh(x @ w) @ w.T
    ...   return jnp.mean(x ** 2)
    >>> ws = [jnp.ones((64, 64)) / 64] * 4
    >>> x = jnp.ones((128, 64))
    >>> plan = rk.auto_remat(loss, ws, x, budget="300KiB")
    >>> plan.saved_bytes <= 300 * 1024
    True
    >>> g1, g2 = jax.grad(plan.fn)(ws, x), jax.grad(loss)(ws, x)
    >>> all(jnp.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(g1, g2))
    True
  """
  if not isinstance(compile, bool):
    raise TypeError(f"`auto_remat`: `compile` must be a bool, got {compile!r}.")
  _check_options(budget_kind, time_limit_s, argnums, len(args))
  budget_bytes = None if budget is None else parse_bytes(budget)
  planner = Planner(fn, args, argnums=argnums, target=target, offload=offload, cost=cost,
                    segments=segments, time_limit_s=time_limit_s, verbose=verbose)
  return planner.plan(budget_bytes, budget_kind, compile)


def auto_remat_frontier(fn: Callable[..., Any], *args: Any, points: int = 12,
                        target: Any = None, offload: bool | None = None,
                        argnums: int | Sequence[int] = 0, cost: str = "flops",
                        segments: int | str = "auto", time_limit_s: float = 30.0,
                        compile: bool = False, verbose: bool = False) -> list[dict[str, Any]]:
  """The Pareto curve of saved bytes against recomputation for ``fn``.

  One solve per budget, ``points`` budgets from the least any plan saves (each
  layer's input) to what no remat saves. Each point has ``saved_bytes``,
  ``recompute_flops``, ``recompute_matmul_flops``, ``cost``, the solver's
  ``gap``, ``knee`` (True at the knee) and, with ``compile``, the compiled
  ``temp_bytes``/``peak_bytes``/``estimated_seconds`` on ``target``. Other
  arguments are those of :func:`auto_remat`.

  Raises:
    ValueError: for bad options (see :func:`auto_remat`).
  """
  _args.int_at_least("auto_remat_frontier", "points", points, 2)
  planner = Planner(fn, args, argnums=argnums, target=target, offload=offload, cost=cost,
                    segments=segments, time_limit_s=time_limit_s, verbose=verbose)
  return planner.frontier(points, compile=compile)
