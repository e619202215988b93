"""The search over a model's plans: presets, name subsets, nesting, offload (see the package)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from remat_kit import _jaxpr, targets
from remat_kit.planner.chain import auto_chain
from remat_kit.planner.result import (
  AutoResult,
  Candidate,
  Coster,
  Roofline,
  check_options,
  choose,
  parse_bytes,
)
from remat_kit.policies import OffloadNames, Policy, SaveNames, from_config, registered
from remat_kit.report import count_flops, without_remat
from remat_kit.report.compiled import compilation
from remat_kit.report.core import memory_fields
from remat_kit.report.timing import Timing, time_interleaved

__all__ = ["Search", "auto"]


def _builder(model: Any, loss: Callable[[Any], jax.Array] | None, rngs: dict[str, Any]
             ) -> tuple[Callable[..., Callable[..., jax.Array]], bool]:
  """``(build, takes_groups)``: ``build(policy, groups)`` returns a loss of
  ``(params, *inputs)``."""
  import flax.linen as nn

  if isinstance(model, nn.Module):
    for attr in ("policy", "groups"):
      if not hasattr(model, attr):
        raise TypeError(f"`auto`: module {type(model).__name__} has no `{attr}` attribute; "
                        "pass a module built on LayerStack, a function "
                        "`build(policy) -> loss(params, *inputs)` that applies the policy "
                        "to your model (see `auto`'s docstring), or a list of layer "
                        "functions.")
    head = loss or (lambda out: jnp.mean(jnp.square(out.astype(jnp.float32))))

    def build(policy: Any, groups: Any) -> Callable[..., jax.Array]:
      module = model.clone(policy=policy, groups=groups)
      return lambda params, *xs: head(module.apply({"params": params}, *xs, rngs=rngs))

    return build, True
  if callable(model):
    if _takes(model, "groups"):
      return (lambda policy, groups: model(policy=policy, groups=groups)), True
    return (lambda policy, groups: model(policy=policy)), False
  raise TypeError(f"`auto`: `fn_or_module` must be a Linen module with `policy`/`groups`, a "
                  f"function `build(policy[, groups]) -> loss(params, *inputs)`, or a list "
                  f"of layer functions `f(params, x) -> x`, got {model!r}.")


def _takes(fn: Callable[..., Any], arg: str) -> bool:
  try:
    ps = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return True
  return any(p.name == arg or p.kind is p.VAR_KEYWORD for p in ps)


def _abstract(tree: Any) -> bool:
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(tree))


def auto(fn_or_module: Any, params: Any, *inputs: Any, budget: int | float | str,
         budget_kind: str = "temp", loss: Callable[[Any], jax.Array] | None = None,
         rngs: dict[str, Any] | None = None, cost: str = "auto",
         roofline: Roofline | None = None, presets: Sequence[Any] | None = None,
         max_names_exact: int = 12, max_subsets: int = 8, groups: Sequence[int] = (2, 3),
         offload: bool | None = None, repeats: int = 5, verbose: bool = False,
         target: Any = None, time_budget_s: float | None = None) -> AutoResult:
  """The least-cost remat plan whose compiled gradient fits ``budget``.

  Args:
    fn_or_module: one of
      * ``build(policy)`` or ``build(policy, groups)``, returning a loss
        ``loss(params, *inputs)``: any model, written without remat_kit in mind
        (a Python loop of layers, Flax's boxed ``nn.Partitioned`` params); the
        build applies ``policy`` where the model takes one (``nn.remat(...,
        policy=policy)``, ``jax.checkpoint``); without a ``groups`` parameter, no
        nested plans are tried;
      * a Linen module with ``policy`` and ``groups`` attributes (``GPT``,
        ``ResNet``, ``LayerStack``), applied to ``inputs``;
      * a list of layer functions ``f(params_i, x) -> x`` (a chain of uneven
        layers), with ``params`` the list of their parameters and ``inputs`` the
        chain's input.
    params: the parameters (the gradient is taken with respect to them): arrays,
      or ``jax.ShapeDtypeStruct``s where nothing runs (``cost="estimated"``).
    *inputs: the loss's other arguments, passed as given (arrays or
      ``ShapeDtypeStruct``s; nothing is closed over, so nothing becomes a
      constant of the compiled program); the chain's input for a list of layers.
    budget: bytes, a number or a string like "4GiB".
    budget_kind: "temp" (the compiled gradient's temp bytes) or "peak" (its
      peak: temp plus arguments and outputs, or the target compiler's peak).
    loss: maps the module's output to a scalar (mean square by default).
    rngs: RNGs for ``apply`` (``{"dropout": key}`` by default).
    cost: "measured", "estimated", "roofline" or "auto" (estimated for an
      accelerator ``target``, measured on the local backend).
    roofline: rates for ``cost="roofline"``; measured on the local device
      when not given.
    presets: the fixed policies to try; every registered preset by default.
    max_names_exact: up to this many tagged names, every subset is tried.
    max_subsets: above it, how many knapsack subsets to compile per budget.
    groups: nesting levels to try for scanned stacks (empty: none).
    offload: try offloading names to host memory; by default where the
      target has host memory.
    repeats: timing rounds for measured costs (more while spreads are large).
    verbose: print progress, one line per candidate, to stderr.
    target: where to compile (see :mod:`remat_kit.targets`): None for the
      local backend, or e.g. ``"tpu:v5e:2x2"``.
    time_budget_s: with measured costs, the wall-clock seconds all timing rounds
      may take together (None: no limit); rounds stop there and each candidate
      keeps the spread it reached (``cost_spread_s``). Near ties are re-timed at
      most once per set of contenders.

  Returns:
    An :class:`AutoResult`.

  Raises:
    ValueError: for bad options, or if no candidate fits (the message gives
      the least bytes any candidate reached).
  """
  budget_bytes = parse_bytes(budget)
  if isinstance(fn_or_module, (list, tuple)):
    return auto_chain(fn_or_module, params, *inputs, budget=budget_bytes,
                      budget_kind=budget_kind, cost=cost, roofline=roofline, repeats=repeats,
                      verbose=verbose, target=target)
  search = Search(fn_or_module, params, *inputs, loss=loss, rngs=rngs, cost=cost,
                  roofline=roofline, presets=presets, max_names_exact=max_names_exact,
                  max_subsets=max_subsets, groups=groups, offload=offload, repeats=repeats,
                  verbose=verbose, target=target, time_budget_s=time_budget_s)
  return search.solve(budget_bytes, budget_kind=budget_kind)


class Search:
  """Compiled candidates shared across budgets: ``Search(...).solve(budget)`` for each.

  The arguments are those of :func:`auto`.
  """

  def __init__(self, fn_or_module: Any, params: Any, *inputs: Any,
               loss: Callable[[Any], jax.Array] | None = None,
               rngs: dict[str, Any] | None = None, cost: str = "auto",
               roofline: Roofline | None = None, presets: Sequence[Any] | None = None,
               max_names_exact: int = 12, max_subsets: int = 8,
               groups: Sequence[int] = (2, 3), offload: bool | None = None,
               repeats: int = 5, verbose: bool = False, target: Any = None,
               time_budget_s: float | None = None) -> None:
    self.target = targets.parse_target(target)
    self.cost = check_options(cost, "temp", self.target)
    for name, v, lo in (("max_names_exact", max_names_exact, 0), ("max_subsets", max_subsets, 0),
                        ("repeats", repeats, 1)):
      if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"`auto`: `{name}` must be an int >= {lo}, got {v!r}.")
    bad = [g for g in groups if not isinstance(g, int) or isinstance(g, bool) or g < 2]
    if bad:
      raise ValueError(f"`auto`: `groups` are nesting levels, ints >= 2; got {list(groups)!r}.")
    self.coster = Coster(self.cost, roofline, self.target)
    if time_budget_s is not None and (isinstance(time_budget_s, bool)
                                      or not isinstance(time_budget_s, (int, float))
                                      or not time_budget_s > 0):
      raise ValueError("`auto`: `time_budget_s` must be a positive number of seconds or "
                       f"None, got {time_budget_s!r}.")
    self.verbose, self.params, self.repeats = verbose, params, repeats
    self.time_left_s = None if time_budget_s is None else float(time_budget_s)
    self._confirmed: set[frozenset[str]] = set()
    self.max_subsets = max_subsets
    build, takes_groups = _builder(fn_or_module, loss, rngs or {"dropout": jax.random.key(0)})
    # Arrays and ShapeDtypeStructs are traced arguments; anything else (a `train` flag)
    # is passed to the loss as it is.
    traced = [i for i, x in enumerate(inputs) if hasattr(x, "shape") and hasattr(x, "dtype")]
    self.inputs = tuple(inputs[i] for i in traced)

    def with_statics(*xs: Any) -> tuple[Any, ...]:
      full = list(inputs)
      for i, x in zip(traced, xs):
        full[i] = x
      return tuple(full)

    def build_traced(policy: Any, groups: Any) -> Callable[..., jax.Array]:
      f = build(policy, groups)
      return lambda params, *xs: f(params, *with_statics(*xs))

    self.build = build_traced
    if self.cost == "measured" and _abstract((params, self.inputs)):
      raise ValueError("`auto`: cost='measured' runs each candidate's step, which needs "
                       "arrays, but `params` or `inputs` hold ShapeDtypeStructs. Pass "
                       "arrays, or plan for an accelerator `target` (e.g. 'gpu:h100') "
                       "with cost='estimated'.")
    if not takes_groups:
      groups = ()  # a build without `groups`: no nested plans
    self.measured: dict[str, Candidate] = {}
    self._compiled: dict[str, Any] = {}
    self._keys: dict[tuple[Any, Any], str] = {}
    self._knapsacked: set[tuple[int, str]] = set()
    args = (params, *self.inputs)
    self._plain_flops = count_flops(jax.grad(without_remat(self.build(False, None))), *args)
    self.names = sorted(_tagged_names(self.build(True, None), args))
    self.exact = len(self.names) <= max_names_exact
    host = targets.has_host_memory(self.target) if offload is None else offload
    plans = self._plans(presets, host, tuple(groups), max_names_exact)
    for i, (label, pol, grp, source) in enumerate(plans):
      self.measure(label, pol, grp, source, progress=f"{i + 1}/{len(plans)}")

  @property
  def none(self) -> Candidate:
    """The no-remat candidate."""
    return self.measured["no_remat"]

  @property
  def full(self) -> Candidate:
    """The full-remat candidate."""
    return self.measured["full"]

  def _plans(self, presets: Sequence[Any] | None, host: bool, levels: tuple[int, ...],
             max_names_exact: int) -> list[tuple[str, Policy, Any, str]]:
    """Every candidate plan as (label, policy, groups, source), no-remat and full first."""
    out: list[tuple[str, Policy, Any, str]] = []
    seen: set[Any] = set()

    def add(label: str, pol: Policy, grp: Any, source: str) -> None:
      if (pol, grp) not in seen:
        seen.add((pol, grp))
        out.append((label, pol, grp, source))

    names = set(self.names)
    add("no_remat", from_config("no_remat"), None, "preset")
    add("full", from_config("full"), None, "preset")
    for p in (registered() if presets is None else presets):
      pol = from_config(p)
      offloads = pol.offloads
      if pol.referenced_names() <= names and (host or not offloads):
        add(str(p), pol, None, "preset")
    if self.exact:
      for r in range(1, len(self.names) + 1):
        for combo in itertools.combinations(self.names, r):
          add("save:" + ",".join(combo), SaveNames(combo), None, "names")
    else:
      for n in self.names:
        add(f"save:{n}", SaveNames((n,)), None, "names")
    free = [(label, pol) for label, pol, grp, _ in out
            if grp is None and not pol.referenced_names() and label != "no_remat"]
    for g in levels:
      for label, pol in (free if g == levels[0] else [("full", from_config("full"))]):
        add(f"{label} + nested ({g} levels)", pol, g, "nested")
    if host and self.names:
      for n in self.names:
        add(f"offload:{n}", OffloadNames((n,)), None, "offload")
      add("offload:" + ",".join(self.names), OffloadNames(tuple(self.names)), None, "offload")
    return out

  def measure(self, label: str, policy: Any, groups: Any = None, source: str = "preset", *,
              progress: str = "") -> Candidate:
    """Compiles and costs one plan (cached by label, and by policy and groups)."""
    pol = from_config(policy)
    key = (pol, groups)
    if key in self._keys:
      return self.measured[self._keys[key]]
    if label in self.measured:
      raise ValueError(f"`auto`: label {label!r} already names {self.measured[label].policy!r}"
                       f" (groups {self.measured[label].groups!r}); give {pol!r} another label.")
    fn = self.build(pol, groups)
    # One trace and one compile per candidate: its memory, FLOPs and the residuals the
    # compiled program carries all come from it, and it is the step that is timed.
    args = (self.params, *self.inputs)
    c = compilation(fn, args, {}, self.target, api="auto")
    mem = memory_fields(c.compiled, self.target, hbm_bytes=self.cost != "measured")
    if self.cost == "measured":  # timed at the first solve
      self._compiled[label] = functools.partial(c.compiled, *jax.tree_util.tree_leaves(args))
    flops = c.flops()["total"]
    acts = sum(r.bytes for r in c.residuals() if r.kind == "activation")
    cost_s, cost_source = self.coster(flops, mem)
    plain = self._plain_flops
    cand = Candidate(label, pol, groups, source, mem["temp_size"], mem["peak_bytes"], acts,
                     flops, 100.0 * (flops - plain) / plain if plain else 0.0, cost_s, 0.0,
                     self.cost, cost_source)
    self.measured[label] = cand
    self._keys[key] = label
    if self.verbose:
      cost = "untimed" if cost_s is None else f"{cost_s * 1e3:9.3f} ms"
      print(f"auto [{progress or len(self.measured)}] {label:44s} temp "
            f"{cand.temp_bytes / 2**20:9.2f} MiB  peak {cand.peak_bytes / 2**20:9.2f} MiB  "
            f"{cost} ({self.cost})", file=sys.stderr, flush=True)
    return cand

  def candidate(self, policy: Any, groups: Any = None) -> Candidate | None:
    """The measured candidate of ``policy`` and ``groups``, or None if it was not tried."""
    label = self._keys.get((from_config(policy), groups))
    return None if label is None else self.measured[label]

  def _time_all(self) -> None:
    """Times every untimed candidate's step in one interleaved pass, then confirms ties."""
    todo = [c for c in self.measured.values() if c.cost_s is None]
    if not todo:
      return
    if self.verbose:
      print(f"auto: timing {len(todo)} candidates in interleaved rounds", file=sys.stderr,
            flush=True)
    self._retime([c.label for c in todo], "interleaved steps")
    self._confirm_ties()

  def _retime(self, labels: Sequence[str], what: str) -> None:
    timed_already = all(self.measured[label].cost_s is not None for label in labels)
    if timed_already and self.time_left_s is not None and self.time_left_s <= 0:
      return  # out of budget: the timings stand as measured, never replaced by fewer steps
    steps = {label: self._compiled[label] for label in labels}
    t0 = time.perf_counter()
    # Out of budget, MIN_ROUNDS rounds still run: every candidate gets a cost and a spread.
    budget = None if self.time_left_s is None else max(self.time_left_s, 1e-3)
    timed: dict[str, Timing] = time_interleaved(steps, self.repeats, budget_s=budget)
    if self.time_left_s is not None:
      self.time_left_s -= time.perf_counter() - t0
    for label in labels:
      t = timed[label]
      self.measured[label] = dataclasses.replace(
          self.measured[label], cost_s=t.median_s, cost_spread_s=t.spread_s, cost_n=t.n,
          cost_source=f"timed: median of {t.n} {what}, spread +-{t.spread_s * 1e3:.3f} ms")

  def _confirm_ties(self) -> None:
    """Times again, by themselves, the plans a memory tie-break could pick over a faster
    median, together with those faster ones.

    Wherever :func:`choose` would return a plan that is not the fastest median
    within the budget (a tie within spreads, broken by memory), that plan and
    the faster ones are re-timed in a pass of their own: fewer steps per round
    leave less room for a slow spell, so a tie that was only noise separates.
    Done once per timing pass, for every budget at once, so that every
    ``solve`` reads the same timings (the monotone guarantee needs that).
    """
    cands = [c for c in self.measured.values() if c.cost_s is not None]
    contenders: set[str] = set()
    for kind in ("temp", "peak"):
      for budget in {c.nbytes(kind) for c in cands}:
        chosen = choose(cands, budget, kind)
        assert chosen is not None  # `budget` is the bytes of one of `cands`: it fits
        quicker = [c.label for c in cands
                   if c.nbytes(kind) <= budget and _cost(c) < _cost(chosen)]
        if quicker:
          contenders |= {chosen.label, *quicker}
    if len(contenders) < 2 or frozenset(contenders) in self._confirmed:
      return
    if self.time_left_s is not None and self.time_left_s <= 0:
      return  # out of timing budget: the spreads stand as reached
    self._confirmed.add(frozenset(contenders))
    if self.verbose:
      print(f"auto: timing {len(contenders)} near-tied candidates again, by themselves",
            file=sys.stderr, flush=True)
    self._retime(sorted(contenders), f"steps re-timed among {len(contenders)} near-tied plans")

  def _knapsack(self, budget: int, budget_kind: str) -> None:
    """Above ``max_names_exact`` names: compile the subsets a knapsack ranks best (once per
    budget, so that asking a budget again reads the same candidates)."""
    if (budget, budget_kind) in self._knapsacked:
      return
    self._knapsacked.add((budget, budget_kind))
    singles = {n: self.measured[self._keys[(SaveNames((n,)), None)]] for n in self.names}
    full = self.full
    # `solve` has costed every candidate (`_time_all`) before this.
    gain = {n: (s.nbytes(budget_kind) - full.nbytes(budget_kind), _cost(full) - _cost(s))
            for n, s in singles.items()}
    ranked = []
    for r in range(2, len(self.names) + 1):
      for combo in itertools.combinations(self.names, r):
        extra = sum(gain[n][0] for n in combo)
        saving = sum(gain[n][1] for n in combo)
        if full.nbytes(budget_kind) + extra <= budget and saving > 0:
          ranked.append((-saving, combo))
      if len(ranked) > 50_000:
        break
    for _, combo in sorted(ranked)[:self.max_subsets]:
      self.measure("save:" + ",".join(combo), SaveNames(combo), None, "knapsack")

  def solve(self, budget: int | float | str, *, budget_kind: str = "temp") -> AutoResult:
    """The least-cost compiled plan within ``budget`` bytes of ``budget_kind``."""
    check_options(self.cost, budget_kind, self.target)
    budget_bytes = parse_bytes(budget)
    self._time_all()
    if not self.exact:
      self._knapsack(budget_bytes, budget_kind)
      self._time_all()
    cands = list(self.measured.values())
    choice = choose(cands, budget_bytes, budget_kind)
    if choice is None:
      least = min(cands, key=lambda c: c.nbytes(budget_kind))
      raise ValueError(
          f"`auto`: no plan fits `budget`={budget_bytes:,} bytes of compiled {budget_kind} "
          f"memory; the least reached is {least.nbytes(budget_kind):,} bytes ({least.label}). "
          "Raise the budget, shrink the batch, or add nesting levels.")
    return AutoResult(budget_bytes, budget_kind, choice, cands)


def _cost(c: Candidate) -> float:
  """``c.cost_s`` of a candidate already costed (estimated or timed)."""
  assert c.cost_s is not None, c.label
  return c.cost_s


def _tagged_names(fn: Callable[..., Any], args: tuple[Any, ...]) -> frozenset[str]:
  closed = jax.make_jaxpr(fn)(*args)
  return _jaxpr.tags_and_primitives(closed)[0]


