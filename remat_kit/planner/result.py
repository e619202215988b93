"""What auto returns and how it chooses: candidates, the choice rule, costs, budgets."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

from remat_kit import targets
from remat_kit.report.estimate import estimate_seconds, measure_local_rates
from remat_kit.report.timing import Timing, faster, pareto_front
from remat_kit.solver import ChainSchedule

__all__ = ["AutoResult", "Candidate", "Roofline", "choose", "parse_bytes"]

COSTS = ("auto", "estimated", "measured", "roofline")
BUDGET_KINDS = ("temp", "peak")


@dataclasses.dataclass(frozen=True)
class Roofline:
  """A device's matmul rate and memory bandwidth, for ``cost="roofline"``.

  Use :meth:`measure` for the local device's measured rates; numbers given
  by hand are labelled with ``source``.
  """

  flops_per_s: float
  bytes_per_s: float
  source: str = "given by the caller"

  def __post_init__(self) -> None:
    for f in ("flops_per_s", "bytes_per_s"):
      v = getattr(self, f)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
        raise ValueError(f"`Roofline`: `{f}` must be a positive number, got {v!r}.")

  @classmethod
  def measure(cls, repeats: int = 10) -> Roofline:
    """The local device's rates: a 1024^3 float32 matmul and a 64 MiB copy, timed."""
    flops, bw, source = measure_local_rates(repeats)
    return cls(flops, bw, source)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One compiled plan: its bytes, its cost, and where they come from.

  ``cost_s`` is None for a candidate never costed (measured costs are timed
  in one interleaved pass over every candidate, at the first ``solve``).
  ``cost_spread_s`` is the timing spread (0 for estimates), ``cost_n`` the number of
  timed steps behind it. ``timing`` is the cost as a :class:`~remat_kit.report.timing.Timing`.
  ``microbatches`` is how many slices the batch is cut into (1: the step as
  written; ``auto``'s ``microbatches``), and ``options`` the other build arguments
  the plan is built with (``auto``'s ``options``), as ``(name, value)`` pairs.
  ``activation_bytes`` is None for a sliced step: each slice's residuals live
  inside its scan.
  """

  label: str
  policy: Any
  levels: Any
  source: str  # "preset", "names", "knapsack", "nested", "offload" or "chain"
  temp_bytes: int
  peak_bytes: int
  activation_bytes: int | None
  flops: int
  recompute_pct: float
  cost_s: float | None
  cost_spread_s: float
  cost_kind: str  # "estimated", "measured" or "roofline"
  cost_source: str
  cost_n: int = 1  # how many timed steps the cost is the median of (1 for estimates)
  microbatches: int = 1
  options: tuple[tuple[str, Any], ...] = ()

  @property
  def timing(self) -> Timing:
    """The cost as a :class:`~remat_kit.report.timing.Timing` (a costed candidate only)."""
    assert self.cost_s is not None, self.label
    return Timing(self.cost_s, self.cost_spread_s, self.cost_n)

  def nbytes(self, kind: str) -> int:
    return self.temp_bytes if kind == "temp" else self.peak_bytes

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["policy"] = repr(self.policy)
    d["options"] = {name: value for name, value in self.options}
    return d


def _faster(a: Candidate, b: Candidate) -> bool:
  """a costs less than b beyond both spreads."""
  return faster(a.timing, b.timing)


def choose(candidates: Sequence[Candidate], budget: int, budget_kind: str = "temp"
           ) -> Candidate | None:
  """The plan :func:`auto` returns: least cost among those that fit, ties to less memory.

  A candidate fits when its ``budget_kind`` bytes are at most ``budget``.
  The fastest are those no fitting candidate beats beyond both timing
  spreads (estimates have no spread: the candidates of least cost); among
  them, the one using the fewest bytes wins. None when nothing fits.

  So a larger budget never returns a plan that the smaller budget's plan
  beats beyond noise (with estimates: never a costlier plan), since that
  plan still fits.
  """
  fits = [c for c in candidates if c.cost_s is not None and c.nbytes(budget_kind) <= budget]
  if not fits:
    return None
  fits.sort(key=lambda c: (c.cost_s, c.nbytes(budget_kind), c.label))
  fastest = [c for c in fits if not any(_faster(d, c) for d in fits)]
  return min(fastest, key=lambda c: (c.nbytes(budget_kind), c.cost_s, c.label))


@dataclasses.dataclass
class AutoResult:
  """The chosen plan, every candidate, and the Pareto curve.

  ``fn`` is set for chains: the chain run as the chosen plan,
  ``fn(params, x)``; for models, build the plan from ``choice.policy``,
  ``choice.levels`` (and ``choice.microbatches``, ``choice.options`` where
  ``auto`` searched them). ``budget_bytes`` is None where ``auto`` had no
  budget (the choice is then the least-cost plan). ``reference`` is the no-remat
  plan of the step as written, where the search has one.
  """

  budget_bytes: int | None
  budget_kind: str
  choice: Candidate
  candidates: list[Candidate]
  fn: Callable[..., Any] | None = None
  plan: ChainSchedule | None = None
  reference: Candidate | None = None

  @property
  def pareto(self) -> list[Candidate]:
    """From the least bytes up, each candidate that costs less than the last beyond noise."""
    costed = [c for c in self.candidates if c.cost_s is not None]
    return pareto_front(costed, lambda c: c.nbytes(self.budget_kind), lambda c: c.timing)

  def least_memory(self, max_slowdown: float) -> Candidate:
    """The candidate of fewest ``budget_kind`` bytes whose cost is at most
    ``max_slowdown`` times the no-remat plan's (``reference``: the step as written, no
    slices, the first ``options`` values). The other question of the same search: not "the
    fastest within this memory" but "the least memory within this step time".

    Raises:
      ValueError: for a ``max_slowdown`` that is not a number >= 1, or candidates
        without a costed no-remat plan (a chain, or uncosted candidates).
    """
    if (isinstance(max_slowdown, bool) or not isinstance(max_slowdown, (int, float))
        or not max_slowdown >= 1):
      raise ValueError(f"`least_memory`: `max_slowdown` is a step-time ratio to no remat, "
                       f"a number >= 1 (1.25: at most 25% slower), got {max_slowdown!r}.")
    base = self.reference
    if base is None or base.cost_s is None:
      raise ValueError("`least_memory`: this result has no costed no-remat plan "
                       "(`reference`) to compare step times with (a chain's result).")
    limit = max_slowdown * base.cost_s
    fits = [c for c in self.candidates if c.cost_s is not None and c.cost_s <= limit]
    return min(fits, key=lambda c: (c.nbytes(self.budget_kind), c.cost_s, c.label))

  def to_dict(self) -> dict[str, Any]:
    return {"budget_bytes": self.budget_bytes, "budget_kind": self.budget_kind,
            "choice": self.choice.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "pareto": [c.label for c in self.pareto]}


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}


def parse_bytes(value: int | float | str) -> int:
  """Bytes from a number or a string such as ``"4GiB"`` or ``"512 MB"``.

  >>> parse_bytes("4GiB"), parse_bytes("1.5 kB"), parse_bytes(1024)
  (4294967296, 1500, 1024)
  """
  if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
    return int(value)
  if isinstance(value, str):
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", value)
    if m and m[2].lower() in _UNITS:
      return int(float(m[1]) * _UNITS[m[2].lower()])
  raise ValueError(f"`budget` must be a positive number of bytes or a string such as '4GiB', "
                   f"got {value!r}. Units: {sorted(u for u in _UNITS if u)}.")


def check_options(cost: str, budget_kind: str, target: targets.Target) -> str:
  if cost not in COSTS:
    raise ValueError(f"`auto`: `cost` must be one of {list(COSTS)}, got {cost!r}.")
  if budget_kind not in BUDGET_KINDS:
    raise ValueError(f"`auto`: `budget_kind` must be 'temp' (compiled temp bytes) or 'peak' "
                     f"(the compiled step's peak bytes), got {budget_kind!r}.")
  if cost == "auto":
    cost = "measured" if target.is_local else "estimated"
  if cost == "estimated" and target.is_local:
    raise ValueError("`auto`: cost='estimated' needs an accelerator `target` such as "
                     "'tpu:v5e:2x2'; on the local backend use 'measured'.")
  if cost == "measured" and not target.is_local:
    raise ValueError(f"`auto`: cost='measured' runs the step, which cannot happen on "
                     f"`target`={target.name!r}; use cost='estimated'.")
  return cost


class Coster:
  """Cost of a compiled gradient in the chosen kind (estimate, roofline), or None (timed)."""

  def __init__(self, cost: str, roofline: Roofline | None, target: targets.Target) -> None:
    self.kind, self.target = cost, target
    self.roofline = roofline
    if cost == "roofline" and roofline is None:
      self.roofline = Roofline.measure()

  def __call__(self, flops: int, mem: dict[str, Any]) -> tuple[float | None, str]:
    if self.kind == "estimated":
      s, source = estimate_seconds(flops, mem, self.target)
      if s is None:
        raise ValueError(f"`auto`: no estimate on {self.target.name}: {source}")
      return s, source
    if self.kind == "roofline":
      assert self.roofline is not None
      r = self.roofline
      return estimate_seconds(flops, mem, self.target,
                              rates=(r.flops_per_s, r.bytes_per_s, r.source))
    return None, "timed: median of interleaved rounds"


