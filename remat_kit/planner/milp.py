"""Per-tensor remat as a mixed-integer program, solved exactly by HiGHS.

For each tensor ``v`` of a :class:`~remat_kit.planner.tensors.TensorGraph`:
``s_v`` (saved), ``o_v`` (offloaded to host memory, where allowed); for each
forward equation ``e``: ``r_e`` (run again in the backward) and ``f_e`` (run in
the forward: fixed to 1 for what the segment's outputs need). The backward reads
some tensors (``needed``); recomputing an equation needs its inputs, saved,
offloaded or recomputed in turn, back to the segment's inputs (the recompute
closure, as in Checkmate):

* ``s_v + o_v + r_p(v) >= 1`` for every needed ``v`` made by equation ``p(v)``;
* ``s_u + o_u + r_p(u) >= r_e`` for every input ``u`` of every equation ``e``;
* ``s_v + o_v <= f_p(v)`` (a tensor is kept where the forward makes it), and
  ``f_p(u) >= f_e`` for the inputs of what the forward runs;
* a segment input made by an earlier segment is kept (``a_u = 1``, its bytes
  counted) if the backward reads it, and ``a_u >= r_e`` for every equation ``e``
  that reads it;
* ``sum(bytes_v s_v) + sum(bytes_u a_u) <= budget`` (device bytes handed to the
  backward).

It minimises ``sum(cost_e (f_e + r_e)) + sum(offload_cost_v o_v)``: every FLOP the
step runs, forward and backward, so a value only the derivative reads
(``1 - tanh(x)**2``) costs the same computed in either pass, and what a plan
"recomputes" is the FLOPs it runs beyond no remat, as
:func:`remat_kit.report.flop_breakdown` measures. The figures a plan reports are
not the program's: :func:`evaluate` walks the closure of the saved set again, so
only what the backward reads counts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from remat_kit.planner.tensors import TensorGraph, _ancestors

__all__ = ["Costs", "Evaluation", "Program", "evaluate"]


@dataclasses.dataclass(frozen=True)
class Costs:
  """What recomputing and offloading cost, in one unit (FLOPs or seconds).

  Attributes:
    matmul: per matmul FLOP recomputed.
    other: per other FLOP recomputed (elementwise, reductions, RNG).
    offload_per_byte: per byte offloaded (a copy out and one back over the
      host link); None where offloading is not allowed.
    unit: "flops" or "seconds".
  """

  matmul: float = 1.0
  other: float = 1.0
  offload_per_byte: float | None = None
  unit: str = "flops"


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """What a choice of saved and offloaded tensors does, read off the graph.

  Attributes:
    saved_bytes: device bytes handed to the backward: the segments' inputs made
      by earlier segments, plus the saved tensors it reads.
    offloaded_bytes: bytes moved to host memory.
    recompute_flops: FLOPs the backward recomputes (over all iterations).
    recompute_matmul_flops: of those, matmuls and convolutions.
    cost: the objective (see :class:`Costs`).
    status: for each tensor key: "saved", "offloaded", "recomputed" or ""
      (the backward does not read it).
  """

  saved_bytes: int
  offloaded_bytes: int
  recompute_flops: int
  recompute_matmul_flops: int
  cost: float
  status: dict[str, str]


def evaluate(graph: TensorGraph, saved: Iterable[str], offloaded: Iterable[str] = (),
             costs: Costs = Costs(), any_tensor: bool = False) -> Evaluation:
  """The bytes and recomputation of saving ``saved`` and offloading ``offloaded`` (tensor
  keys); every other tensor the backward reads is recomputed from them. A plan keeps
  candidates only (never a re-view of another tensor); with ``any_tensor``, any tensor
  is kept as given (what a policy keeps: a `checkpoint_name`'s output, say)."""
  saved, offloaded = set(saved), set(offloaded)
  status: dict[str, str] = {}
  total_saved, total_off, flops, mm, cost = 0, 0, 0, 0, 0.0
  kept: set[Any] = set()
  for seg in graph.segments:
    by_var = seg.nodes
    recomputed: set[int] = set()
    kept |= seg.needed_inputs
    todo = [v for v, n in by_var.items() if n.needed]
    seen: set[Any] = set()
    while todo:
      v = todo.pop()
      if v in seen:
        continue
      seen.add(v)
      node = by_var[v]
      if node.key in saved and (node.candidate or any_tensor):
        status[node.key] = "saved"
        total_saved += node.bytes
        continue
      if node.key in offloaded and (node.candidate or any_tensor):
        status[node.key] = "offloaded"
        total_off += node.bytes
        cost += (costs.offload_per_byte or 0.0) * node.bytes
        continue
      status[node.key] = "recomputed"
      if node.producer not in recomputed:
        recomputed.add(node.producer)
        todo.extend(seg.eqn_inputs[node.producer])
        kept.update(seg.eqn_ins[node.producer])
    kept_nodes = [v for v, n in by_var.items() if status.get(n.key) in ("saved", "offloaded")]
    forward = seg.forward | _ancestors(seg, kept_nodes)
    for group, sign in ((forward, 1), (recomputed, 1), (seg.baseline, -1)):
      for e in group:
        f = sign * seg.eqn_cost[e] * seg.length
        flops += f
        if seg.eqn_matmul[e]:
          mm += f
          cost += costs.matmul * f
        else:
          cost += costs.other * f
  inputs = graph.inputs
  total_saved += sum(inputs[k] for k in kept)
  for n in graph.nodes:
    status.setdefault(n.key, "")
  return Evaluation(total_saved, total_off, flops, mm, cost, status)


class Program:
  """The mixed-integer program of a graph, built once and solved for many budgets."""

  def __init__(self, graph: TensorGraph, costs: Costs):
    self.graph, self.costs = graph, costs
    offload = costs.offload_per_byte is not None
    cols: list[tuple[str, Any]] = []  # (kind, key)
    index: dict[tuple[str, Any], int] = {}

    def col(kind: str, key: Any) -> int:
      index[(kind, key)] = len(cols)
      cols.append((kind, key))
      return index[(kind, key)]

    obj: list[float] = []
    ub: list[float] = []
    nbytes: list[float] = []
    for key, nb in graph.inputs.items():
      col("a", key)
      obj.append(0.0)
      ub.append(1.0)
      nbytes.append(float(nb))
    for seg in graph.segments:
      for e, c in enumerate(seg.eqn_cost):
        w = self.costs.matmul if seg.eqn_matmul[e] else self.costs.other
        col("r", (seg.index, e))
        obj.append(w * c * seg.length)
        ub.append(1.0)
        nbytes.append(0.0)
        if e not in seg.forward:  # run in the forward only if a kept tensor needs it
          col("f", (seg.index, e))
          obj.append(w * c * seg.length)
          ub.append(1.0)
          nbytes.append(0.0)
      for node in seg.nodes.values():
        col("s", node.key)
        obj.append(0.0)
        ub.append(1.0 if node.candidate else 0.0)
        nbytes.append(float(node.bytes))
        if offload:
          col("o", node.key)
          obj.append((costs.offload_per_byte or 0.0) * node.bytes)
          ub.append(1.0 if node.candidate else 0.0)
          nbytes.append(0.0)
    rows, lo, hi = [], [], []

    def keep(node: Any) -> list[tuple[int, float]]:
      out = [(index[("s", node.key)], 1.0)]
      if offload:
        out.append((index[("o", node.key)], 1.0))
      return out

    for seg in graph.segments:
      for node in seg.nodes.values():
        r = index[("r", (seg.index, node.producer))]
        f = index.get(("f", (seg.index, node.producer)))
        if f is not None and node.candidate:  # kept only where the forward makes it
          rows.append(keep(node) + [(f, -1.0)])
          lo.append(-np.inf)
          hi.append(0.0)
        if node.needed:
          rows.append(keep(node) + [(r, 1.0)])
          lo.append(1.0)
          hi.append(np.inf)
        if offload and node.candidate:
          rows.append(keep(node))
          lo.append(-np.inf)
          hi.append(1.0)
      for key in seg.needed_inputs:
        rows.append([(index[("a", key)], 1.0)])
        lo.append(1.0)
        hi.append(np.inf)
      for e, ins in enumerate(seg.eqn_ins):
        for key in ins:
          rows.append([(index[("a", key)], 1.0), (index[("r", (seg.index, e))], -1.0)])
          lo.append(0.0)
          hi.append(np.inf)
      for e, inputs in enumerate(seg.eqn_inputs):
        f_e = index.get(("f", (seg.index, e)))
        for u in inputs:  # what the forward runs, it runs with its inputs
          f_u = index.get(("f", (seg.index, seg.nodes[u].producer)))
          if f_e is not None and f_u is not None:
            rows.append([(f_u, 1.0), (f_e, -1.0)])
            lo.append(0.0)
            hi.append(np.inf)
        r_e = index[("r", (seg.index, e))]
        for u in inputs:
          node = seg.nodes[u]
          r_u = index[("r", (seg.index, node.producer))]
          rows.append(keep(node) + [(r_u, 1.0), (r_e, -1.0)])
          lo.append(0.0)
          hi.append(np.inf)
    self.cols, self.index = cols, index
    scale = max(max(obj), 1.0)
    self.obj = np.asarray(obj) / scale
    self.ub = np.asarray(ub)
    self.nbytes = np.asarray(nbytes)
    from scipy import sparse

    data, ri, ci = [], [], []
    for i, row in enumerate(rows):
      for j, a in row:
        ri.append(i)
        ci.append(j)
        data.append(a)
    self.A = sparse.csr_matrix((data, (ri, ci)), shape=(len(rows), len(cols)))
    self.lo, self.hi = np.asarray(lo), np.asarray(hi)

  @property
  def size(self) -> tuple[int, int]:
    """(variables, constraints)."""
    return len(self.cols), self.A.shape[0]

  def solve(self, budget_bytes: int, time_limit_s: float = 30.0, gap: float = 0.0
            ) -> tuple[set[str], set[str], dict[str, Any]] | None:
    """The saved and offloaded tensor keys of the cheapest plan whose device bytes fit
    ``budget_bytes``, and what HiGHS reported; None if no plan fits."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    free = float(budget_bytes)
    cons = [LinearConstraint(self.A, self.lo, self.hi),
            LinearConstraint(self.nbytes[None, :], -np.inf, free)]
    t0 = time.perf_counter()
    res = milp(self.obj, integrality=np.ones(len(self.cols)), bounds=Bounds(0, self.ub),
               constraints=cons,
               options={"time_limit": float(time_limit_s), "mip_rel_gap": float(gap),
                        "disp": False})
    info = {"status": int(res.status), "message": str(res.message),
            "seconds": time.perf_counter() - t0,
            "gap": float(getattr(res, "mip_gap", 0.0) or 0.0),
            "variables": len(self.cols), "constraints": self.A.shape[0]}
    if res.x is None:
      return None
    x = np.round(res.x).astype(int)
    saved = {key for (kind, key), val in zip(self.cols, x) if kind == "s" and val}
    off = {key for (kind, key), val in zip(self.cols, x) if kind == "o" and val}
    info["time_limited"] = res.status == 1
    return saved, off, info
