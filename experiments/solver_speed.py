"""How fast the chain solvers are (a benchmark, not a test).

    python -m experiments.solver_speed

Prints the time for an optimal uniform schedule of L=1000 layers (revolve),
for the exact uneven-chain dynamic program at growing lengths, and for the
block-coarsened solver on L=1000 uneven layers (with its gap to the exact
plan where the exact one is affordable).
"""

from __future__ import annotations

import random
import time

from remat_kit import solver


def _time(fn, *args, **kw):
  t0 = time.perf_counter()
  out = fn(*args, **kw)
  return out, time.perf_counter() - t0


def main() -> int:
  for n, s in [(1000, 10), (1000, 4), (1000, 31)]:
    steps, t1 = _time(solver.optimal_forward_steps, n, s)
    sched, t2 = _time(solver.revolve_schedule, n, s)
    adv = sum(k for a, k in sched if a == "advance")
    print(f"uniform L={n}, slots={s}: {steps} forward steps (closed form {t1 * 1e3:.2f} ms); "
          f"schedule of {len(sched)} actions in {t2:.3f} s, advances {adv} "
          f"({'matches' if adv == steps else 'DIFFERS'})")
  rng = random.Random(0)
  for n in (10, 20, 40, 80):
    f = [rng.uniform(1, 3) for _ in range(n)]
    a = [rng.uniform(2, 6) for _ in range(n)]
    c = [rng.uniform(0.5, 1.5) for _ in range(n)]
    budget = 0.3 * (sum(a) + sum(c))
    plan, t = _time(solver.solve_chain, f, a, c, budget, grid=64)
    print(f"uneven L={n}: recompute {plan.cost:.1f} of forward {sum(f):.1f}, peak "
          f"{plan.peak_bytes:.1f} <= budget {budget:.1f}, solved in {t:.3f} s")
  for n, blocks in [(80, 40), (1000, 40)]:
    f = [rng.uniform(1, 3) for _ in range(n)]
    a = [rng.uniform(2, 6) for _ in range(n)]
    c = [rng.uniform(0.5, 1.5) for _ in range(n)]
    budget = 0.3 * (sum(a) + sum(c))
    coarse, t = _time(solver.solve_chain, f, a, c, budget, grid=256, max_exact=blocks)
    line = (f"uneven L={n} in {blocks} blocks: recompute {coarse.cost:.1f}, peak "
            f"{coarse.peak_bytes:.1f} <= {budget:.1f}, solved in {t:.3f} s")
    if n <= 80:
      exact = solver.solve_chain(f, a, c, budget, grid=256)
      line += f"; exact DP {exact.cost:.1f} (blocks cost {coarse.cost / exact.cost - 1:+.1%})"
    print(line)
  # Integer byte sizes (tensor sizes share large factors): the DP runs exactly.
  rng = random.Random(0)
  n = 80
  f = [rng.randint(1, 10) * 1000 for _ in range(n)]
  a = [rng.randint(1, 8) * 4096 for _ in range(n)]
  c = [rng.randint(1, 4) * 1024 for _ in range(n)]
  budget = (sum(a) + sum(c[1:])) // 4
  exact, t = _time(solver.solve_chain, f, a, c, budget)
  grid = solver.solve_chain(f, a, c, budget, grid=256)
  blocks = solver.solve_chain(f, a, c, budget, max_exact=20)
  print(f"uneven L={n}, integer bytes, 25% budget: exact DP recompute {exact.cost:,.0f} in "
        f"{t:.2f} s (bound = budget: {exact.bound_budget == budget}); 256-step grid "
        f"{grid.cost:,.0f}; 20 blocks {blocks.cost:,.0f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
