"""auto for a chain of uneven layers: size each layer, solve exactly, build with checkpoints."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from remat_kit import targets
from remat_kit.planner.result import (
  AutoResult,
  Candidate,
  Coster,
  Roofline,
  check_options,
  parse_bytes,
)
from remat_kit.report import compiled_memory, count_flops, saved_residuals
from remat_kit.report.core import memory_fields
from remat_kit.report.timing import time_interleaved
from remat_kit.solver import ChainSchedule, apply_chain_plan, solve_chain

__all__ = ["auto_chain"]

def _nbytes(tree: Any) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def auto_chain(layers: Sequence[Callable[[Any, Any], Any]], params: Sequence[Any], x: Any, *,
               budget: int | float | str, budget_kind: str = "temp", cost: str = "auto",
               roofline: Roofline | None = None, repeats: int = 5, verbose: bool = False,
               target: Any = None, max_tries: int = 8) -> AutoResult:
  """:func:`auto` for a chain ``x -> layers[0](params[0], x) -> ...`` of uneven layers.

  Each layer is sized: its forward cost (estimated on ``target``, timed
  locally, or a calibrated roofline), the activation bytes its backward keeps
  and its input bytes. :func:`remat_kit.solver.solve_chain` finds the
  least-recompute schedule exactly (integer byte sizes), and the chain is
  built with :func:`remat_kit.solver.apply_chain_plan`. The solver's memory
  model leaves out what the compiled step adds (gradients, workspace), so
  the plan is compiled and, while it exceeds ``budget``, solved again with
  the solver's budget lowered by the excess (at most ``max_tries`` times).
  Every try is a candidate in the result.
  """
  t = targets.parse_target(target)
  kind = check_options(cost, budget_kind, t)
  budget_bytes = parse_bytes(budget)
  if len(layers) != len(params) or not layers:
    raise ValueError(f"`auto`: a chain needs one entry of `params` per layer; got "
                     f"{len(layers)} layers and {len(params)} parameter entries.")
  bad = [i for i, f in enumerate(layers) if not callable(f)]
  if bad:
    raise TypeError(f"`auto`: layers {bad} are not callable; pass functions f(params, x) -> x.")
  coster = Coster(kind, roofline, t)
  opts = ({"xla_disable_hlo_passes": "cse_barrier_expander"}
          if t.is_local and jax.default_backend() == "cpu" else None)
  inputs, h = [], x
  for f, p in zip(layers, params):
    inputs.append(h)
    h = jax.eval_shape(f, p, h)
  ckpt = [_nbytes(i) for i in inputs]
  acts, fcost, steps = [], [], {}
  for i, (f, p) in enumerate(zip(layers, params)):
    part = lambda p, h, f=f: jnp.sum(f(p, h).astype(jnp.float32))
    acts.append(sum(r.bytes for r in saved_residuals(part, p, inputs[i])
                    if r.kind == "activation"))
    if kind == "measured":
      fwd = jax.jit(f)
      hi = jnp.zeros(inputs[i].shape, inputs[i].dtype)
      steps[str(i)] = lambda fwd=fwd, p=p, hi=hi: fwd(p, hi)
    else:
      mem = compiled_memory(f, p, inputs[i], target=t, hbm_bytes=True)
      layer_s, why = coster(count_flops(f, p, inputs[i]), mem)
      if layer_s is None:  # a roofline without a host rate, for a layer that moves host bytes
        raise ValueError(f"`auto`: no {kind} cost for chain layer {i}: {why}")
      fcost.append(layer_s)
  if kind == "measured":
    timed = time_interleaved(steps, repeats)
    fcost = [timed[str(i)].median_s for i in range(len(layers))]

  def chain_fn(plan: ChainSchedule) -> Callable[..., Any]:
    def run(ps: Sequence[Any], x: Any) -> Any:
      bound = [lambda h, f=f, p=p: f(p, h) for f, p in zip(layers, ps)]
      return apply_chain_plan(plan, bound)(x)
    return run

  def loss_of(fn: Callable[..., Any]) -> Callable[..., Any]:
    return lambda ps, x: jnp.sum(fn(ps, x).astype(jnp.float32))

  plain = count_flops(jax.grad(lambda ps, x: jnp.sum(_run_plain(layers, ps, x)
                                                      .astype(jnp.float32))), list(params), x)
  tried: list[Candidate] = []
  model_budget = budget_bytes
  for n_try in range(max_tries):
    try:
      plan = solve_chain(fcost, acts, ckpt, model_budget)
    except ValueError as e:
      if not tried:
        raise ValueError(f"`auto`: no schedule of this chain fits `budget`={budget_bytes:,} "
                         f"bytes: {e}") from None
      break
    fn = chain_fn(plan)
    grad = jax.grad(loss_of(fn))
    compiled = targets.compile_for(grad, t, list(params), x, compiler_options=opts)
    mem = memory_fields(compiled, t, hbm_bytes=kind != "measured")
    flops = count_flops(grad, list(params), x)
    cost_s: float | None
    if kind == "measured":
      # Timed at once, in this iteration: the lambda may read `compiled` as it is.
      step = time_interleaved({"plan": lambda: compiled(list(params), x)}, repeats)["plan"]
      cost_s, spread, source, n = (step.median_s, step.spread_s,
                                   f"timed: median of {step.n} steps", step.n)
    else:
      cost_s, source = coster(flops, mem)
      spread, n = 0.0, 1
    cand = Candidate(f"chain: checkpoints {list(plan.checkpoints)} (solver budget "
                     f"{model_budget:,} B)", None, None, "chain", mem["temp_size"],
                     mem["peak_bytes"], 0, flops,
                     100.0 * (flops - plain) / plain if plain else 0.0, cost_s, spread, kind,
                     source, n)
    tried.append(cand)
    if verbose:
      print(f"auto chain [{n_try + 1}] {cand.label}: {budget_kind} "
            f"{cand.nbytes(budget_kind):,} B", file=sys.stderr, flush=True)
    excess = cand.nbytes(budget_kind) - budget_bytes
    if excess <= 0:
      return AutoResult(budget_bytes, budget_kind, cand, tried, fn=fn, plan=plan)
    model_budget -= excess
    if model_budget <= 0:
      break
  least = min(tried, key=lambda c: c.nbytes(budget_kind))
  raise ValueError(f"`auto`: no schedule of this chain fits `budget`={budget_bytes:,} bytes of "
                   f"compiled {budget_kind} memory; the least reached is "
                   f"{least.nbytes(budget_kind):,} bytes ({least.label}). Raise the budget.")


def _run_plain(layers: Sequence[Callable[..., Any]], ps: Sequence[Any], x: Any) -> Any:
  for f, p in zip(layers, ps):
    x = f(p, x)
  return x

