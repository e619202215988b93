"""Give a byte budget, get the cheapest remat plan that fits: `auto`, `auto_remat`.

:func:`auto_remat` plans any loss per tensor (what to save, offload or recompute,
layer by layer) with an exact solver; :func:`auto` chooses among policies for a
model that takes one (presets, the model's tags, nesting, offload).

Cost is step time, obtained honestly, never from invented constants:

* ``cost="estimated"`` (an accelerator ``target``): the target's
  ``estimated_seconds`` (:mod:`remat_kit.report.estimate`: FLOPs with scan
  trip counts at the chip's peak plus the compiled program's HBM bytes at its
  bandwidth; never the compiler's raw ``optimal_seconds``).
* ``cost="measured"`` (the local backend, CPU included): every candidate's
  compiled step is timed in interleaved rounds (:mod:`remat_kit.report.timing`)
  with its spread recorded; candidates whose timings overlap are tied, and the
  tie goes to the one using less memory.
* ``cost="roofline"``: FLOPs and compiled HBM bytes at rates measured on the
  local device first (:meth:`Roofline.measure`), or at rates the caller gives,
  labelled with where they come from.

The search, for a model with ``policy`` and ``levels`` attributes (the
reference models, :class:`remat_kit.flax.LayerStack`) or a function
``build(policy=..., levels=...) -> loss``, compiles every candidate:

1. every preset in the registry (:func:`remat_kit.policies.registered`) that
   applies to the model (its names are tagged; offload where the target has
   host memory), aliases counted once;
2. every subset of the `checkpoint_name` tags when there are at most
   ``max_names_exact`` (12) of them: the search is exact; above that, each
   name alone and, per budget, the ``max_subsets`` subsets a knapsack over
   the single-name measurements ranks best, each compiled and costed;
3. nested scans (``levels`` 2 and 3) under full remat and the
   name-free presets;
4. offloading each name, and all of them, where the target has host memory.

Every candidate, its bytes, its cost and where they come from are in the
result. The plan returned is the least-cost candidate whose compiled bytes
(temp, or peak with ``budget_kind="peak"``) fit the budget; a larger budget
never returns a costlier plan (with measured costs: never costlier beyond the
timing noise, as ties go to memory).

For a chain of uneven layers given as a list of functions, :func:`auto` sizes
each layer, solves the chain exactly (:func:`remat_kit.solver.solve_chain`)
and builds the plan with :func:`remat_kit.solver.apply_chain_plan`.
"""

from remat_kit.planner.auto_remat import (
    PREFIX,
    Plan,
    Planner,
    PlanRow,
    auto_remat,
    auto_remat_frontier,
)
from remat_kit.planner.chain import auto_chain
from remat_kit.planner.result import (
    AutoResult,
    Candidate,
    Roofline,
    choose,
    parse_bytes,
)
from remat_kit.planner.search import Search, auto

__all__ = ["PREFIX", "AutoResult", "Candidate", "Plan", "PlanRow", "Planner", "Roofline", "Search",
           "auto",
           "auto_chain", "auto_remat", "auto_remat_frontier", "choose", "parse_bytes"]
