"""Step times that a shared machine cannot fake: interleaved rounds, spreads, ties.

A slow spell of a shared machine (other jobs, frequency scaling) hits
whatever runs during it. Timing candidates one after another lets such a
spell rank them; timing them in interleaved rounds (one step of each per
round) spreads it over all of them. Each timing keeps its spread (half the
10th-90th percentile range), and two timings whose median +- spread
intervals overlap are a tie: no decision is taken on noise.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np

from remat_kit import _args

__all__ = ["MIN_ROUNDS", "RELIABLE", "Timing", "faster", "pareto_front", "summary", "tied", "time_interleaved"]

# A timing whose spread is within this fraction of its median is called reliable.
RELIABLE = 0.05
# Fewer steps give no spread worth the name: a time budget never stops a pass before these.
MIN_ROUNDS = 3


@dataclasses.dataclass(frozen=True)
class Timing:
  """A median step time (seconds), its spread, and how many steps it comes from."""

  median_s: float
  spread_s: float
  n: int

  @property
  def reliable(self) -> bool:
    """At least :data:`MIN_ROUNDS` steps, and a spread within :data:`RELIABLE` of the
    median."""
    return self.n >= MIN_ROUNDS and self.spread_s <= RELIABLE * self.median_s


def summary(times: list[float]) -> tuple[float, float]:
  """Median and half the 10th-90th percentile range (robust to one slow step)."""
  q = np.percentile(times, [10, 50, 90])
  return float(q[1]), float((q[2] - q[0]) / 2)


def faster(a: Timing, b: Timing) -> bool:
  """``a`` is faster than ``b`` beyond both spreads."""
  return a.median_s + a.spread_s < b.median_s - b.spread_s


def tied(a: Timing, b: Timing) -> bool:
  """The timings overlap within their spreads."""
  return not faster(a, b) and not faster(b, a)


T = TypeVar("T")


def pareto_front(items: Iterable[T], nbytes: Callable[[T], float],
                 timing: Callable[[T], Timing]) -> list[T]:
  """The memory-time frontier that timing noise cannot fake, by memory ascending.

  From the least memory up, an item joins the frontier only if it is
  :func:`faster` than the last one on it beyond both spreads, so each step along
  the frontier buys a speedup larger than the noise; ties go to less memory.
  Estimates are timings with no spread (``Timing(seconds, 0.0, 1)``).

  Example:
    >>> from remat_kit.report.timing import Timing, pareto_front
    >>> plans = {"full": (1, Timing(1.3, 0.05, 9)), "dots": (2, Timing(1.28, 0.05, 9)),
    ...          "none": (4, Timing(1.0, 0.05, 9))}
    >>> pareto_front(plans, lambda k: plans[k][0], lambda k: plans[k][1])
    ['full', 'none']
  """
  front: list[T] = []
  for item in sorted(items, key=lambda i: (nbytes(i), timing(i).median_s)):
    if not front or faster(timing(item), timing(front[-1])):
      front.append(item)
  return front


def time_interleaved(steps: Mapping[str, Callable[..., Any]], repeats: int = 5,
                     max_rounds: int = 0, budget_s: float | None = None,
                     args: Mapping[str, Callable[[], tuple[Any, ...]]] | None = None
                     ) -> dict[str, Timing]:
  """Times each ``step`` (a call runs one step) in interleaved rounds.

  Each step runs once untimed (compilation, warm-up). Then every round runs
  each step once; rounds continue past ``repeats`` until every spread is
  within :data:`RELIABLE` of its median, up to ``max_rounds`` (default
  ``3 * repeats``). With ``budget_s``, no round starts once that many seconds
  have passed (the warm-up included), except that :data:`MIN_ROUNDS` rounds always
  run (fewer if ``max_rounds`` says so): the timings then keep the spreads they
  reached, and say so by ``reliable``.

  ``args[k]()``, where given, makes step ``k``'s arguments before each call,
  outside the timed region (fresh buffers for a step that donates its own);
  steps without an entry are called with none.
  """
  _args.int_at_least("time_interleaved", "repeats", repeats, 1)
  _args.positive_seconds("time_interleaved", "budget_s", budget_s, allow_none=True)
  start = time.perf_counter()
  make = {k: (args or {}).get(k, tuple) for k in steps}
  times: dict[str, list[float]] = {k: [] for k in steps}
  for k, step in steps.items():
    jax.block_until_ready(step(*make[k]()))
  max_rounds = max_rounds or 3 * repeats
  for n in range(max_rounds):
    for k, step in steps.items():
      a = make[k]()
      t0 = time.perf_counter()
      jax.block_until_ready(step(*a))
      times[k].append(time.perf_counter() - t0)
    if n + 1 >= repeats and all(Timing(*summary(ts), len(ts)).reliable for ts in times.values()):
      break
    if (budget_s is not None and n + 1 >= min(MIN_ROUNDS, max_rounds)
        and time.perf_counter() - start >= budget_s):
      break
  return {k: Timing(*summary(ts), len(ts)) for k, ts in times.items()}
