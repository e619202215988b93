"""The bench's "auto" strategy: `remat_kit.auto` at a budget, one search per model.

The search holds the bench's fixed strategies as candidates and times them
with its own in one interleaved pass; the bench reports those timings for
both (:func:`timing_of`), so auto's choice and the plot read one measurement.

The budget is a fraction of the compiled temp bytes of the gradient without
remat; the plan must fit it. (The tests use fractions of the activation
bytes instead; temp also holds gradient buffers and workspace, so on small
models a fraction of activations can be below what any plan reaches.)
"""

from __future__ import annotations

from typing import Any

import jax

from remat_kit.planner import Search

_SEARCHES: dict[str, Search] = {}


def _search(model: Any, repeats: int = 5, time_budget_s: float | None = None) -> Search:
  if model.describe in _SEARCHES:
    return _SEARCHES[model.describe]
  inputs = model.inputs(jax.random.key(1))
  module = model.build(**model.strategies["no remat"])
  params = jax.jit(lambda k: module.init({"params": k, "dropout": jax.random.key(3)},
                                         *inputs))(jax.random.key(0))["params"]
  # The bench's own fixed strategies (so its "auto check" compares like with like), each
  # tagged name alone plus the two best knapsack subsets per budget (an exhaustive subset
  # search is experiments.auto_vs_exhaustive's job), and nesting in 2 levels; costs timed
  # in interleaved rounds on the local backend. Kept small for `make bench`'s time.
  presets = [kw["policy"] for kw in model.strategies.values()
             if "policy" in kw and "levels" not in kw]
  # search="exhaustive": the bench compiles and times its fixed strategies anyway, so the
  # policy search costs them the same way; the per-tensor plan has a section of its own
  # (experiments.auto_remat_frontier).
  search = Search(module, params, *inputs, rngs={"dropout": jax.random.key(2)},
                  presets=presets, max_names_exact=0, max_subsets=2, levels=(2,),
                  repeats=repeats, verbose=True, time_budget_s=time_budget_s,
                  search="exhaustive", per_tensor=False)
  # Every fixed strategy is a candidate too (nested and offload ones included), so the
  # bench's rows are timed in the same interleaved pass that auto chooses from.
  for name, kw in model.strategies.items():
    if set(kw) <= {"policy", "levels"}:
      search.measure(f"bench: {name}", kw.get("policy", True), kw.get("levels"), "bench")
  _SEARCHES[model.describe] = search
  return search


def timing_of(model: Any, kw: dict[str, Any]) -> dict[str, Any] | None:
  """The bench's timing fields for the plan ``kw``, from the search's timing pass.

  None where the search has no such plan, or has not timed it (no auto budget ran).
  """
  search = _SEARCHES.get(model.describe)
  if search is None or not set(kw) <= {"policy", "levels"}:
    return None
  cand = search.candidate(kw.get("policy", True), kw.get("levels"))
  if cand is None or cand.cost_s is None:
    return None
  return {"step_ms_median": cand.cost_s * 1e3, "step_ms_spread": cand.cost_spread_s * 1e3,
          "step_ms_n": cand.cost_n,
          "timing_reliable": cand.timing.reliable,
          "timing_source": "auto's search: " + cand.cost_source}


def plan_for(model: Any, fraction: float, repeats: int = 5, fractions: tuple[float, ...] = (),
             time_budget_s: float | None = None) -> dict[str, Any]:
  """``{"policy": ..., "levels": ...}`` for ``model`` within ``fraction`` of its no-remat temp.

  Raises:
    ValueError: if no plan fits (with the least memory reached).
  """
  fresh = model.describe not in _SEARCHES
  search = _search(model, repeats, time_budget_s)
  if fresh:
    # Every budget first: each may add knapsack subsets, and their timing pass may time
    # near ties again; the plans are then read from the timings as they end up.
    for f in fractions:
      try:
        search.solve(int(f * search.none.temp_bytes))
      except ValueError:
        pass
  budget = int(fraction * search.none.temp_bytes)
  result = search.solve(budget)
  return {"policy": result.choice.policy, "levels": result.choice.levels,
          "auto_choice": result.choice.label, "budget_bytes": budget}
