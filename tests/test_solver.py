"""Chain solvers against Griewank's closed form and exhaustive search."""

import functools
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remat_kit.solver import optimal_forward_steps, revolve_schedule, simulate, solve_chain


@functools.cache
def _dp(n, s):
  """Least forward steps by plain recursion over the first checkpoint (revolve's model)."""
  if n == 1:
    return 0
  if s == 0:
    return n * (n - 1) // 2
  return min(k + _dp(n - k, s - 1) + _dp(k, s) for k in range(1, n))


def test_closed_form_equals_recursion_up_to_200_steps_and_10_slots():
  bad = [(n, s) for n in range(1, 201) for s in range(0, 11)
         if optimal_forward_steps(n, s) != _dp(n, s)]
  assert bad == []


def _run_schedule(actions, n, s):
  """Executes revolve actions; returns the forward steps, checking every rule."""
  stored, current, reversed_, steps = {0}, 0, [], 0
  for op, i in actions:
    if op == "advance":
      assert current is not None and current + i <= n
      current += i
      steps += i
    elif op == "store":
      assert i == current and len(stored) - 1 < s
      stored.add(i)
    elif op == "restore":
      assert i in stored
      current = i
    elif op == "free":
      stored.remove(i)
    elif op == "reverse":
      assert current == i - 1 and i == n - len(reversed_)
      reversed_.append(i)
      current = None
  assert reversed_ == list(range(n, 0, -1))
  return steps


@pytest.mark.parametrize(("n", "s"), [(1, 0), (5, 0), (7, 1), (20, 2), (55, 3), (200, 4),
                                      (1000, 10)])
def test_revolve_schedule_is_valid_and_optimal(n, s):
  assert _run_schedule(revolve_schedule(n, s), n, s) == optimal_forward_steps(n, s)


def _trees(s, t):
  """Every schedule tree for reversing layers s..t."""
  yield ("save", s, t)
  for k in range(s + 1, t + 1):
    for right in _trees(k, t):
      for left in _trees(s, k - 1):
        yield ("ckpt", s, k, t, right, left)


chains = st.integers(1, 5).flatmap(lambda n: st.tuples(
    st.lists(st.integers(1, 5), min_size=n, max_size=n),
    st.lists(st.integers(0, 6), min_size=n, max_size=n),
    st.lists(st.integers(1, 4), min_size=n, max_size=n),
    st.integers(1, 40)))


@settings(max_examples=150, deadline=None)
@given(chains)
def test_uneven_dp_equals_exhaustive_search(chain):
  f, a, c, budget = chain
  n = len(f)
  best = None
  for tree in _trees(0, n - 1):
    peak, cost = simulate(tree, f, a, c)
    if peak <= budget and (best is None or cost < best):
      best = cost
  if best is None:
    with pytest.raises(ValueError, match="no schedule fits"):
      solve_chain(f, a, c, budget)
    return
  plan = solve_chain(f, a, c, budget)  # integer sizes: exact, no rounding
  assert plan.cost == best
  assert plan.peak_bytes <= budget
  assert plan.bound_budget == budget


def _brute(f, a, c, budget):
  costs = [cost for tree in _trees(0, len(f) - 1)
           for peak, cost in [simulate(tree, f, a, c)] if peak <= budget]
  return min(costs) if costs else None


@settings(max_examples=120, deadline=None)
@given(chains, st.integers(2, 12))
def test_a_grid_plan_fits_and_meets_its_stated_bound(chain, grid):
  f, a, c, budget = chain
  try:
    plan = solve_chain(f, a, c, budget, grid=grid)
  except ValueError:
    return
  assert plan.peak_bytes <= budget
  assert plan.bound_budget == pytest.approx(budget - 2 * len(f) * budget / grid)
  best_within_bound = _brute(f, a, c, plan.bound_budget)
  if best_within_bound is not None:
    assert plan.cost <= best_within_bound


def test_exact_integer_plans_beat_block_plans_on_a_long_uneven_chain():
  """80 layers at 25% of the no-remat bytes: the exact DP is never beaten (it was by 4%)."""
  import random
  rng = random.Random(0)
  f = [rng.randint(1, 10) * 1000 for _ in range(80)]
  a = [rng.randint(1, 8) * 4096 for _ in range(80)]
  c = [rng.randint(1, 4) * 1024 for _ in range(80)]
  budget = (sum(a) + sum(c[1:])) // 4
  exact = solve_chain(f, a, c, budget)
  assert exact.bound_budget == budget and exact.peak_bytes <= budget
  for blocks in (10, 20, 40):
    assert exact.cost <= solve_chain(f, a, c, budget, max_exact=blocks).cost
  assert exact.cost <= solve_chain(f, a, c, budget, grid=256).cost


def test_solve_chain_errors_and_least_memory():
  with pytest.raises(ValueError, match=r"least memory any schedule needs is 9 bytes"):
    solve_chain([1, 1], [4, 5], [2, 4], 8)
  with pytest.raises(ValueError, match=r"`act_bytes` has 1 entries for 2 layers"):
    solve_chain([1, 1], [4], [2, 4], 8)
  with pytest.raises(ValueError, match=r"`budget` must be > 0"):
    solve_chain([1], [1], [1], 0)
  with pytest.raises(ValueError, match=r"`num_slots` must be an int >= 0, got -1"):
    optimal_forward_steps(3, -1)


def test_more_memory_never_costs_more():
  f, a, c = [2, 1, 3, 1, 2, 2], [4, 1, 5, 2, 3, 1], [1, 2, 1, 1, 2, 1]
  costs = [solve_chain(f, a, c, b).cost for b in range(9, 40)]
  assert all(x >= y for x, y in itertools.pairwise(costs))
  assert costs[-1] == 0  # everything fits: no recomputation


def test_applied_plan_recomputes_what_the_plan_predicts():
  """An uneven chain of dense layers: plan cost vs the FLOPs JAX really recomputes."""
  import jax
  import jax.numpy as jnp

  from remat_kit.report import count_flops, flop_breakdown, saved_residuals
  from remat_kit.solver import apply_chain_plan

  widths = [16, 64, 32, 96, 32, 64, 16, 48, 32]
  batch = 8
  ws = [jnp.full((a, b), 0.01, jnp.float32) for a, b in itertools.pairwise(widths)]
  layer = lambda w, x: jnp.tanh(x @ w)
  costs, acts, ckpts = [], [], []
  for w, a in zip(ws, widths):
    x = jnp.ones((batch, a), jnp.float32)
    costs.append(count_flops(layer, w, x))
    acts.append(sum(r.bytes for r in saved_residuals(layer, w, x) if r.kind == "activation"))
    ckpts.append(x.nbytes)
  plain = sum(acts) + sum(ckpts[1:])
  for frac in (0.3, 0.5, 0.8):
    plan = solve_chain(costs, acts, ckpts, frac * plain, grid=512)

    def loss(ws, x, plan=plan):
      fns = [lambda h, w=w: layer(w, h) for w in ws]
      return jnp.sum(apply_chain_plan(plan, fns)(x))

    x0 = jnp.ones((batch, widths[0]))
    measured = flop_breakdown(loss, ws, x0)["recompute"]
    # what the first sweep keeps: the checkpoints, and the last (right-most) saved stretch
    node = plan.tree
    while node[0] == "ckpt":
      node = node[4]
    _, s, t = node
    predicted = sum(ckpts[k] for k in plan.checkpoints) + sum(acts[s:t + 1]) + sum(
        ckpts[s + 1:t + 1])
    kept = sum(r.bytes for r in saved_residuals(loss, ws, x0) if r.kind == "activation")
    print(f"\nbudget {frac:.0%}: plan recompute {plan.cost:.0f} FLOPs, measured {measured} "
          f"(ratio {measured / max(plan.cost, 1):.3f}); first sweep keeps {kept} B, plan "
          f"predicts {predicted} B (ratio {kept / predicted:.3f}: a layer's output is the next "
          f"one's input, which the model counts twice); checkpoints {plan.checkpoints}")
    assert measured == plan.cost
    assert kept <= predicted
    grads = jax.grad(loss)(ws, jnp.ones((batch, widths[0])))
    ref = jax.grad(lambda ws, x: jnp.sum(
        apply_chain_plan(("save", 0, len(ws) - 1), [lambda h, w=w: layer(w, h) for w in ws])(x)))(
            ws, jnp.ones((batch, widths[0])))
    for g, r in zip(grads, ref):
      assert jnp.allclose(g, r, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(chains, st.integers(1, 3))
def test_block_plans_are_feasible_and_never_beat_the_exact_plan(chain, blocks):
  f, a, c, budget = chain
  try:
    exact = solve_chain(f, a, c, budget)
  except ValueError:
    return
  try:
    coarse = solve_chain(f, a, c, budget, max_exact=blocks)
  except ValueError:
    return  # coarser checkpoints may need more memory than the budget
  peak, cost = simulate(coarse.tree, f, a, c)
  assert (peak, cost) == (coarse.peak_bytes, coarse.cost)
  assert peak <= budget and cost >= exact.cost
  assert coarse.exact is (len(f) <= blocks)
