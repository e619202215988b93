"""Optimal checkpoint placement on chains: revolve for uniform chains, a DP for uneven ones.

The model: a chain of ``n`` layers. Reversing (back-propagating through) a
layer needs its input state; running a layer "with saving" keeps its
internal residuals until its backward. A schedule decides which layer inputs
to keep (checkpoints) and which stretches to run forward again.

* Uniform chains (every layer the same): :func:`optimal_forward_steps` is
  Griewank's binomial closed form, and :func:`revolve_schedule` builds the
  optimal schedule in O(n) (Griewank and Walther, "Algorithm 799: revolve").
* Uneven chains: :func:`solve_chain` is a dynamic program in the spirit of
  Rotor (Beaumont et al., 2019) over (first layer, last layer, free memory),
  exact on integer byte sizes (in units of their common divisor), else on a
  memory grid with a stated bound; it costs O(n^3 M), so it is for tens of
  layers.
* :func:`simulate` runs a schedule step by step, tracking live bytes and
  compute: an independent check of both solvers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

from remat_kit._args import int_at_least

__all__ = [
    "ChainSchedule",
    "apply_chain_plan",
    "optimal_forward_steps",
    "revolve_schedule",
    "simulate",
    "solve_chain",
]


def _beta(s: int, t: int) -> int:
  """``binom(s + t, s)``: the most steps ``s`` slots reverse with ``t`` repetitions."""
  if s < 0 or t < 0:
    return 0
  return math.comb(s + t, s)


def optimal_forward_steps(num_steps: int, num_slots: int) -> int:
  """Least forward steps to reverse ``num_steps`` steps with ``num_slots`` stored states.

  ``num_slots`` states can be stored besides the input (which is always
  kept). Reversing a step re-runs that step itself, which is not counted;
  every other forward step is (the first sweep included). Griewank's closed
  form counts the input among the snapshots, so with ``s = num_slots + 1``
  and the repetition number ``t`` such that ``beta(s, t-1) < n <= beta(s, t)``
  the answer is ``t*n - beta(s+1, t-1)``.

  >>> optimal_forward_steps(3, 1), optimal_forward_steps(10, 0), optimal_forward_steps(8, 7)
  (2, 45, 7)
  """
  n = int_at_least("optimal_forward_steps", "num_steps", num_steps, 1)
  s = int_at_least("optimal_forward_steps", "num_slots", num_slots, 0) + 1
  t = 0
  while _beta(s, t) < n:
    t += 1
  return t * n - _beta(s + 1, t - 1)


def revolve_schedule(num_steps: int, num_slots: int) -> list[tuple[str, int]]:
  """An optimal schedule for a uniform chain, as actions.

  Actions: ``("advance", k)`` runs k steps forward from the current state;
  ``("store", i)`` keeps state i in a slot; ``("restore", i)`` resumes from
  stored state i (0 is the input); ``("reverse", i)`` back-propagates
  through step i, re-running it; ``("free", i)`` gives state i's slot back.
  The advances add up to :func:`optimal_forward_steps`.

  >>> revolve_schedule(3, 1)  # doctest: +NORMALIZE_WHITESPACE
  [('advance', 1), ('store', 1), ('advance', 1), ('reverse', 3), ('restore', 1),
   ('reverse', 2), ('free', 1), ('restore', 0), ('reverse', 1)]
  """
  n = int_at_least("revolve_schedule", "num_steps", num_steps, 1)
  s = int_at_least("revolve_schedule", "num_slots", num_slots, 0)
  actions: list[tuple[str, int]] = []
  current = [0]

  def go(lo: int, steps: int) -> None:
    if current[0] != lo:
      actions.append(("restore", lo))
    if steps:
      actions.append(("advance", steps))
    current[0] = lo + steps

  def reverse(i: int) -> None:
    actions.append(("reverse", i))
    current[0] = -1

  def rev(lo: int, hi: int, slots: int) -> None:
    """Reverse steps lo+1..hi, state lo stored."""
    if hi - lo == 1:
      go(lo, 0)
      reverse(hi)
      return
    if slots == 0:
      for i in range(hi, lo, -1):
        go(lo, i - 1 - lo)
        reverse(i)
      return
    k = _split(hi - lo, slots)
    go(lo, k)
    actions.append(("store", lo + k))
    rev(lo + k, hi, slots - 1)
    actions.append(("free", lo + k))
    rev(lo, lo + k, slots)

  rev(0, n, s)
  return actions


@functools.cache
def _uniform_table(n: int, s: int) -> tuple[int, int]:
  """(cost, best split) of reversing n steps with s slots, by the exact recursion."""
  if n == 1:
    return 0, 0
  if s == 0:
    return n * (n - 1) // 2, 0
  best = None
  for k in range(1, n):
    c = k + _uniform_table(n - k, s - 1)[0] + _uniform_table(k, s)[0]
    if best is None or c < best[0]:
      best = (c, k)
  assert best is not None  # n >= 2 here  # noqa: S101 - internal invariant, not input
  return best


def _split(n: int, s: int) -> int:
  """Where to place the first checkpoint in an optimal uniform schedule."""
  if n <= 400:
    return _uniform_table(n, s)[1]
  # Binomial rule for long chains: the largest k whose remainder the other slots reverse
  # as cheaply as the closed form allows.
  target = optimal_forward_steps(n, s)
  for k in range(n - 1, 0, -1):
    if k + optimal_forward_steps(n - k, s - 1) + optimal_forward_steps(k, s) == target:
      return k
  raise RuntimeError(f"no optimal split for n={n}, s={s}: the closed form is inconsistent")


@dataclasses.dataclass(frozen=True)
class ChainSchedule:
  """The solver's answer for a chain.

  Attributes:
    cost: forward compute spent beyond one run of each layer (the
      recomputation), in the units of ``forward_costs``.
    peak_bytes: the schedule's peak of stored checkpoints and residuals.
    checkpoints: layer indices (0-based) whose inputs the first forward
      sweep keeps, ascending.
    tree: the schedule as nested tuples ``("save", s, t)`` (run layers s..t
      saving everything) or ``("ckpt", s, k, t, right, left)``.
    exact: False when the chain was solved in blocks (``max_exact``): the
      plan is feasible and its cost is simulated, but checkpoints sit only
      on block boundaries.
    bound_budget: the plan costs no more than the optimal schedule within
      this many bytes: the budget itself when the DP ran on exact sizes,
      less when it rounded them to a grid (None for block plans).
  """

  cost: float
  peak_bytes: float
  checkpoints: tuple[int, ...]
  tree: Any
  exact: bool = True
  bound_budget: float | None = None


def _validate_chain(api: str, forward_costs: Sequence[float], act_bytes: Sequence[float],
                    ckpt_bytes: Sequence[float]) -> int:
  n = len(forward_costs)
  if n == 0:
    raise ValueError(f"`{api}`: the chain is empty.")
  for name, seq in (("act_bytes", act_bytes), ("ckpt_bytes", ckpt_bytes)):
    if len(seq) != n:
      raise ValueError(f"`{api}`: `{name}` has {len(seq)} entries for {n} layers.")
  for name, seq in (("forward_costs", forward_costs), ("act_bytes", act_bytes),
                    ("ckpt_bytes", ckpt_bytes)):
    bad = [x for x in seq if not isinstance(x, (int, float)) or x < 0]
    if bad:
      raise ValueError(f"`{api}`: `{name}` must be non-negative numbers, got {bad[:3]}.")
  return n


def solve_chain(forward_costs: Sequence[float], act_bytes: Sequence[float],
                ckpt_bytes: Sequence[float], budget: float, *, grid: int | None = None,
                max_exact: int | None = None, max_units: int = 4096) -> ChainSchedule:
  """The least-recompute schedule for an uneven chain under a memory budget.

  Layer i costs ``forward_costs[i]`` to run, keeps ``act_bytes[i]`` of
  internal residuals when run with saving, and its input is
  ``ckpt_bytes[i]`` bytes (the chain's input, ``ckpt_bytes[0]``, is always
  kept and not counted). Reversing a stretch s..t either runs it once with
  saving (memory: its residuals plus the inputs of layers s+1..t) or runs
  forward to some k, keeps layer k's input, reverses k..t in what is left,
  then s..k-1.

  Exactness: when every byte size is an integer (byte counts) and ``grid``
  is None, the DP runs on the exact sizes in units of their greatest common
  divisor, and its plan is optimal, as long as the budget is at most
  ``max_units`` such units (tensor sizes share large factors, so this is
  the usual case). Otherwise memory is rounded up to ``grid`` (1024 by
  default) steps of ``unit = budget / grid``: the plan always fits, and its
  cost is at most the exact optimum under ``budget - 2 * n * unit`` (a
  schedule keeps at most ``2n`` items live, each rounded up by under one
  unit). The plan's ``bound_budget`` says which guarantee holds.

  The DP costs O(n^3 * grid). For longer chains pass ``max_exact``: the
  chain is cut into that many blocks of consecutive layers with near-equal
  compute, the block chain is solved exactly, and the plan is expanded
  back (``exact=False``): feasible, its cost simulated layer by layer, but
  with checkpoints only on block boundaries.

  Raises:
    ValueError: for malformed inputs, or when no schedule fits the budget
      (the message gives the least memory that fits).
  """
  n = _validate_chain("solve_chain", forward_costs, act_bytes, ckpt_bytes)
  if not budget > 0:
    raise ValueError(f"`solve_chain`: `budget` must be > 0, got {budget!r}.")
  if max_exact is not None and n > max_exact:
    int_at_least("solve_chain", "max_exact", max_exact, 1)
    return _solve_blocks(forward_costs, act_bytes, ckpt_bytes, budget, grid, max_exact,
                         max_units)
  if grid is not None and (not isinstance(grid, int) or isinstance(grid, bool) or grid < 1):
    raise ValueError(f"`solve_chain`: `grid` must be None or an int >= 1, got {grid!r}.")
  integral = all(float(x).is_integer() for x in (*act_bytes, *ckpt_bytes))
  g = math.gcd(*(int(x) for x in (*act_bytes, *ckpt_bytes))) if integral else 0
  if grid is None and integral and (g == 0 or budget // g <= max_units):
    g = g or 1  # every size is 0
    a = [int(x) // g for x in act_bytes]
    c = [int(x) // g for x in ckpt_bytes]
    cap = int(budget // g)
    bound = float(budget)
  else:
    grid = grid or 1024
    unit = budget / grid
    a = [math.ceil(x / unit - 1e-9) for x in act_bytes]
    c = [math.ceil(x / unit - 1e-9) for x in ckpt_bytes]
    cap = grid
    bound = budget - 2 * n * unit
  f = list(forward_costs)
  pre = [0.0]
  for x in f:
    pre.append(pre[-1] + x)

  def save_mem(s: int, t: int) -> int:
    return sum(a[s:t + 1]) + sum(c[s + 1:t + 1])

  inf = float("inf")

  @functools.cache
  def opt(s: int, t: int, m: int) -> tuple[float, Any]:
    best: tuple[float, Any] = (inf, None)
    if save_mem(s, t) <= m:
      best = (0.0, ("save", s, t))
    for k in range(s + 1, t + 1):
      if c[k] > m:
        continue
      right = opt(k, t, m - c[k])
      if right[0] == inf:
        continue
      left = opt(s, k - 1, m)
      cost = pre[k] - pre[s] + right[0] + left[0]
      if cost < best[0]:
        best = (cost, ("ckpt", s, k, t, right[1], left[1]))
    return best

  cost, tree = opt(0, n - 1, cap)
  opt.cache_clear()
  if tree is None:
    least = _least_memory(f, act_bytes, ckpt_bytes)
    raise ValueError(
        f"`solve_chain`: no schedule fits `budget`={budget:,.0f} bytes; the least memory any "
        f"schedule needs is {least:,.0f} bytes (each layer's residuals while it is "
        "reversed, plus the checkpoints kept meanwhile). Raise the budget.")
  peak, sim_cost = simulate(tree, f, act_bytes, ckpt_bytes)
  return ChainSchedule(sim_cost, peak, tuple(sorted(_first_sweep_ckpts(tree))), tree,
                   bound_budget=bound)


def _solve_blocks(f: Sequence[float], a: Sequence[float], c: Sequence[float], budget: float,
                  grid: int | None, blocks: int, max_units: int) -> ChainSchedule:
  n = len(f)
  total = sum(f) or n
  starts, acc = [0], 0.0
  for i in range(n - 1):
    acc += f[i] if sum(f) else 1
    if acc >= total * len(starts) / blocks and len(starts) < blocks:
      starts.append(i + 1)
  ends = [s - 1 for s in starts[1:]] + [n - 1]
  bf = [sum(f[s:e + 1]) for s, e in zip(starts, ends)]
  ba = [sum(a[s:e + 1]) + sum(c[s + 1:e + 1]) for s, e in zip(starts, ends)]
  bc = [c[s] for s in starts]
  block_plan = solve_chain(bf, ba, bc, budget, grid=grid, max_units=max_units)

  def expand(node: Any) -> Any:
    if node[0] == "save":
      return ("save", starts[node[1]], ends[node[2]])
    _, s, k, t, right, left = node
    return ("ckpt", starts[s], starts[k], ends[t], expand(right), expand(left))

  tree = expand(block_plan.tree)
  peak, cost = simulate(tree, f, a, c)
  return ChainSchedule(cost, peak, tuple(sorted(_first_sweep_ckpts(tree))), tree, exact=False)


def _least_memory(f: Sequence[float], act_bytes: Sequence[float],
                  ckpt_bytes: Sequence[float]) -> float:
  # Reversing layer t needs at least its input and its residuals; running forward from the
  # chain's input to each layer in turn needs nothing more.
  del f
  return max([act_bytes[0]] + [c + a for c, a in zip(ckpt_bytes[1:], act_bytes[1:])])


def _first_sweep_ckpts(tree: Any) -> list[int]:
  if tree[0] == "save":
    return []
  _, _, k, _, right, _ = tree
  return [k] + _first_sweep_ckpts(right)


def simulate(tree: Any, forward_costs: Sequence[float], act_bytes: Sequence[float],
             ckpt_bytes: Sequence[float]) -> tuple[float, float]:
  """Runs a schedule tree step by step: (peak live bytes, recompute cost).

  Independent of the solvers' recursions: it tracks which inputs and
  residuals are alive at every step.
  """
  live: dict[tuple[str, int], float] = {}
  peak = [0.0]
  cost = [0.0]

  def bump() -> None:
    peak[0] = max(peak[0], sum(live.values()))

  def run(node: Any) -> None:
    if node[0] == "save":
      _, s, t = node
      for i in range(s, t + 1):  # forward with saving: inputs of s+1..t and residuals
        if i > s:
          live[("in", i)] = ckpt_bytes[i]
        live[("res", i)] = act_bytes[i]
        bump()
      for i in range(t, s - 1, -1):  # backward frees as it goes
        live.pop(("res", i))
        live.pop(("in", i), None)
      return
    _, s, k, t, right, left = node
    cost[0] += sum(forward_costs[s:k])  # advance from input s to input k
    live[("ckpt", k)] = ckpt_bytes[k]
    bump()
    run(right)
    live.pop(("ckpt", k))
    run(left)

  run(tree)
  return peak[0], cost[0]


def apply_chain_plan(plan: ChainSchedule | Any, layers: Sequence[Any]) -> Any:
  """The chain ``layers[0] -> ... -> layers[n-1]`` run as ``plan`` says, with ``jax.checkpoint``.

  Each ``("ckpt", s, k, t, right, left)`` node becomes ``right(checkpoint(left)(x))``:
  the first sweep keeps only layer k's input for the left stretch, whose
  backward recomputes it (recursively, as its own subtree says); a
  ``("save", s, t)`` leaf runs its layers plainly, keeping their residuals.
  The recomputation JAX then performs is the plan's ``cost`` (when costs are
  the layers' forward FLOPs): compare with
  :func:`remat_kit.report.flop_breakdown`.

  Args:
    plan: a :class:`ChainSchedule` (or its ``tree``).
    layers: one function per layer, ``x -> x``.

  Returns:
    ``x -> output`` for the whole chain.
  """
  import jax

  tree = plan.tree if isinstance(plan, ChainSchedule) else plan

  def build(node: Any) -> Any:
    if node[0] == "save":
      _, s, t = node
      fns = list(layers[s:t + 1])

      def run(x: Any) -> Any:
        for f in fns:
          x = f(x)
        return x
      return run
    _, _, _, _, right, left = node
    lhs, rhs = jax.checkpoint(build(left)), build(right)
    return lambda x: rhs(lhs(x))

  n = len(layers)
  if tree[1] != 0 or tree[-1 if tree[0] == "save" else 3] != n - 1:
    raise ValueError(f"`apply_chain_plan`: the plan covers layers {tree[1]}.."
                     f"{tree[-1 if tree[0] == 'save' else 3]}, but {n} layers were given.")
  return build(tree)
