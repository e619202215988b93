"""The per-tensor model of a training step: layers, tensors, what the backward reads.

:func:`tensor_graph` traces a scalar loss once and builds what
:mod:`remat_kit.planner.auto_remat` solves over:

* the forward jaxpr, with jit calls and remat boundaries inlined (a model's own
  remat is replaced by the plan);
* its **segments**, the units the backward recomputes one at a time: each layer
  of a Python loop (found as a repeating run of equations between the points
  where only the residual stream is live), each ``lax.scan`` body (one choice for
  all its iterations), and the prefix and suffix around them;
* for each segment, its JVP jaxpr: the forward as differentiation sees it, JVP
  rules included. Its primal equations are the **tensors**; those the tangent
  equations read are what the backward needs (``1 - tanh(x)**2``, a relu mask,
  softmax's output from inside its ``custom_jvp``); a needed tensor is saved,
  offloaded, or recomputed from tensors that are, back to the segment's inputs.

Every tensor carries a :class:`~remat_kit.report.tensor.Tensor` record (op,
source line, layer, shape, bytes): the same record the readouts' rows use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from remat_kit import _jax, _jaxpr
from remat_kit.report.flops import eqn_flops
from remat_kit.report.tensor import Tensor, user_source

__all__ = ["Node", "Segment", "TensorGraph", "tensor_graph", "policy_choice", "PREFIX"]

# The reserved prefix of the `checkpoint_name`s a plan generates.
PREFIX = "rk_auto"

# Ops whose output is the same buffer as an input: never a candidate of their own (saving
# one is saving its input), and free to recompute.
ALIASES = _jaxpr.SAME_VALUE | _jaxpr.RESHAPES
# Calls inlined before planning: their bodies are planned like the code around them.
_INLINE = frozenset({"pjit", "jit", "closed_call", "core_call"})


def _nbytes(aval: Any) -> int:
  shape = tuple(getattr(aval, "shape", ()))
  dtype = getattr(aval, "dtype", None)
  if dtype is None:
    return 0
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return math.prod(shape) * jax.random.key_data(jax.random.key(0)).nbytes
  if dtype == jax.dtypes.float0:
    return 0
  return math.prod(shape) * np.dtype(dtype).itemsize


def _inexact(aval: Any) -> bool:
  dtype = getattr(aval, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, np.inexact)


# --------------------------------------------------------------------------
# Inlining
# --------------------------------------------------------------------------
def inline(jaxpr: Any, consts: Sequence[Any], *args: Any) -> list[Any]:
  """Evaluates ``jaxpr`` with jit calls and remat boundaries inlined, everything else
  (scans, conds, custom rules) bound as it was, each equation under its own source
  line and name stack."""

  def step(eqn: Any, invals: list[Any]) -> list[Any]:
    with _jax.eqn_context(eqn):
      if eqn.primitive.name in _INLINE or _jaxpr.is_remat(eqn):
        if _jaxpr.is_remat(eqn):
          body, body_consts = _jaxpr.remat_body(eqn)
        else:
          body, body_consts = _jaxpr.closed_parts(eqn.params[_jaxpr.CALL_BODIES.get(
              eqn.primitive.name, "jaxpr")])
        return inline(body, body_consts, *invals)
      if eqn.primitive.name == "scan":
        return _bind_with(eqn, invals, _inline_closed)
      outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      return outs if eqn.primitive.multiple_results else [outs]

  return _jaxpr.evaluate(jaxpr, consts, args, step)


def _inline_closed(closed: Any) -> Any:
  jaxpr, consts = _jaxpr.closed_parts(closed)
  avals = [jax.ShapeDtypeStruct(getattr(v.aval, "shape", ()), getattr(v.aval, "dtype", None))
           for v in jaxpr.invars]
  return jax.make_jaxpr(lambda *xs: inline(jaxpr, consts, *xs))(*avals)


def _bind_with(eqn: Any, invals: list[Any], rewrite: Callable[[Any], Any]) -> list[Any]:
  params = dict(eqn.primitive.get_bind_params(eqn.params))
  params["jaxpr"] = rewrite(params["jaxpr"])
  outs = eqn.primitive.bind(*invals, **params)
  return outs if eqn.primitive.multiple_results else [outs]


# --------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Node:
  """One tensor of a segment: a primal value of its JVP jaxpr.

  Attributes:
    key: its generated `checkpoint_name` (``rk_auto:<segment>:<index>``).
    tensor: its record (op, source, layer, shape, bytes per iteration).
    bytes: bytes over all iterations (a scan body's, times its length).
    producer: the index of the equation that makes it (in ``Segment.eqn_cost``).
    candidate: whether a plan may save or offload it (not a re-view of another).
    needed: whether the backward reads it (a tangent equation does).
  """

  key: str
  tensor: Tensor
  bytes: int
  producer: int
  candidate: bool
  needed: bool


@dataclasses.dataclass
class Segment:
  """A unit the backward recomputes on its own (one remat boundary of the plan).

  Attributes:
    index: its position among the segments.
    label: what it is, in words ("layer 3", "scan body x 12", "prefix").
    eqns: its top-level forward equations (one ``scan`` for a scan body).
    length: the iterations it runs (a scan's length; 1 otherwise).
    in_vars: its inputs: values defined before it, arguments and constants.
    out_vars: its outputs that later segments or the function's result read.
    scan: the scan equation, for a scan body; else None.
    jvp: the JVP jaxpr of its body (nondiff inputs, diff inputs, diff tangents).
    consts: ``jvp``'s constants.
    diff: for each input of the body, whether it carries a tangent.
    nodes: its tensors (the primal equation outputs of ``jvp``), by var.
    eqn_cost: FLOPs of each primal equation of ``jvp`` (per iteration).
    eqn_matmul: whether each primal equation is a matmul or convolution.
    eqn_inputs: for each primal equation, the vars of ``nodes`` it reads.
    eqn_ins: for each primal equation, the keys of the segment inputs it reads.
    inputs: the segment's inputs the backward may keep, by key: their bytes (over
      all iterations; 0 for arguments and constants, kept anyway). An input made by
      an earlier segment is kept if the backward reads it (``needed_inputs``) or a
      recomputed equation does.
    needed_inputs: keys of the inputs the backward reads whatever the plan.
    forward: the primal equations the forward runs whatever the plan (what the
      segment's outputs need).
    baseline: those it runs without remat: the outputs' and every tensor a tangent
      equation reads, even one whose result the gradient drops (JAX's linearize
      computes those too). A derivative-only value, such as ``1 - tanh(x)**2``, is
      computed once either way: in the forward if saved, in the backward if not.
  """

  index: int
  label: str
  eqns: list[Any]
  length: int
  in_vars: list[Any]
  out_vars: list[Any]
  scan: Any = None
  jvp: Any = None
  consts: list[Any] = dataclasses.field(default_factory=list)
  diff: list[bool] = dataclasses.field(default_factory=list)
  nodes: dict[Any, Node] = dataclasses.field(default_factory=dict)
  eqn_cost: list[int] = dataclasses.field(default_factory=list)
  eqn_matmul: list[bool] = dataclasses.field(default_factory=list)
  eqn_inputs: list[list[Any]] = dataclasses.field(default_factory=list)
  eqn_ins: list[list[Any]] = dataclasses.field(default_factory=list)
  inputs: dict[Any, int] = dataclasses.field(default_factory=dict)
  needed_inputs: set[Any] = dataclasses.field(default_factory=set)
  forward: set[int] = dataclasses.field(default_factory=set)
  baseline: set[int] = dataclasses.field(default_factory=set)
  input_keys: list[Any] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TensorGraph:
  """A loss traced for per-tensor planning (see the module).

  Attributes:
    jaxpr: the forward, jit calls and remat inlined, on the flat leaves.
    consts: its constants.
    leaves: the flat argument leaves (arrays or ShapeDtypeStructs).
    in_tree: the pytree of ``args``.
    out_tree: the pytree of the result.
    diff_leaves: which leaves the gradient is taken with respect to.
    segments: the segments, in order.
  """

  jaxpr: Any
  consts: list[Any]
  leaves: list[Any]
  in_tree: Any
  out_tree: Any
  diff_leaves: list[bool]
  segments: list[Segment]

  @property
  def nodes(self) -> list[Node]:
    return [n for s in self.segments for n in s.nodes.values()]

  @property
  def inputs(self) -> dict[Any, int]:
    """Every segment input the backward may keep, by key, and its bytes (an input read
    by several segments is one buffer, one key)."""
    out: dict[Any, int] = {}
    for seg in self.segments:
      out.update(seg.inputs)
    return out


def tensor_graph(fn: Callable[..., Any], args: Sequence[Any], argnums: Sequence[int],
                 segments: int | str = "auto", api: str = "auto_remat",
                 join_ends: bool = True) -> TensorGraph:
  """Traces ``fn(*args)`` and builds its per-tensor model (see the module).

  Args:
    fn: a function returning a scalar loss.
    args: its positional arguments (arrays or ``jax.ShapeDtypeStruct``s).
    argnums: the arguments the gradient is taken with respect to.
    segments: "auto" (layers found as described in the module), or an int: that
      many segments of about equal FLOPs, cut where the fewest bytes are live.
    api: the public function's name, for errors.
    join_ends: let a Python loop's prefix and suffix join its first and last layer
      (False keeps them segments of their own, as a model that remats only its
      layers has them).
  """
  leaves, in_tree = jax.tree_util.tree_flatten(tuple(args))
  diff_leaves = []
  for i, a in enumerate(args):
    n = len(jax.tree_util.tree_leaves(a))
    diff_leaves += [i in argnums] * n

  def flat(*xs: Any) -> Any:
    return fn(*jax.tree_util.tree_unflatten(in_tree, list(xs)))

  avals = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]
  closed, out_shape = jax.make_jaxpr(flat, return_shape=True)(*avals)
  out_leaves = jax.tree_util.tree_leaves(out_shape)
  if len(out_leaves) != 1 or out_leaves[0].shape != () or not _inexact(out_leaves[0]):
    raise TypeError(
        f"`{api}`: `fn` must return a scalar float loss (the gradient is planned for it); "
        f"it returned {jax.tree_util.tree_map(lambda s: f'{s.dtype}{list(s.shape)}', out_shape)}.")
  jaxpr0, consts0 = _jaxpr.closed_parts(closed)
  inlined = jax.make_jaxpr(lambda *xs: inline(jaxpr0, consts0, *xs))(*avals)
  jaxpr, consts = _jaxpr.closed_parts(inlined)
  graph = TensorGraph(jaxpr, consts, leaves, in_tree, jax.tree_util.tree_structure(out_shape),
                      [bool(d) and _inexact(x) for d, x in zip(diff_leaves, leaves)], [])
  graph.segments = _segment(graph, segments, api, join_ends)
  for seg in graph.segments:
    _build_jvp(graph, seg)
  return graph


# --------------------------------------------------------------------------
# Segments
# --------------------------------------------------------------------------
def _segment(graph: TensorGraph, segments: int | str, api: str, join_ends: bool = True
             ) -> list[Segment]:
  jaxpr = graph.jaxpr
  eqns = list(jaxpr.eqns)
  n = len(eqns)
  if n == 0:
    raise ValueError(f"`{api}`: `fn` computes nothing from its arguments.")
  outer = set(jaxpr.invars) | set(jaxpr.constvars)
  defined = {v: i for i, e in enumerate(eqns) for v in e.outvars}
  last_use: dict[Any, int] = {}
  for i, e in enumerate(eqns):
    for v in e.invars:
      if isinstance(v, _jaxpr.Var) and v in defined:
        last_use[v] = i
  for v in jaxpr.outvars:
    if isinstance(v, _jaxpr.Var) and v in defined:
      last_use[v] = n
  # Bytes live across the point before each equation (values made earlier, read later).
  delta = [0] * (n + 2)
  for v, d in defined.items():
    if v in last_use and last_use[v] > d:
      delta[d + 1] += _nbytes(v.aval)
      delta[last_use[v] + 1] -= _nbytes(v.aval)
  crossing, acc = [], 0
  for p in range(n + 1):
    acc += delta[p]
    crossing.append(acc)
  # Points where a scan over layers starts or ends are cuts, whatever is live there.
  scans = {i for i, e in enumerate(eqns) if _is_layer_scan(e)}
  flops = [eqn_flops(e) for e in eqns]
  started = next((p for p in range(n) if flops[p] > 0 or p in scans), 0)
  run: tuple[int, int] | None = None
  if isinstance(segments, int):
    cuts = _balanced_cuts(crossing, flops, scans, segments, started)
  else:
    cuts, run = _layer_cuts(eqns, crossing, scans, started)
  bounds = sorted({0, n, *cuts, *scans, *(i + 1 for i in scans)})
  ranges = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
  labels = _labels(eqns, ranges, scans, run)
  # The code before the first layer of a Python loop (embeddings) and after its last (the
  # head, the loss) joins that layer: a boundary there would keep the value crossing it
  # for the backward, where recomputing it from the arguments is free of matmuls.
  if join_ends and len(ranges) > 1 and labels[0] == "prefix" and labels[1] == "layer 0":
    ranges[:2] = [(ranges[0][0], ranges[1][1])]
    labels[:2] = ["layer 0 (with the prefix)"]
  if join_ends and len(ranges) > 1 and labels[-1] == "suffix" and labels[-2].startswith(
      "layer "):
    ranges[-2:] = [(ranges[-2][0], ranges[-1][1])]
    labels[-2:] = [labels[-2].split(" (")[0] + (" (with the prefix and suffix)"
                                                if "prefix" in labels[-2] else
                                                " (with the suffix)")]
  out: list[Segment] = []
  for (a, b), label in zip(ranges, labels):
    body = eqns[a:b]
    made = {v for e in body for v in e.outvars}
    ins: list[Any] = []
    for e in body:
      for v in e.invars:
        if isinstance(v, _jaxpr.Var) and v not in made and v not in ins:
          ins.append(v)
    later = {v for e in eqns[b:] for v in e.invars if isinstance(v, _jaxpr.Var)}
    later |= {v for v in jaxpr.outvars if isinstance(v, _jaxpr.Var)}
    outs = [v for e in body for v in e.outvars if v in later]
    is_scan = a in scans
    seg = Segment(len(out), label, body, _jaxpr.scan_layout(body[0]).length if is_scan else 1,
                  ins, outs, scan=body[0] if is_scan else None)
    seg.input_keys = _input_keys(seg, outer)
    out.append(seg)
  return out


def _input_keys(seg: Segment, outer: set[Any]) -> list[tuple[Any, int]]:
  """A key and the bytes of each input of the segment's body (in the body's order):
  top-level values by var (0 bytes for arguments and constants), a scan's carry by
  segment and position (stacked over its iterations)."""
  def top(v: Any) -> tuple[Any, int]:
    if isinstance(v, _jaxpr.Literal) or v in outer:
      return (("outer", id(v)), 0)
    return (("var", v), _nbytes(v.aval))

  if seg.scan is None:
    return [top(v) for v in seg.in_vars]
  layout = _jaxpr.scan_layout(seg.scan)
  keys = []
  for k, (v, bv) in enumerate(zip(seg.scan.invars, layout.body.invars)):
    if layout.num_consts <= k < layout.num_consts + layout.num_carry:
      keys.append((("carry", seg.index, k), _nbytes(bv.aval) * layout.length))
    else:
      keys.append(top(v))
  return keys


def _is_layer_scan(eqn: Any) -> bool:
  """A scan worth planning as layers: it repeats a body that does matmuls."""
  if eqn.primitive.name != "scan":
    return False
  layout = _jaxpr.scan_layout(eqn)
  return layout.length > 1 and any(e.primitive.name in ("dot_general", "conv_general_dilated")
                                   for e in _jaxpr.walk(layout.body))


def _layer_cuts(eqns: list[Any], crossing: list[int], scans: set[int], started: int
                ) -> tuple[list[int], tuple[int, int] | None]:
  """Cut points at the layers of a Python loop, and the span the layers cover.

  A loop of layers traces to the same equations again and again: the period is
  the shortest shift ``P`` under which the most equations repeat (the signature of
  equation ``i`` equals that of ``i + P``), with a matmul in each period and at
  least two periods. The layer boundaries are then placed where, summed over the
  repetitions, the fewest bytes are live: where only the residual stream (give or
  take a PRNG key) crosses from one layer to the next.
  """
  n = len(eqns)
  if n - started < 4:
    return [], None
  ids: dict[Any, int] = {}
  sig = np.array([ids.setdefault(_signature(e) if i not in scans else ("scan", i), len(ids))
                  for i, e in enumerate(eqns)])
  is_mm = np.array([e.primitive.name in ("dot_general", "conv_general_dilated")
                    for e in eqns])
  best: tuple[int, int, int, int] | None = None  # (coverage, -P, start, run)
  for period in range(1, (n - started) // 2 + 1):
    eq = sig[started:n - period] == sig[started + period:n]
    if not eq.any():
      continue
    padded = np.concatenate(([0], eq.astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(padded))
    starts, stops = edges[::2], edges[1::2]
    k = int(np.argmax(stops - starts))  # the longest run of matches
    run = int(stops[k] - starts[k])
    if run < period:
      continue  # fewer than two periods
    s0 = started + int(starts[k])
    if not is_mm[s0:s0 + period].any():
      continue  # a layer does a matmul: repeated norms or casts are not layers
    coverage = run + period
    if best is None or coverage > best[0]:
      best = (coverage, -period, s0, run)
  if best is None:
    return [], None
  coverage, neg_p, s0, _ = best
  period = -neg_p
  end = s0 + coverage

  grid = lambda ph: list(range(s0 + ph, end + 1, period))
  mean = [sum(crossing[b] for b in grid(ph)) / len(grid(ph)) for ph in range(period)]
  # Where least is live between layers; of the phases as good (the residual stream is also
  # all that is live between a block's two halves), the one that fits the most whole layers.
  low = min(mean)
  good = [ph for ph in range(period) if mean[ph] <= 1.25 * low]
  phase = min(good, key=lambda ph: (-len(grid(ph)), mean[ph], ph))
  bounds = grid(phase)
  if len(bounds) < 3:
    return [], None  # fewer than two whole layers
  return [b for b in bounds if started < b < n], (bounds[0], bounds[-1])


def _has_flops(eqns: list[Any]) -> bool:
  return any(eqn_flops(e) for e in eqns)


def _signature(eqn: Any) -> tuple[Any, ...]:
  return (eqn.primitive.name,
          tuple((tuple(getattr(v.aval, "shape", ())), str(getattr(v.aval, "dtype", "")))
                for v in eqn.outvars))


def _balanced_cuts(crossing: list[int], flops: list[int], scans: set[int], k: int,
                   started: int) -> list[int]:
  """``k`` segments of about equal FLOPs, each cut moved to the least-live point near it."""
  if k < 1:
    raise ValueError(f"`auto_remat`: `segments` must be 'auto' or an int >= 1, got {k!r}.")
  n = len(flops)
  total = sum(flops) or 1
  acc, cuts, want = 0, [], 1
  for p in range(n):
    acc += flops[p]
    while want < k and acc >= total * want / k:
      lo, hi = max(started + 1, p - n // (4 * k)), min(n - 1, p + n // (4 * k))
      window = range(lo, hi + 1) if hi >= lo else range(p, p + 1)
      cuts.append(min(window, key=lambda q: (crossing[q], abs(q - p))))
      want += 1
  return sorted(set(c for c in cuts if 0 < c < n))


def _labels(eqns: list[Any], ranges: list[tuple[int, int]], scans: set[int],
            run: tuple[int, int] | None) -> list[str]:
  in_run = lambda a, b: run is not None and run[0] <= a and b <= run[1]
  layered = [i for i, (a, b) in enumerate(ranges) if a in scans or in_run(a, b)]
  labels = []
  layer = 0
  for i, (a, b) in enumerate(ranges):
    if a in scans:
      labels.append(f"scan body x {_jaxpr.scan_layout(eqns[a]).length}")
    elif in_run(a, b):
      labels.append(f"layer {layer}")
      layer += 1
    elif not layered or i < layered[0]:
      labels.append("prefix" if layered else f"segment {i}")
    elif i > layered[-1]:
      labels.append("suffix")
    else:
      labels.append(f"segment {i}")
  return labels


# --------------------------------------------------------------------------
# Each segment's JVP jaxpr and tensors
# --------------------------------------------------------------------------
def segment_body(graph: TensorGraph, seg: Segment) -> tuple[Callable[..., list[Any]], list[Any]]:
  """The function of one iteration of ``seg`` (its inputs to its outputs) and the
  avals of its inputs."""
  if seg.scan is not None:
    layout = _jaxpr.scan_layout(seg.scan)
    body, consts = layout.body, layout.body_consts
    avals = [v.aval for v in body.invars]
    return (lambda *xs: inline(body, consts, *xs)), avals
  known = dict(zip(graph.jaxpr.constvars, graph.consts))
  sub = {v for e in seg.eqns for v in e.invars if isinstance(v, _jaxpr.Var) and v in known}
  ins = [v for v in seg.in_vars if v not in known]

  def run(*xs: Any) -> list[Any]:
    env = dict(zip(ins, xs))
    env.update((v, known[v]) for v in sub)
    read = lambda v: v.val if isinstance(v, _jaxpr.Literal) else env[v]
    for eqn in seg.eqns:
      with _jax.eqn_context(eqn):
        if eqn.primitive.name == "scan":
          outs = _bind_with(eqn, [read(v) for v in eqn.invars], lambda c: c)
        else:
          outs = eqn.primitive.bind(*[read(v) for v in eqn.invars],
                                    **eqn.primitive.get_bind_params(eqn.params))
          outs = outs if eqn.primitive.multiple_results else [outs]
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in seg.out_vars]

  if len(ins) != len(seg.in_vars):  # constants are closed over, not inputs
    keep = [k for k, v in enumerate(seg.in_vars) if v not in known]
    seg.input_keys = [seg.input_keys[k] for k in keep]
    seg.in_vars = ins
  return run, [v.aval for v in ins]


def _diff_inputs(graph: TensorGraph, seg: Segment) -> list[bool]:
  """Which of the segment body's inputs carry a tangent: inexact values that depend on a
  differentiated argument."""
  if not hasattr(graph, "_depends"):
    dep = {v for v, d in zip(graph.jaxpr.invars, graph.diff_leaves) if d}
    for e in graph.jaxpr.eqns:
      if any(isinstance(v, _jaxpr.Var) and v in dep for v in e.invars):
        dep.update(v for v in e.outvars if _inexact(v.aval))
    graph._depends = dep  # type: ignore[attr-defined]
  dep = graph._depends  # type: ignore[attr-defined]
  if seg.scan is None:
    return [v in dep and _inexact(v.aval) for v in seg.in_vars]
  layout = _jaxpr.scan_layout(seg.scan)
  outer = [v in dep if isinstance(v, _jaxpr.Var) else False for v in seg.scan.invars]
  # A carry that gains a dependence inside the loop carries a tangent from the start.
  carry = slice(layout.num_consts, layout.num_consts + layout.num_carry)
  body_dep = set(v for v, d in zip(layout.body.invars, outer) if d)
  for _ in range(2):
    for e in layout.body.eqns:
      if any(isinstance(v, _jaxpr.Var) and v in body_dep for v in e.invars):
        body_dep.update(v for v in e.outvars if _inexact(v.aval))
    for k, ov in enumerate(layout.body.outvars[:layout.num_carry]):
      if isinstance(ov, _jaxpr.Var) and ov in body_dep:
        body_dep.add(layout.body.invars[carry][k])
  return [v in body_dep and _inexact(v.aval) for v in layout.body.invars]


def _build_jvp(graph: TensorGraph, seg: Segment) -> None:
  run, avals = segment_body(graph, seg)
  seg.diff = _diff_inputs(graph, seg)
  nd = [a for a, d in zip(avals, seg.diff) if not d]
  dp = [a for a, d in zip(avals, seg.diff) if d]

  def merged(nds: Sequence[Any], dps: Sequence[Any]) -> list[Any]:
    it_n, it_d = iter(nds), iter(dps)
    return [next(it_d) if d else next(it_n) for d in seg.diff]

  def jvp(nds: list[Any], dps: list[Any], dts: list[Any]) -> Any:
    return jax.jvp(lambda *d: run(*merged(nds, d)), dps, dts)

  sds = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  closed = jax.make_jaxpr(jvp)([sds(a) for a in nd], [sds(a) for a in dp],
                               [sds(a) for a in dp])
  seg.jvp, seg.consts = _jaxpr.closed_parts(closed)
  _index_tensors(seg)


def _index_tensors(seg: Segment) -> None:
  j = seg.jvp
  n_tan = sum(seg.diff)
  primal_in = j.invars[:len(j.invars) - n_tan]
  tangent = set(j.invars[len(j.invars) - n_tan:])
  # The JVP jaxpr takes the non-differentiated inputs, then the differentiated ones.
  order = [k for k, d in enumerate(seg.diff) if not d] + [k for k, d in enumerate(seg.diff) if d]
  in_key = {v: seg.input_keys[k][0] for v, k in zip(primal_in, order)}
  seg.inputs = {key: nbytes for key, nbytes in seg.input_keys if nbytes}
  primal_eqns = []
  for e in j.eqns:
    if any(isinstance(v, _jaxpr.Var) and v in tangent for v in e.invars):
      tangent.update(e.outvars)
    else:
      primal_eqns.append(e)
  # The tangent equations the tangent outputs depend on (a JVP keeps some that a
  # gradient drops: through a stop_gradient, a max's mask under log_softmax): only what
  # those read is needed.
  live = {v for v in j.outvars[len(j.outvars) // 2:] if isinstance(v, _jaxpr.Var)}
  needed: set[Any] = set()
  read: set[Any] = set()
  for e in j.eqns:  # without remat, JAX's forward makes all of these, dead or not
    if any(v in tangent for v in e.outvars):
      read.update(v for v in e.invars if isinstance(v, _jaxpr.Var) and v not in tangent)
  for e in reversed(j.eqns):
    if any(v in tangent for v in e.outvars) and any(v in live for v in e.outvars):
      ins = [v for v in e.invars if isinstance(v, _jaxpr.Var)]
      live.update(v for v in ins if v in tangent)
      needed.update(v for v in ins if v not in tangent)
  seg.needed_inputs = {in_key[v] for v in needed if v in in_key and in_key[v] in seg.inputs}
  # In a scan body, a tensor made from the scan's constants alone (a causal mask) is the
  # same every iteration: JAX keeps one copy, not one per iteration.
  varying: set[Any] = set()
  if seg.scan is not None:
    nc = _jaxpr.scan_layout(seg.scan).num_consts
    varying = {v for v, k in zip(primal_in, order) if k >= nc}
    for e in primal_eqns:
      if any(isinstance(v, _jaxpr.Var) and v in varying for v in e.invars):
        varying.update(e.outvars)
  layer = seg.label
  for k, e in enumerate(primal_eqns):
    seg.eqn_cost.append(_eqn_cost(e))
    seg.eqn_matmul.append(e.primitive.name in ("dot_general", "conv_general_dilated"))
    for i, v in enumerate(e.outvars):
      per_iter = _nbytes(v.aval)
      copies = seg.length if (seg.scan is None or v in varying) else 1
      t = Tensor(op=e.primitive.name, source=user_source(e), layer=layer,
                 shape=tuple(int(d) for d in getattr(v.aval, "shape", ())),
                 dtype=str(getattr(v.aval, "dtype", "")), bytes=per_iter * copies,
                 kind="activation", name=_jax.checkpoint_name_of(e.primitive, e.params))
      seg.nodes[v] = Node(f"{PREFIX}:{seg.index}:{k}" + (f".{i}" if i else ""), t,
                          per_iter * copies, k, _is_candidate(e, v), v in needed)
  seg.eqn_inputs = [[v for v in e.invars if isinstance(v, _jaxpr.Var) and v in seg.nodes]
                    for e in primal_eqns]
  # The equations the forward runs whatever the plan (those the segment's outputs need),
  # and those it runs without remat (outputs and everything the backward reads): a plan's
  # recomputation is what it runs beyond the latter, forward and backward together.
  outs = [v for v in j.outvars[:len(j.outvars) // 2] if isinstance(v, _jaxpr.Var)]
  seg.forward = _ancestors(seg, [v for v in outs if v in seg.nodes])
  seg.baseline = _ancestors(seg, [v for v in outs if v in seg.nodes]
                            + [v for v in read if v in seg.nodes])
  seg.eqn_ins = [sorted({in_key[v] for v in e.invars if isinstance(v, _jaxpr.Var)
                         and v in in_key and in_key[v] in seg.inputs}, key=repr)
                 for e in primal_eqns]
  seg.primal_eqns = primal_eqns  # type: ignore[attr-defined]


def policy_choice(graph: TensorGraph, policy: Any) -> tuple[set[str], set[str]]:
  """What a remat ``policy`` applied to each layer (and nothing else) keeps, as tensor
  keys: ``(saved, offloaded)``.

  The policy is asked about every forward equation of a layer's JVP jaxpr, as
  JAX's remat asks it (``policy(prim, *avals, **params)``); segments that are not
  layers (a prefix, a suffix) keep everything, as a model that remats only its
  layers does. :func:`remat_kit.planner.milp.evaluate` (``any_tensor=True``) turns
  the choice into bytes and recomputation without compiling.
  """
  saved: set[str] = set()
  off: set[str] = set()
  for seg in graph.segments:
    layer = seg.scan is not None or seg.label.startswith("layer")
    for e in getattr(seg, "primal_eqns", ()):
      keys = [seg.nodes[v].key for v in e.outvars if v in seg.nodes]
      if not layer:
        saved.update(keys)
        continue
      d = policy(e.primitive, *[getattr(v, "aval", None) for v in e.invars], **e.params)
      d = _jax.ensure_decision(d)
      if d is _jax.Saveable:
        saved.update(keys)
      elif isinstance(d, _jax.Offloadable):
        off.update(keys)
  return saved, off


def _ancestors(seg: Segment, roots: list[Any]) -> set[int]:
  """The primal equations (indices) that computing ``roots`` (vars of ``seg.nodes``) runs."""
  out: set[int] = set()
  todo = list(roots)
  while todo:
    e = seg.nodes[todo.pop()].producer
    if e not in out:
      out.add(e)
      todo.extend(seg.eqn_inputs[e])
  return out


def _is_candidate(eqn: Any, v: Any) -> bool:
  if eqn.primitive.name in ALIASES or _jax.checkpoint_name_of(eqn.primitive, eqn.params):
    return False
  if eqn.primitive.name == "convert_element_type" and eqn.invars and getattr(
      eqn.invars[0].aval, "dtype", None) == getattr(v.aval, "dtype", None):
    return False
  dtype = getattr(v.aval, "dtype", None)
  return dtype is not None and dtype != jax.dtypes.float0


def _eqn_cost(eqn: Any) -> int:
  """FLOPs of one primal equation, bodies (scans times their length) included."""
  return eqn_flops(eqn, deep=True)
