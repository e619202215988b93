"""remat_kit.report.timing: step times a shared machine cannot fake."""

import time

import jax.numpy as jnp

from remat_kit.report.timing import (
  MIN_ROUNDS,
  RELIABLE,
  Timing,
  faster,
  pareto_front,
  tied,
  time_interleaved,
)


def test_a_budget_never_leaves_a_timing_without_a_spread():
  steps = {"a": lambda: jnp.ones(3) * 2, "b": lambda: jnp.ones(3) + 1}
  timed = time_interleaved(steps, repeats=10, budget_s=1e-6)
  assert all(t.n == MIN_ROUNDS for t in timed.values())


def test_one_step_is_never_reliable():
  assert not Timing(1.0, 0.0, 1).reliable
  assert Timing(1.0, 0.0, MIN_ROUNDS).reliable
  assert not Timing(1.0, 2 * RELIABLE, 10).reliable


def test_arguments_are_made_outside_the_timed_region():
  made = []

  def make():
    time.sleep(0.05)  # would dominate every timing if it were inside
    made.append(1)
    return (jnp.ones(4),)

  timed = time_interleaved({"f": lambda x: x * 2}, repeats=3, max_rounds=3, args={"f": make})
  assert len(made) == 1 + 3  # the warm-up and each round
  assert timed["f"].median_s < 0.04


def test_faster_tied_and_the_frontier():
  slow, fast, close = Timing(2.0, 0.1, 9), Timing(1.0, 0.1, 9), Timing(1.05, 0.1, 9)
  assert faster(fast, slow) and not faster(slow, fast)
  assert tied(fast, close) and not faster(fast, close)
  plans = {"full": (1, slow), "dots": (2, close), "none": (3, fast)}
  # 'none' is not faster than 'dots' beyond the spreads: the tie goes to less memory.
  assert pareto_front(plans, lambda k: plans[k][0], lambda k: plans[k][1]) == ["full", "dots"]
