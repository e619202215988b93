"""Give a byte budget, get the cheapest remat plan that fits: `auto` and its `Search`.

Cost is time, not FLOPs. On a GPU or TPU each candidate's step is timed
(``cost="measured"``); without one, cost is a roofline estimate: FLOPs at
the device's peak rate plus the bytes the saved residuals move (written in
the forward pass, read in the backward) at its bandwidth. FLOPs are reported
beside it.

The search, for a model with ``policy`` and ``groups`` attributes (the
reference models and :class:`remat_kit.flax.LayerStack`) or a function
``build(policy=..., groups=...) -> loss``:

1. Measure each fixed preset (no remat, full, dots, dots without batch dims)
   and, for every `checkpoint_name` the model tags, the policy that saves
   that name alone: its compiled temp bytes and its cost.
2. Treat the names as a knapsack: a name's bytes and its cost saving are
   taken as additive, and the subsets that could fit are ranked by predicted
   cost; the best few are measured.
3. Add nested scans (``groups=2``) of full remat for the tightest budgets.
4. Return the measured candidate of least cost whose compiled temp bytes
   fit the budget, with every candidate and the Pareto curve.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from remat_kit import _jaxpr, targets
from remat_kit.policies import SaveNames, from_config
from remat_kit.report import compiled_memory, flop_breakdown, saved_residuals
from remat_kit.report.estimate import estimate_seconds

__all__ = ["AutoResult", "Candidate", "Roofline", "Search", "auto", "parse_bytes"]


@dataclasses.dataclass(frozen=True)
class Roofline:
  """A device's peak rate and memory bandwidth, for the roofline cost.

  The defaults are a rough 2-core CPU; pass the numbers of your device (an
  H100: ``Roofline(67e12, 3.35e12)`` in float32).
  """

  flops_per_s: float = 50e9
  bytes_per_s: float = 10e9


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One measured plan."""

  label: str
  policy: Any
  groups: Any
  temp_bytes: int
  activation_bytes: int
  flops: int
  recompute_pct: float
  cost_s: float
  cost_kind: str  # "roofline", "measured" or "estimated"

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["policy"] = repr(self.policy)
    return d


@dataclasses.dataclass
class AutoResult:
  """The chosen plan, every candidate measured, and the Pareto curve."""

  budget_bytes: int
  choice: Candidate
  candidates: list[Candidate]

  @property
  def pareto(self) -> list[Candidate]:
    """Candidates that no other beats on both temp bytes and cost, by bytes."""
    front: list[Candidate] = []
    for c in sorted(self.candidates, key=lambda c: (c.temp_bytes, c.cost_s)):
      if not front or c.cost_s < front[-1].cost_s:
        front.append(c)
    return front

  def to_dict(self) -> dict[str, Any]:
    return {"budget_bytes": self.budget_bytes, "choice": self.choice.to_dict(),
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


def _builder(target: Any, loss: Callable[[Any], jax.Array] | None, inputs: tuple[Any, ...],
             rngs: dict[str, Any]) -> Callable[..., Callable[..., jax.Array]]:
  import flax.linen as nn

  if isinstance(target, nn.Module):
    for attr in ("policy", "groups"):
      if not hasattr(target, attr):
        raise TypeError(f"`auto`: module {type(target).__name__} has no `{attr}` attribute; "
                        "pass a module built on LayerStack, or a function "
                        "`build(policy=..., groups=...) -> loss`.")
    head = loss or (lambda out: jnp.mean(jnp.square(out.astype(jnp.float32))))

    def build(policy: Any, groups: Any) -> Callable[..., jax.Array]:
      module = target.clone(policy=policy, groups=groups)
      return lambda params: head(module.apply({"params": params}, *inputs, rngs=rngs))

    return build
  if callable(target):
    return lambda policy, groups: target(policy=policy, groups=groups)
  raise TypeError(f"`auto`: `fn_or_module` must be a Linen module with `policy`/`groups` or a "
                  f"function `build(policy=..., groups=...) -> loss`, got {target!r}.")


def auto(fn_or_module: Any, params: Any, *inputs: Any, budget: int | float | str,
         loss: Callable[[Any], jax.Array] | None = None, rngs: dict[str, Any] | None = None,
         cost: str = "auto", roofline: Roofline = Roofline(), max_subsets: int = 4,
         presets: Sequence[Any] = ("none", "full", "save_dots", "save_dots_no_batch"),
         verbose: bool = False, target: Any = None) -> AutoResult:
  """The least-cost remat plan whose compiled gradient fits ``budget`` temp bytes.

  Args:
    fn_or_module: a Linen module with ``policy`` and ``groups`` attributes
      (``GPT``, ``ResNet``, ``LayerStack``), or ``build(policy, groups)``
      returning a loss of ``params``.
    params: the parameters (the gradient is taken with respect to them).
    *inputs: the module's inputs (modules only).
    budget: bytes of compiled temp memory, a number or a string like "4GiB".
    loss: maps the module's output to a scalar (mean square by default).
    rngs: RNGs for ``apply`` (``{"dropout": key}`` by default).
    cost: "roofline", "measured" (time the step), "estimated" (the target's
      ``estimated_seconds``, see :mod:`remat_kit.report.estimate`), or "auto"
      (estimated for an accelerator ``target``, measured on a local GPU/TPU,
      roofline on CPU).
    roofline: the device numbers for the roofline cost.
    max_subsets: how many knapsack subsets of names to measure.
    presets: fixed policies always measured; the first is the no-remat one.
    verbose: print each candidate as it is measured.
    target: where to compile the candidates (see :mod:`remat_kit.targets`):
      None for the local backend, or e.g. ``"tpu:v5e:2x2"``; the budget is
      then in the target compiler's temp bytes.

  Returns:
    An :class:`AutoResult`.

  Raises:
    ValueError: if no candidate fits; the message gives the least temp
      memory any candidate reached.
  """
  budget_bytes = parse_bytes(budget)
  search = Search(fn_or_module, params, *inputs, loss=loss, rngs=rngs, cost=cost,
                  roofline=roofline, presets=presets, max_subsets=max_subsets, verbose=verbose,
                  target=target)
  return search.solve(budget_bytes)


class Search:
  """Measurements shared across budgets: ``Search(...).solve(budget)`` for each.

  The arguments are those of :func:`auto`.
  """

  def __init__(self, fn_or_module: Any, params: Any, *inputs: Any,
               loss: Callable[[Any], jax.Array] | None = None,
               rngs: dict[str, Any] | None = None, cost: str = "auto",
               roofline: Roofline = Roofline(),
               presets: Sequence[Any] = ("none", "full", "save_dots", "save_dots_no_batch"),
               max_subsets: int = 4, verbose: bool = False, target: Any = None) -> None:
    if cost not in ("auto", "roofline", "measured", "estimated"):
      raise ValueError(f"`auto`: `cost` must be 'auto', 'roofline', 'measured' or "
                       f"'estimated', got {cost!r}.")
    self.target = targets.parse_target(target)
    if cost == "auto":
      cost = ("estimated" if not self.target.is_local
              else "roofline" if jax.default_backend() == "cpu" else "measured")
    if cost == "estimated" and self.target.is_local:
      raise ValueError("`auto`: cost='estimated' needs an accelerator `target` such as "
                       "'tpu:v5e:2x2'; on the local backend use 'measured'.")
    if cost == "measured" and not self.target.is_local:
      raise ValueError(f"`auto`: cost='measured' runs the step, which cannot happen on "
                       f"`target`={self.target.name!r}; use cost='estimated'.")
    self.cost, self.roofline, self.verbose, self.params = cost, roofline, verbose, params
    self.max_subsets = max_subsets
    self.build = _builder(fn_or_module, loss, inputs, rngs or {"dropout": jax.random.key(0)})
    self.measured: dict[str, Candidate] = {}
    for p in presets:
      self.measure(str(p), from_config(p))
    self.none = self.measured[str(presets[0])]
    self.full = self.measured.get("full") or self.measure("full", True)
    self.names = sorted(_tagged_names(self.build(True, None), params))
    self.singles = {n: self.measure(f"save:{n}", SaveNames((n,))) for n in self.names}

  def measure(self, label: str, policy: Any, groups: Any = None) -> Candidate:
    """Compiles and counts one plan (cached by label)."""
    if label in self.measured:
      return self.measured[label]
    fn = self.build(policy, groups)
    grad = jax.grad(fn)
    mem = compiled_memory(grad, self.params, target=self.target)
    fb = flop_breakdown(fn, self.params)
    acts = sum(r.bytes for r in saved_residuals(fn, self.params) if r.kind == "activation")
    if self.cost == "measured":
      step = jax.jit(grad)
      jax.block_until_ready(step(self.params))
      times = []
      for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(step(self.params))
        times.append(time.perf_counter() - t0)
      c_s = sorted(times)[len(times) // 2]
    elif self.cost == "estimated":
      c_s, _ = estimate_seconds(fb["total"], mem, self.target)
    else:
      c_s = fb["total"] / self.roofline.flops_per_s + 2 * acts / self.roofline.bytes_per_s
    cand = Candidate(label, policy, groups, mem["temp_size"], acts, fb["total"],
                     fb["recompute_pct"], c_s, self.cost)
    self.measured[label] = cand
    if self.verbose:
      print(f"  auto: {label:40s} temp {cand.temp_bytes / 2**20:9.1f} MiB  cost "
            f"{cand.cost_s * 1e3:8.3f} ms ({self.cost})", flush=True)
    return cand

  def solve(self, budget: int | float | str, *, max_subsets: int | None = None) -> AutoResult:
    """The least-cost measured plan within ``budget`` temp bytes."""
    max_subsets = self.max_subsets if max_subsets is None else max_subsets
    budget_bytes = parse_bytes(budget)
    full = self.full
    # Knapsack over names: each adds its bytes over full remat and saves its recompute cost.
    gain = {n: (self.singles[n].temp_bytes - full.temp_bytes, full.cost_s - self.singles[n].cost_s)
            for n in self.names}
    subsets = []
    for r in range(2, len(self.names) + 1):
      for combo in itertools.combinations(self.names, r):
        extra = sum(gain[n][0] for n in combo)
        saving = sum(gain[n][1] for n in combo)
        if full.temp_bytes + extra <= budget_bytes and saving > 0:
          subsets.append((-saving, combo))
    for _, combo in sorted(subsets)[:max_subsets]:
      self.measure("save:" + ",".join(combo), SaveNames(combo))
    if full.temp_bytes > budget_bytes or budget_bytes < self.none.temp_bytes / 2:
      self.measure("nested (2 levels)", True, 2)
    fits = [c for c in self.measured.values() if c.temp_bytes <= budget_bytes]
    if not fits:
      least = min(self.measured.values(), key=lambda c: c.temp_bytes)
      raise ValueError(
          f"`auto`: no plan fits `budget`={budget_bytes:,} bytes of compiled temp memory; the "
          f"least reached is {least.temp_bytes:,} bytes ({least.label}). Raise the budget, "
          "shrink the batch, or add nesting levels.")
    choice = min(fits, key=lambda c: (c.cost_s, c.temp_bytes))
    return AutoResult(budget_bytes, choice, list(self.measured.values()))


def _tagged_names(fn: Callable[..., Any], params: Any) -> frozenset[str]:
  closed = jax.make_jaxpr(fn)(params)
  return _jaxpr.tags_and_primitives(closed)[0]
