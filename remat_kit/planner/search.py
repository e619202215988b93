"""The search over a model's plans: presets, name subsets, nesting, offload (see the package)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from remat_kit import _args, _jaxpr, targets
from remat_kit.microbatch import microbatched_value_and_grad
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
from remat_kit.report import count_flops
from remat_kit.report.compiled import compilation
from remat_kit.report.core import memory_fields
from remat_kit.report.timing import Timing, time_interleaved
from remat_kit.transforms import without_remat

__all__ = ["Prediction", "Search", "auto"]

# A combination of build options: ((name, value), ...).
Variant = tuple[tuple[str, Any], ...]


def auto(fn_or_module: Any, params: Any, *inputs: Any, budget: int | float | str | None,
         budget_kind: str = "temp", loss: Callable[[Any], jax.Array] | None = None,
         rngs: dict[str, Any] | None = None, cost: str = "auto",
         roofline: Roofline | None = None, presets: Sequence[Any] | None = None,
         max_names_exact: int = 12, max_subsets: int = 8, levels: Sequence[int] = (2, 3),
         offload: bool | None = None, repeats: int = 5, verbose: bool = False,
         target: Any = None, time_budget_s: float | None = None,
         microbatches: Sequence[int] = (1,), batch_argnums: Sequence[int] | None = None,
         options: Mapping[str, Sequence[Any]] | None = None, search: str = "auto",
         per_tensor: bool = True) -> AutoResult:
  """The least-cost remat plan whose compiled gradient fits ``budget``.

  Args:
    fn_or_module: one of
      * ``build(policy)`` or ``build(policy, levels)``, returning a loss
        ``loss(params, *inputs)``: any model, written without remat_kit in mind
        (a Python loop of layers, Flax's boxed ``nn.Partitioned`` params); the
        build applies ``policy`` where the model takes one (``nn.remat(...,
        policy=policy)``, ``jax.checkpoint``); without a ``levels`` parameter, no
        nested plans are tried;
      * a Linen module with ``policy`` and ``levels`` attributes (``GPT``,
        ``ResNet``, ``LayerStack``), applied to ``inputs``;
      * a list of layer functions ``f(params_i, x) -> x`` (a chain of uneven
        layers), with ``params`` the list of their parameters and ``inputs`` the
        chain's input.
    params: the parameters (the gradient is taken with respect to them): arrays,
      or ``jax.ShapeDtypeStruct``s where nothing runs (``cost="estimated"``).
    *inputs: the loss's other arguments, passed as given (arrays or
      ``ShapeDtypeStruct``s; nothing is closed over, so nothing becomes a
      constant of the compiled program); the chain's input for a list of layers.
    budget: bytes, a number or a string like "4GiB"; None for no limit (the
      fastest plan; :meth:`AutoResult.least_memory` then answers "the least
      memory within a slowdown").
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
    levels: nesting levels to try for scanned stacks (empty: none).
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
    microbatches: slice counts to try for every plan: 1, the step as written, is
      always tried;
      k > 1 computes the gradient over k slices of the batch added up in one
      buffer (:func:`remat_kit.microbatched_value_and_grad`), which divides
      what no policy removes (a layer's input, output gradient and input
      gradient at full batch). The loss must average over the batch.
    batch_argnums: with ``microbatches``, the loss arguments cut along their
      leading axis, numbered as the loss sees them (``params`` is 0, then the
      array inputs in order); by default every array input that is not a PRNG
      key. PRNG-key inputs are split, one key per slice.
    options: other build arguments to search over, as ``{name: values}``:
      every plan is built as ``build(policy, ..., name=value)`` for each
      combination (module attributes for a Linen module), e.g.
      ``{"attention": ("dense", "flash")}``. The first value of each is the
      reference the plain-gradient FLOPs and the names are read from. A plan
      that refers to a name or primitive one combination's model never uses is
      not tried with it (``Search.skipped`` says which and why).
    search: how plans are costed. "model": every preset, tag subset and offload
      plan is costed from the model's per-tensor graph (bytes and recomputation
      exactly, without compiling); the model as written and full remat are
      compiled to calibrate, and only the plans that could beat the best compiled
      one within the budget are compiled to verify. "exhaustive": every plan is
      compiled (and nested scans are tried). "auto" (the default): "model" for
      one slice (``microbatches=(1,)``), "exhaustive" otherwise.
    per_tensor: also plan the model as written per tensor
      (:func:`remat_kit.auto_remat`) at the budget, as one more candidate costed
      as the others are; where it wins, ``AutoResult.fn`` is the loss with it
      applied (``choice.source == "per-tensor"``).

  Returns:
    An :class:`AutoResult`.

  Raises:
    ValueError: for bad options, or if no candidate fits (the message gives
      the least bytes any candidate reached).
  """
  budget_bytes = None if budget is None else parse_bytes(budget)
  if isinstance(fn_or_module, (list, tuple)):
    if budget_bytes is None:
      raise ValueError("`auto`: a chain of layers is planned for a `budget` of bytes; "
                       "pass one (e.g. budget='4GiB').")
    if tuple(microbatches) != (1,) or options:
      raise ValueError("`auto`: `microbatches` and `options` are for models and builds, not "
                       f"for a chain of layers; got microbatches={microbatches!r}, "
                       f"options={options!r}.")
    return auto_chain(fn_or_module, params, *inputs, budget=budget_bytes,
                      budget_kind=budget_kind, cost=cost, roofline=roofline, repeats=repeats,
                      verbose=verbose, target=target)
  planner = Search(fn_or_module, params, *inputs, loss=loss, rngs=rngs, cost=cost,
                  roofline=roofline, presets=presets, max_names_exact=max_names_exact,
                  max_subsets=max_subsets, levels=levels, offload=offload, repeats=repeats,
                  verbose=verbose, target=target, time_budget_s=time_budget_s,
                  microbatches=microbatches, batch_argnums=batch_argnums, options=options,
                  search=search, per_tensor=per_tensor)
  return planner.solve(budget_bytes, budget_kind=budget_kind)


class Search:
  """Compiled candidates shared across budgets: ``Search(...).solve(budget)`` for each.

  The arguments are those of :func:`auto`.
  """

  def __init__(self, fn_or_module: Any, params: Any, *inputs: Any,
               loss: Callable[[Any], jax.Array] | None = None,
               rngs: dict[str, Any] | None = None, cost: str = "auto",
               roofline: Roofline | None = None, presets: Sequence[Any] | None = None,
               max_names_exact: int = 12, max_subsets: int = 8,
               levels: Sequence[int] = (2, 3), offload: bool | None = None,
               repeats: int = 5, verbose: bool = False, target: Any = None,
               time_budget_s: float | None = None, microbatches: Sequence[int] = (1,),
               batch_argnums: Sequence[int] | None = None,
               options: Mapping[str, Sequence[Any]] | None = None, search: str = "auto",
               per_tensor: bool = True) -> None:
    self.target = targets.parse_target(target)
    self.cost = check_options(cost, "temp", self.target)
    for name, v, lo in (("max_names_exact", max_names_exact, 0), ("max_subsets", max_subsets, 0),
                        ("repeats", repeats, 1)):
      _args.int_at_least("auto", name, v, lo)
    bad = [g for g in levels if not isinstance(g, int) or isinstance(g, bool) or g < 2]
    if bad:
      raise ValueError(f"`auto`: `levels` are nesting levels, ints >= 2; got {list(levels)!r}.")
    self.slices = _check_microbatches(microbatches)
    if search not in ("auto", "model", "exhaustive"):
      raise ValueError(f"`auto`: `search` must be 'auto', 'model' or 'exhaustive', got "
                       f"{search!r}.")
    if search == "model" and self.slices != (1,):
      raise ValueError("`auto`: search='model' costs plans of the step as written; with "
                       f"`microbatches`={list(microbatches)!r} use search='exhaustive' (or "
                       "'auto').")
    self.mode = ("exhaustive" if search == "exhaustive" or (search == "auto" and self.slices
                                                            != (1,)) else "model")
    if not isinstance(per_tensor, bool):
      raise TypeError(f"`auto`: `per_tensor` must be a bool, got {per_tensor!r}.")
    self.per_tensor = per_tensor
    self.variants = _variants(options)
    self.coster = Coster(self.cost, roofline, self.target)
    _args.positive_seconds("auto", "time_budget_s", time_budget_s, allow_none=True)
    self.verbose, self.params, self.repeats = verbose, params, repeats
    self.time_left_s = None if time_budget_s is None else float(time_budget_s)
    self._confirmed: set[frozenset[str]] = set()
    self.max_subsets = max_subsets
    build, takes_levels = _builder(fn_or_module, loss, rngs or {"dropout": jax.random.key(0)})
    # Arrays and ShapeDtypeStructs are traced arguments; anything else (a `train` flag)
    # is passed to the loss as it is.
    traced = [i for i, x in enumerate(inputs) if hasattr(x, "shape") and hasattr(x, "dtype")]
    self.inputs = tuple(inputs[i] for i in traced)

    def with_statics(*xs: Any) -> tuple[Any, ...]:
      full = list(inputs)
      for i, x in zip(traced, xs):
        full[i] = x
      return tuple(full)

    def build_traced(policy: Any, levels: Any, variant: Variant = ()
                     ) -> Callable[..., jax.Array]:
      f = build(policy, levels, **dict(variant))
      return lambda params, *xs: f(params, *with_statics(*xs))

    self.build = build_traced
    self.batch_argnums = _batch_argnums(batch_argnums, self.inputs, self.slices)
    if self.cost == "measured" and _is_abstract((params, self.inputs)):
      raise ValueError("`auto`: cost='measured' runs each candidate's step, which needs "
                       "arrays, but `params` or `inputs` hold ShapeDtypeStructs. Pass "
                       "arrays, or plan for an accelerator `target` (e.g. 'gpu:h100') "
                       "with cost='estimated'.")
    if not takes_levels:
      levels = ()  # a build without `levels`: no nested plans
    self.measured: dict[str, Candidate] = {}
    self._compiled: dict[str, Any] = {}
    self._keys: dict[tuple[Any, Any, int, Variant], str] = {}
    self._knapsacked: set[tuple[int, str]] = set()
    args = (params, *self.inputs)
    first = self.variants[0]
    self._plain_flops = count_flops(jax.grad(without_remat(self.build(False, None, first))),
                                    *args)
    uses = {v: _tags_and_primitives(self.build(True, None, v), args) for v in self.variants}
    self.names = sorted(uses[first][0])
    self.exact = len(self.names) <= max_names_exact
    host = targets.has_host_memory(self.target) if offload is None else offload
    # A plan is tried with each variant whose model uses the names and primitives it
    # refers to (a dropout PRNG changes bernoulli's compare); `skipped` says why not.
    self.skipped: dict[str, str] = {}
    plans = []
    for k in self.slices:
      for variant in self.variants:
        names, prims = uses[variant]
        for label, pol, grp, source in self._plans(presets, host, tuple(levels)):
          label += _suffix(k, variant)
          missing = sorted((pol.referenced_names() - names)
                           | (pol.checked_primitives() - prims))
          if missing:
            self.skipped[label] = (f"{pol!r} refers to {missing}, which this build never "
                                   "uses")
            if verbose:
              print(f"auto: not trying {label}: {self.skipped[label]}", file=sys.stderr)
          else:
            plans.append((label, pol, grp, source, k, variant))
    self.predicted: dict[str, Prediction] = {}
    self._planners: dict[tuple[Variant, bool], Any] = {}
    self._per_tensor_done: set[tuple[int, str]] = set()
    self.verified = 0
    if self.mode == "exhaustive":
      for i, (label, pol, grp, source, k, variant) in enumerate(plans):
        self.measure(label, pol, grp, source, microbatches=k, variant=variant,
                     progress=f"{i + 1}/{len(plans)}")
    else:
      self._predict(plans)

  @property
  def none(self) -> Candidate:
    """The no-remat candidate: the step as written (no slices, the first ``options``);
    compiled here if the search has not compiled it yet (``search="model"`` compiles it
    only when asked: for ``budget=None``, for ``AutoResult.reference``)."""
    c = self.candidate("no_remat")
    if c is None:
      c = self.measure("no_remat", from_config("no_remat"), None, "preset",
                       progress="reference")
      self._time_all()
      c = self.measured[c.label]
    return c

  @property
  def full(self) -> Candidate:
    """The full-remat candidate (no slices, the first ``options``)."""
    c = self.candidate("full")
    assert c is not None
    return c

  def _plans(self, presets: Sequence[Any] | None, host: bool, levels: tuple[int, ...]
             ) -> list[tuple[str, Policy, Any, str]]:
    """Every candidate plan as (label, policy, levels, source), no-remat and full first."""
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

  def measure(self, label: str, policy: Any, levels: Any = None, source: str = "preset", *,
              microbatches: int = 1, variant: Variant | None = None,
              progress: str = "", fn: Callable[..., Any] | None = None) -> Candidate:
    """Compiles and costs one plan (cached by label, and by policy, levels, microbatches
    and variant: the ``options`` values it is built with, the first of each by default).
    With ``fn``, the loss is ``fn`` itself (a per-tensor plan: ``policy`` is its
    :class:`~remat_kit.planner.Plan`), not built from the policy."""
    pol = policy if fn is not None else from_config(policy)
    variant = self.variants[0] if variant is None else variant
    key = (id(fn) if fn is not None else pol, levels, microbatches, variant)
    if key in self._keys:
      return self.measured[self._keys[key]]
    if label in self.measured:
      raise ValueError(f"`auto`: label {label!r} already names {self.measured[label].policy!r}"
                       f" (levels {self.measured[label].levels!r}); give {pol!r} another label.")
    if fn is None:
      fn = self.build(pol, levels, variant)
    # One trace and one compile per candidate: its memory, FLOPs and the residuals the
    # compiled program carries all come from it, and it is the step that is timed.
    args = (self.params, *self.inputs)
    if microbatches == 1:
      c = compilation(fn, args, {}, self.target, api="auto")
      acts: int | None = sum(r.bytes for r in c.residuals() if r.kind == "activation")
    else:
      # The sliced gradient is a whole step (a scan of per-slice gradients), compiled as it
      # is; each slice's residuals live inside the scan's body, which has no one
      # forward/backward boundary to read them at.
      step = microbatched_value_and_grad(fn, microbatches, batch_argnums=self.batch_argnums,
                                         key_argnums=self._key_argnums())
      c = compilation(step, args, {}, self.target, grad=False, api="auto",
                      out_kinds=("output", "gradient"))
      acts = None
    flops = c.total_flops()
    mem = memory_fields(c.compiled, self.target, hbm_bytes=self.cost != "measured")
    if self.cost == "measured":  # timed at the first solve
      self._compiled[label] = functools.partial(c.compiled, *jax.tree_util.tree_leaves(args))
    cost_s, cost_source = self.coster(flops, mem)
    plain = self._plain_flops
    cand = Candidate(label, pol, levels, source, mem["temp_size"], mem["peak_bytes"], acts,
                     flops, 100.0 * (flops - plain) / plain if plain else 0.0, cost_s, 0.0,
                     self.cost, cost_source, microbatches=microbatches,
                     options=variant)
    self.measured[label] = cand
    self._keys[key] = label
    if self.verbose:
      cost = "untimed" if cost_s is None else f"{cost_s * 1e3:9.3f} ms"
      print(f"auto [{progress or len(self.measured)}] {label:44s} temp "
            f"{cand.temp_bytes / 2**20:9.2f} MiB  peak {cand.peak_bytes / 2**20:9.2f} MiB  "
            f"{cost} ({self.cost})", file=sys.stderr, flush=True)
    return cand

  def candidate(self, policy: Any, levels: Any = None, microbatches: int = 1,
                **options: Any) -> Candidate | None:
    """The measured candidate of ``policy``, ``levels``, ``microbatches`` and ``options``
    (those not given: their first value), or None if it was not tried."""
    variant = tuple((name, options.get(name, v)) for name, v in self.variants[0])
    label = self._keys.get((from_config(policy), levels, microbatches, variant))
    return None if label is None else self.measured[label]

  def _key_argnums(self) -> tuple[int, ...]:
    """The loss arguments (``params`` is 0) that are PRNG keys: split, one per slice."""
    return tuple(i + 1 for i, x in enumerate(self.inputs) if _is_key(x))

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
    base = (1, self.variants[0])
    singles = {n: self.measured[self._keys[(SaveNames((n,)), None, *base)]] for n in self.names}
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

  def solve(self, budget: int | float | str | None, *, budget_kind: str = "temp"
            ) -> AutoResult:
    """The least-cost compiled plan within ``budget`` bytes of ``budget_kind`` (None: the
    least-cost plan of all)."""
    check_options(self.cost, budget_kind, self.target)
    self._time_all()
    if budget is None:
      if self.mode == "model":  # the fastest of all: the model as written among them
        self._model_solve(max(self.none.nbytes(budget_kind), self.full.nbytes(budget_kind)),
                          budget_kind)
      budget_bytes = max(c.nbytes(budget_kind) for c in self.measured.values())
      return AutoResult(None, budget_kind, _pick(self.measured, budget_bytes, budget_kind),
                        list(self.measured.values()), reference=self.none)
    budget_bytes = parse_bytes(budget)
    if self.mode == "model":
      self._model_solve(budget_bytes, budget_kind)
    elif not self.exact:
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
    fn = choice.policy.fn if choice.source == "per-tensor" else None
    ref = self.candidate("no_remat") if self.mode == "model" else self.none
    return AutoResult(budget_bytes, budget_kind, choice, cands, fn=fn, reference=ref)

  # ------------------------------------------------------------------------
  # search="model": plans costed from the per-tensor graph, compiled to verify
  # ------------------------------------------------------------------------
  def _planner(self, variant: Variant, join_ends: bool) -> Any:
    from remat_kit.planner.auto_remat import Planner

    key = (variant, join_ends)
    if key not in self._planners:
      cost = "time" if self.cost == "estimated" else "flops"
      self._planners[key] = Planner(self.build(False, None, variant), (self.params, *self.inputs),
                                    target=self.target, cost=cost, join_ends=join_ends,
                                    verbose=self.verbose,
                                    offload=None if targets.has_host_memory(self.target)
                                    else False)
    return self._planners[key]

  def _predict(self, plans: list[tuple[str, Policy, Any, str, int, Variant]]) -> None:
    """Every plan's bytes and recomputation from the model's graph (no compile); the
    model as written and full remat compiled, to calibrate."""
    from remat_kit.planner.milp import evaluate
    from remat_kit.planner.tensors import policy_choice

    for label, pol, grp, source, _k, variant in plans:
      if grp is not None:
        self.skipped[label] = ("nested scans change the program the graph describes; they "
                               "are compiled with search='exhaustive'")
        continue
      graph = self._planner(variant, join_ends=False).graph
      saved, off = policy_choice(graph, pol)
      ev = evaluate(graph, saved, off, any_tensor=True)
      self.predicted[label] = Prediction(label, pol, source, variant, ev.saved_bytes,
                                         ev.offloaded_bytes, ev.recompute_flops)
    # Full remat, compiled: the first calibration point (the model as written is compiled
    # only when asked for; its bytes do not fit the graph's: JAX keeps its own residuals).
    self.measure("full", from_config("full"), None, "preset", progress="calibration")

  def _fit(self, kind: str, physical: bool = False
           ) -> tuple[Callable[[Prediction], float], Callable[[Prediction], float]]:
    """Predictors of a plan's compiled ``kind`` bytes and its cost, fitted on the compiled
    plans that have predictions (least squares): bytes from the predicted saved bytes;
    cost from the saved bytes and the recomputed FLOPs (with an estimate, the FLOPs' term
    is known: the chip's peak; what is fitted is the memory traffic's). With
    ``physical``, an estimate's saved byte costs what it must, one write and one read at
    the chip's bandwidth, and only the offset is fitted: a line through few plans may
    slope down (full remat's recompute moves bytes the FLOPs' term does not count) and
    then ranks every plan that saves more above one that saves less."""
    # The model as written is left out: without remat JAX keeps its own residuals, not
    # the graph's tensors, so its predicted bytes are not comparable.
    pts = [(self.predicted[c.label], c) for c in self.measured.values()
           if c.label in self.predicted and c.label != "no_remat" and c.cost_s is not None]
    import numpy as np

    s = np.array([p.saved_bytes for p, _ in pts], float)
    r = np.array([p.recompute_flops for p, _ in pts], float)
    o = np.array([p.offloaded_bytes for p, _ in pts], float)
    nb = np.array([c.nbytes(kind) for _, c in pts], float)
    cost = np.array([_cost(c) for _, c in pts], float)
    ones = np.ones_like(s)
    if len(pts) >= 2 and np.ptp(s) > 0:
      (b0, b1), *_ = np.linalg.lstsq(np.stack([ones, s], 1), nb, rcond=None)
    else:  # one point: the compiler adds what it added there
      b0, b1 = float(np.mean(nb - s)) if len(pts) else 0.0, 1.0
    # Never predict below the line by less than a compiled plan was above it.
    margin = float(np.max(nb - (b0 + b1 * s))) if len(pts) else 0.0
    nbytes = lambda p: b0 + b1 * p.saved_bytes + max(margin, 0.0)
    chip = self.target.chip
    base = _cost(self.full)
    if self.cost == "estimated" and chip is not None:
      # Known terms: the FLOPs at the chip's peak, an offloaded byte out and back over the
      # host link. Fitted: the HBM traffic, against the saved bytes.
      per_flop, per_host = 1.0 / chip.peak_flops, 2.0 / chip.host_bandwidth
      known = per_flop * r + per_host * o
      if len(pts) >= 2 and np.ptp(s) > 0 and not physical:
        (c0, c1), *_ = np.linalg.lstsq(np.stack([ones, s], 1), cost - known, rcond=None)
      else:  # a saved byte is written once and read once
        c1 = 2.0 / chip.hbm_bandwidth
        c0 = float(np.mean(cost - known - c1 * s)) if len(pts) else base
      return nbytes, lambda p: (c0 + c1 * p.saved_bytes + per_flop * p.recompute_flops
                                + per_host * p.offloaded_bytes)
    if len(pts) >= 3:
      coef, *_ = np.linalg.lstsq(np.stack([ones, s, r], 1), cost, rcond=None)
      return nbytes, lambda p: coef[0] + coef[1] * p.saved_bytes + coef[2] * p.recompute_flops
    slope = max(((c - base) / x for c, x in zip(cost, r) if x > 0), default=0.0)
    return nbytes, lambda p: base + slope * p.recompute_flops

  def _per_tensor_points(self) -> None:
    """The per-tensor plan's frontier, as predictions (solves only, no compile)."""
    if not self.per_tensor or self._per_tensor_done:
      return
    self._per_tensor_done.add((0, ""))
    planner = self._planner(self.variants[0], join_ends=True)
    for b in planner.budgets(24):
      solved = planner.solve_saved(b)
      if solved is None:
        continue
      label = f"per-tensor (auto_remat, saved <= {solved.ev.saved_bytes:,} B)"
      if any(p.policy is solved for p in self.predicted.values()) or label in self.predicted:
        continue
      self.predicted[label] = Prediction(label, solved, "per-tensor", self.variants[0],
                                         solved.ev.saved_bytes, solved.ev.offloaded_bytes,
                                         solved.ev.recompute_flops)

  def _verify(self, p: Prediction) -> None:
    if p.source == "per-tensor":
      planner = self._planner(p.variant, join_ends=True)
      plan = planner.plan_of(p.policy)
      self.measure(p.label, plan, None, "per-tensor", variant=p.variant, progress="verify",
                   fn=plan.fn)
    else:
      self.measure(p.label, p.policy, None, p.source, variant=p.variant, progress="verify")
    self.verified += 1

  def _model_solve(self, budget: int, kind: str, max_verify: int = 3) -> None:
    """For ``budget``: compile, in order of predicted cost, the predicted plans (presets,
    tag subsets, offload, the per-tensor frontier's points) predicted to fit, while one
    could beat the best compiled plan that fits; the predictors are fitted again after
    each compile."""
    self._per_tensor_points()
    self._time_all()
    # The per-tensor plan for this budget (the frontier's point that saves the most and is
    # predicted to fit): one more candidate, compiled as the others are, whatever the
    # model of costs says (with few compiled points it cannot tell what saving buys).
    for _ in range(2):
      nbytes, _ = self._fit(kind)
      # 1% short of the budget: the compiled figure moves a little from plan to plan.
      points = [p for p in self.predicted.values()
                if p.source == "per-tensor" and nbytes(p) <= 0.99 * budget]
      top = max(points, key=lambda p: p.saved_bytes, default=None)
      if top is None or top.label in self.measured:
        break
      self._verify(top)
      self._time_all()
      if self.measured[top.label].nbytes(kind) <= budget:
        break
    # Each round, each predictor of cost (fitted; and, with an estimate, physical: see
    # `_fit`) proposes its cheapest plan predicted to fit; those predicted to beat the best
    # compiled plan are compiled. Two predictors that disagree both get their say.
    fits = (False, True) if self.cost == "estimated" and self.target.chip is not None \
        else (False,)
    for _ in range(max_verify):
      best = choose(list(self.measured.values()), budget, kind)
      picks: dict[str, Prediction] = {}
      for physical in fits:
        nbytes, cost = self._fit(kind, physical)
        ranked = sorted((p for p in self.predicted.values()
                         if p.label not in self.measured and nbytes(p) <= 0.99 * budget),
                        key=lambda p: (cost(p), p.saved_bytes))
        if ranked and (best is None or cost(ranked[0]) < _cost(best)):
          picks.setdefault(ranked[0].label, ranked[0])
      if not picks:
        break
      for p in picks.values():
        self._verify(p)
      self._time_all()


@dataclasses.dataclass(frozen=True)
class Prediction:
  """A plan costed from the model's per-tensor graph, not compiled (``search="model"``).

  Attributes:
    label: the plan's label.
    policy: its policy (for a point of the per-tensor frontier, the solver's choice).
    source: "preset", "names", "offload" or "per-tensor".
    variant: the ``options`` values it is built with.
    saved_bytes: device bytes its backward reads (as ``saved_residuals`` counts them).
    offloaded_bytes: bytes it moves to host memory.
    recompute_flops: FLOPs it runs beyond no remat.
  """

  label: str
  policy: Any
  source: str
  variant: Variant
  saved_bytes: int
  offloaded_bytes: int
  recompute_flops: int


def _cost(c: Candidate) -> float:
  """``c.cost_s`` of a candidate already costed (estimated or timed)."""
  assert c.cost_s is not None, c.label
  return c.cost_s


def _tags_and_primitives(fn: Callable[..., Any], args: tuple[Any, ...]
                         ) -> tuple[frozenset[str], frozenset[str]]:
  return _jaxpr.tags_and_primitives(jax.make_jaxpr(fn)(*args))


def _pick(measured: dict[str, Candidate], budget: int, budget_kind: str) -> Candidate:
  choice = choose(list(measured.values()), budget, budget_kind)
  assert choice is not None  # `budget` is the bytes of one of them: it fits
  return choice


# --------------------------------------------------------------------------
# What `auto` builds: the model as ``build(policy, levels, **options)``, the option
# combinations and slice counts it tries, and which inputs are cut into slices
# --------------------------------------------------------------------------
def _builder(model: Any, loss: Callable[[Any], jax.Array] | None, rngs: dict[str, Any]
             ) -> tuple[Callable[..., Callable[..., jax.Array]], bool]:
  """``(build, takes_levels)``: ``build(policy, levels, **options)`` returns a loss of
  ``(params, *inputs)``."""
  import flax.linen as nn

  if isinstance(model, nn.Module):
    for attr in ("policy", "levels"):
      if not hasattr(model, attr):
        raise TypeError(f"`auto`: module {type(model).__name__} has no `{attr}` attribute; "
                        "pass a module built on LayerStack, a function "
                        "`build(policy) -> loss(params, *inputs)` that applies the policy "
                        "to your model (see `auto`'s docstring), or a list of layer "
                        "functions.")
    head = loss or (lambda out: jnp.mean(jnp.square(out.astype(jnp.float32))))

    def build(policy: Any, levels: Any, **options: Any) -> Callable[..., jax.Array]:
      module = model.clone(policy=policy, levels=levels, **options)
      return lambda params, *xs: head(module.apply({"params": params}, *xs, rngs=rngs))

    return build, True
  if callable(model):
    if _takes(model, "levels"):
      return (lambda policy, levels, **o: model(policy=policy, levels=levels, **o)), True
    return (lambda policy, levels, **o: model(policy=policy, **o)), False
  raise TypeError(f"`auto`: `fn_or_module` must be a Linen module with `policy`/`levels`, a "
                  f"function `build(policy[, levels]) -> loss(params, *inputs)`, or a list "
                  f"of layer functions `f(params, x) -> x`, got {model!r}.")


def _takes(fn: Callable[..., Any], arg: str) -> bool:
  try:
    ps = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return True
  return any(p.name == arg or p.kind is p.VAR_KEYWORD for p in ps)


def _is_abstract(tree: Any) -> bool:
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(tree))


def _suffix(microbatches: int, variant: Variant) -> str:
  """What a candidate's label adds for its slices and build options."""
  out = f" x{microbatches} microbatches" if microbatches > 1 else ""
  return out + "".join(f", {name}={value}" for name, value in variant)


def _check_microbatches(microbatches: Sequence[int]) -> tuple[int, ...]:
  ks = tuple(microbatches) if isinstance(microbatches, (list, tuple)) else None
  if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
    raise ValueError("`auto`: `microbatches` must be a non-empty list of slice counts, "
                     f"ints >= 1 (1: the step as written), got {microbatches!r}.")
  return tuple(dict.fromkeys((1, *ks)))


def _variants(options: Mapping[str, Sequence[Any]] | None) -> list[Variant]:
  """Every combination of the ``options`` values, the first values first."""
  if not options:
    return [()]
  if not isinstance(options, Mapping):
    raise TypeError(f"`auto`: `options` must be a dict of build argument names to the "
                    f"values to try, e.g. {{'attention': ('dense', 'flash')}}, got {options!r}.")
  for name, values in options.items():
    if not isinstance(values, (list, tuple)) or not values:
      raise ValueError(f"`auto`: `options[{name!r}]` must be a non-empty list of values to "
                       f"build with, got {values!r}.")
    if name in ("policy", "levels"):
      raise ValueError(f"`auto`: `options` names build arguments besides `policy` and "
                       f"`levels`, which auto searches itself; got {name!r}.")
  names = list(options)
  return [tuple(zip(names, combo)) for combo in itertools.product(*options.values())]


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _batch_argnums(batch_argnums: Sequence[int] | None, inputs: tuple[Any, ...],
                   slices: tuple[int, ...]) -> tuple[int, ...]:
  """The loss arguments cut into slices (``params`` is argument 0): checked, or every
  array input that is not a PRNG key."""
  if batch_argnums is None:
    out = tuple(i + 1 for i, x in enumerate(inputs) if not _is_key(x))
  else:
    out = tuple(batch_argnums)
    bad = [i for i in out if not isinstance(i, int) or isinstance(i, bool)
           or not 1 <= i <= len(inputs) or _is_key(inputs[i - 1])]
    if bad:
      raise ValueError(f"`auto`: `batch_argnums` are the loss arguments to cut into slices, "
                       f"1 to {len(inputs)} (0 is `params`; PRNG keys are split, not cut); "
                       f"got {list(batch_argnums)!r}.")
  if max(slices) > 1:
    if not out:
      raise ValueError(f"`auto`: `microbatches`={list(slices)!r} cuts the batch, but no "
                       "input is a batch (`batch_argnums` is empty).")
    for i in out:
      for leaf in jax.tree_util.tree_leaves(inputs[i - 1]):
        n = leaf.shape[0] if getattr(leaf, "shape", ()) else None
        for k in slices:
          if n is None or n % k:
            raise ValueError(
                f"`auto`: `microbatches` {k} does not divide loss argument {i}'s leading axis "
                f"(shape {getattr(leaf, 'shape', ())}); pick slice counts that divide the "
                "batch, or leave that input out of `batch_argnums`.")
  return out
