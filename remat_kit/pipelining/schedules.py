"""Pipeline schedules: which microbatch each stage runs in each iteration, what the
bubble costs, and the PRNG key of each (piece, microbatch). Used by
:func:`remat_kit.pipeline`; :mod:`remat_kit.pipelining` re-exports these names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from remat_kit._args import int_at_least

__all__ = ["SCHEDULES", "ScheduleInfo", "schedule_info", "stage_key"]

SCHEDULES = ("gpipe", "circular")


@dataclasses.dataclass(frozen=True)
class ScheduleInfo:
  """Which microbatch each stage works on in each iteration, and what it costs.

  Microbatch ``m`` in round ``r`` is at stage ``s`` in iteration
  ``r * period + m + s``; every other (stage, iteration) slot is idle (the
  bubble), its result discarded.

  Attributes:
    schedule: ``"gpipe"`` or ``"circular"``.
    stages: S, the length of the stage mesh axis.
    microbatches: M.
    rounds: R, the pieces of the model per stage (1 for GPipe).

  Example:
    >>> from remat_kit.pipelining import schedule_info
    >>> info = schedule_info("gpipe", stages=4, microbatches=8)
    >>> info.iterations, info.bubble_fraction == 3 / 11
    (11, True)
    >>> schedule_info("circular", stages=4, microbatches=8, rounds=2).iterations
    19
  """

  schedule: str
  stages: int
  microbatches: int
  rounds: int = 1

  @property
  def period(self) -> int:
    """Iterations between a microbatch's rounds at stage 0: ``max(M, S)`` (``M`` for GPipe)."""
    return self.microbatches if self.rounds == 1 else max(self.microbatches, self.stages)

  @property
  def iterations(self) -> int:
    """Length of the scan: ``(R - 1) * period + M + S - 1``."""
    return (self.rounds - 1) * self.period + self.microbatches + self.stages - 1

  @property
  def fifo(self) -> int:
    """Microbatches waiting at stage 0 between rounds (``period - S``; 0 for GPipe)."""
    return self.period - self.stages if self.rounds > 1 else 0

  @property
  def bubble_fraction(self) -> float:
    """Idle share of the (stage, iteration) slots: ``1 - R * M / iterations``.

    ``(S - 1) / (M + S - 1)`` for GPipe; ``(S - 1) / (R * M + S - 1)`` for the
    circular schedule with ``M >= S``.
    """
    return 1.0 - self.rounds * self.microbatches / self.iterations

  def slot(self, t: Any, s: Any) -> tuple[Any, Any, Any]:
    """``(microbatch, round, busy)`` of stage ``s`` in iteration ``t`` (ints or traced
    arrays alike: the pipeline's program indexes with this very function).

    Args:
      t: the iteration, from 0 to ``iterations - 1``.
      s: the stage, from 0 to ``stages - 1``.

    Returns:
      ``(m, r, busy)``: ``busy`` is False in an idle slot, where ``m`` and ``r``
      are out of range and mean nothing.
    """
    k = t - s
    r, m = k // self.period, k % self.period
    busy = (k >= 0) & (r < self.rounds) & (m < self.microbatches)
    return m, r, busy

  def table(self) -> list[list[tuple[int, int] | None]]:
    """``table()[t][s]``: the ``(microbatch, round)`` of stage ``s`` in iteration ``t``,
    or None for an idle slot."""
    slots = [[self.slot(t, s) for s in range(self.stages)] for t in range(self.iterations)]
    return [[(int(m), int(r)) if busy else None for m, r, busy in row] for row in slots]


def schedule_info(schedule: str, *, stages: int, microbatches: int, rounds: int = 1
                  ) -> ScheduleInfo:
  """The :class:`ScheduleInfo` of a schedule, checked.

  Args:
    schedule: one of :data:`SCHEDULES`.
    stages: S, >= 1.
    microbatches: M, >= 1.
    rounds: R (``layers_per_stage``); must be 1 for ``"gpipe"``.

  Raises:
    ValueError: for an unknown schedule or counts below 1.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"`pipeline`: `schedule` must be one of {list(SCHEDULES)}, got "
                     f"{schedule!r}.")
  stages = int_at_least("pipeline", "stages", stages, 1)
  microbatches = int_at_least("pipeline", "microbatches", microbatches, 1)
  rounds = int_at_least("pipeline", "layers_per_stage", rounds, 1)
  if schedule == "gpipe" and rounds != 1:
    raise ValueError(
        f"`pipeline`: `layers_per_stage`={rounds} needs `schedule='circular'`; GPipe runs "
        "one piece of the model per stage (scan several layers inside `stage_fn` instead).")
  return ScheduleInfo(schedule, stages, microbatches, rounds)


def stage_key(key: jax.Array, stage: Any, microbatch: Any) -> jax.Array:
  """The PRNG key :func:`pipeline` gives stage ``stage`` for microbatch ``microbatch``.

  ``fold_in(fold_in(key, stage), microbatch)``, where ``stage`` is the piece
  of the model in sequential order (``r * S + s`` for round ``r`` of stage
  ``s`` in the circular schedule), so the keys do not depend on the schedule.

  Args:
    key: the PRNG key given to ``run(..., key=key)``.
    stage: the piece of the model, in sequential order (an int or a traced int).
    microbatch: the microbatch index (an int or a traced int).

  >>> import jax
  >>> k = stage_key(jax.random.key(0), 1, 2)
  >>> bool((jax.random.key_data(k) == jax.random.key_data(
  ...     jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 1), 2))).all())
  True
  """
  return jax.random.fold_in(jax.random.fold_in(key, stage), microbatch)


