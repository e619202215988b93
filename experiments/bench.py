"""Remat strategies side by side on the reference models: memory, FLOPs, time, gradients.

Run with ``make bench`` (or ``python -m experiments.bench``). Each reference
model (the dropout MLP, the GPT stack, the ResNet, the chunked GRU) runs
under each strategy: no remat, full, dots, name presets, nested scans,
offload where the backend has pinned host memory, and the automatic budget
planner. For each it records compiler temp and peak bytes, saved activation
bytes, recomputation FLOPs, step time (median of timed steps after warm-up,
synchronized, with spread, timed twice to show repeatability), live peak
bytes on GPU/TPU, and whether the gradients match those without remat.

On CPU the default size takes a few minutes on 2 cores; ``--size large`` is
the default when a GPU or TPU is found, and there each strategy runs in a
fresh process so the device's peak-bytes counter belongs to it alone.
Results go to ``experiments/results/<backend>-<device>.json`` and a plot of
memory against time overhead, with each model's Pareto frontier, to the
same name with ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments._io import LOCAL, check_out, finish, model_rows, save_figure, write_atomic
from remat_kit import models, report, targets
from remat_kit.flax import LayerStack
from remat_kit.report import MemoryTimeline, compilation
from remat_kit.report.core import live_peak_bytes, memory_fields
from remat_kit.report.timeline import timeline_of

RESULTS = Path(__file__).parent / "results"
ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


@dataclasses.dataclass(frozen=True)
class Model:
  """One reference model at one size: how to build it, its inputs, its strategies."""

  name: str
  build: Callable[..., Any]  # **strategy kwargs -> Linen module
  inputs: Callable[[jax.Array], tuple[Any, ...]]  # key -> apply args
  strategies: dict[str, dict[str, Any]]
  describe: str


def _mlp(layers: int, batch: int, width: int) -> Model:
  def build(**kw: Any) -> Any:
    return LayerStack(models.HiddenLayer(width, 0.1), layers, **kw)

  return Model(
      "mlp", build, lambda k: (jax.random.normal(k, (batch, width)), True),
      {"no remat": {"policy": False}, "full": {"policy": True},
       "save_dots": {"policy": "save_dots"}, "save dense": {"policy": "save:dense"},
       "nested (2 levels)": {"policy": True, "levels": 2}},
      f"dropout MLP: {layers} scanned HiddenLayers, batch {batch}, width {width}")


def _gpt(layers: int, batch: int, seq: int, d: int, heads: int) -> Model:
  def build(**kw: Any) -> Any:
    return models.GPT(vocab_size=256, max_len=seq, d_model=d, num_heads=heads,
                      num_layers=layers, **kw)

  return Model(
      "gpt", build, lambda k: (jax.random.randint(k, (batch, seq), 0, 256),),
      {"no remat": {"policy": False}, "full": {"policy": True},
       "save_dots": {"policy": "save_dots"}, "save_dots_no_batch": {"policy": "minimal"},
       "save qkv, attn_out": {"policy": "save_qkv_attn_out"},
       "save all but attn_probs": {"policy": "save_all_but_attn_probs"},
       "nested (2 levels)": {"policy": True, "levels": 2},
       "offload dots": {"policy": "offload_dots"}},
      f"GPT: {layers} layers, batch {batch}, seq {seq}, d_model {d}, {heads} heads")


def _cnn(blocks: int, batch: int, size: int, features: int) -> Model:
  def build(**kw: Any) -> Any:
    return models.ResNet(features=features, num_blocks=blocks, **kw)

  return Model(
      "cnn", build, lambda k: (jax.random.normal(k, (batch, size, size, 3)),),
      {"no remat": {"policy": False}, "full": {"policy": True},
       "save convs": {"policy": "save_dots"}, "save norm1": {"policy": "save:norm1"},
       "nested (2 levels)": {"policy": True, "levels": 2}},
      f"ResNet: {blocks} blocks, batch {batch}, {size}x{size}x3, {features} channels")


def _rnn(steps: int, batch: int, hidden: int, chunk: int) -> Model:
  def build(**kw: Any) -> Any:
    return models.ChunkedGRU(hidden=hidden, **kw)

  return Model(
      "rnn", build, lambda k: (jax.random.normal(k, (batch, steps, 16)),),
      {"no remat": {"chunk": None}, "remat per step": {"chunk": 1},
       f"chunks of {chunk}": {"chunk": chunk},
       f"chunks of {chunk}, save hidden": {"chunk": chunk, "policy": "save:hidden"}},
      f"GRU: {steps} steps, batch {batch}, hidden {hidden}")


SIZES: dict[str, Callable[[], list[Model]]] = {
    "small": lambda: [_mlp(8, 1024, 256), _gpt(4, 8, 128, 128, 4), _cnn(4, 8, 16, 16),
                      _rnn(64, 32, 64, 8)],
    "large": lambda: [_mlp(24, 8192, 2048), _gpt(8, 8, 1024, 1024, 16),
                      _cnn(16, 64, 64, 128), _rnn(1024, 256, 512, 32)],
}


def model_loss(model: Model, kw: dict[str, Any], inputs: tuple[Any, ...]) -> Callable[..., Any]:
  """The mean-square loss of ``model`` built with ``kw``, on fixed inputs and dropout key."""
  module = model.build(**kw)

  def loss(params: Any) -> jax.Array:
    out = module.apply({"params": params}, *inputs, rngs={"dropout": jax.random.key(2)})
    return jnp.mean(out.astype(jnp.float32) ** 2)

  return loss


def _time(step: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return times


_PARAMS: dict[str, Any] = {}


def measure(model: Model, strategy: str, repeats: int, plan: Any = None,
            timed: bool = True) -> dict[str, Any]:
  """One row: every readout of one strategy on one model.

  With ``timed=False`` the step is compiled and checked but not timed: the
  row keeps ``_step`` and ``_args`` for :func:`time_interleaved`.
  """
  key = jax.random.key(0)
  inputs = model.inputs(jax.random.key(1))
  base_kw = model.strategies["no remat"]
  kw = dict(model.strategies[strategy]) if plan is None else dict(plan)
  if model.describe not in _PARAMS:  # initialized once per model: the same for every row
    _PARAMS[model.describe] = jax.jit(lambda k: model.build(**base_kw).init(
        {"params": k, "dropout": jax.random.key(3)}, *inputs))(key)["params"]
  params = _PARAMS[model.describe]
  row: dict[str, Any] = {"model": model.name, "strategy": strategy, "config": _jsonable(kw)}
  if "offload" in strategy and not targets.can_offload():
    row["error"] = "skipped: this backend has no pinned_host memory for offloading"
    return row
  try:
    loss, ref = model_loss(model, kw, inputs), model_loss(model, base_kw, inputs)
    # One trace and one compile, read and timed: the memory, the FLOPs and the residuals
    # the compiled program carries from the forward to the backward pass.
    c = compilation(loss, (params,), {}, None, api="bench")
    step = lambda p, run=c.compiled: run(*jax.tree_util.tree_leaves(p))
    mem = memory_fields(c.compiled, None)
    fb = c.flops()
    res = c.residuals()
    row["_timeline"] = timeline_of(c, strategy)
    before = live_peak_bytes()
    g = jax.block_until_ready(step(params))  # compile and warm up
    live = live_peak_bytes()
    for _ in range(3):  # warm-up
      jax.block_until_ready(step(params))
    g_ref = _reference_grads(model.describe, ref, params)
    leaves = zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref))
    row.update(
        temp_bytes=mem["temp_size"], peak_bytes=mem["peak_bytes"],
        host_temp_bytes=mem.get("host_temp_size", 0),
        activation_bytes=sum(r.bytes for r in res if r.kind == "activation"),
        offloaded_bytes=sum(r.bytes for r in res if r.kind == "activation"
                            and r.memory == "host"),
        flops=fb["total"], recompute_flops=fb["recompute"],
        recompute_overhead_pct=fb["recompute_pct"],
        live_peak_bytes=live if live is not None and (before is None or live > before) else None,
        grads_match=all(np.allclose(a, b, rtol=2e-4, atol=1e-6) for a, b in leaves),
        error=None)
    if timed:
      once = report.timing.time_interleaved({"step": lambda: step(params)}, 2 * repeats,
                                     max_rounds=2 * repeats)
      row.update(_ms(once["step"]))
    else:
      row["_step"], row["_args"], row["_kw"] = step, (params,), kw
    if row["offloaded_bytes"] and jax.default_backend() == "cpu":
      row["note"] = ("XLA:CPU has one memory: offloaded residuals are marked for the host "
                     "but stay in temp")
  except Exception as e:  # noqa: BLE001 - one failing strategy must not end the run
    text = str(e)
    kind = "OOM" if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() else "error"
    row["error"] = f"{kind}: {text.splitlines()[0][:300] if text else type(e).__name__}"
  return row


def _ms(t: report.timing.Timing) -> dict[str, Any]:
  """A row's timing fields, in milliseconds."""
  return {"step_ms_median": t.median_s * 1e3, "step_ms_spread": t.spread_s * 1e3,
          "step_ms_n": t.n, "timing_reliable": t.reliable}


def _row_timing(r: dict[str, Any]) -> report.timing.Timing:
  return report.timing.Timing(r["step_ms_median"] / 1e3, r["step_ms_spread"] / 1e3,
                       r.get("step_ms_n", 1))


def time_interleaved(rows: list[dict[str, Any]], repeats: int, max_rounds: int = 0,
                     budget_s: float | None = None) -> None:
  """Times the compiled steps of ``rows`` with :func:`remat_kit.report.timing.time_interleaved`
  (interleaved rounds until the spreads are within report.timing.RELIABLE of their medians, or
  ``budget_s`` runs out) and writes each row's timing fields."""
  live = [r for r in rows if "_step" in r]
  if not live:
    return
  steps = {str(i): (lambda r=r: r["_step"](*r["_args"])) for i, r in enumerate(live)}
  timed = report.timing.time_interleaved(steps, repeats, max_rounds=max_rounds, budget_s=budget_s)
  for i, r in enumerate(live):
    r.update(_ms(timed[str(i)]))
    del r["_step"], r["_args"]


def _time_rows(model: Model, rows: list[dict[str, Any]], repeats: int,
               budget_s: float | None = None) -> None:
  """Times the rows' compiled steps. Where auto ran on the model, its search has already
  timed every one of these plans in one interleaved pass with its own candidates (see
  ``experiments.auto_plan``): the rows take those timings, so that the plot shows the
  measurement auto chose from. Rows the search does not hold are timed here."""
  rest = []
  if any("budget_bytes" in r for r in rows):
    from experiments.auto_plan import timing_of

    for r in rows:
      t = timing_of(model, r["_kw"]) if "_step" in r else None
      if t is None:
        rest.append(r)
      else:
        r.update(t)
        del r["_step"], r["_args"]
  else:
    rest = rows
  time_interleaved(rest, repeats, budget_s=budget_s)
  for r in rows:
    r.pop("_kw", None)


_REFERENCE: dict[str, Any] = {}


def _reference_grads(key: str, ref: Callable[..., Any], params: Any) -> Any:
  """Gradients without remat, computed once per model (per process)."""
  if key not in _REFERENCE:
    _REFERENCE[key] = jax.jit(jax.grad(ref))(params)
  return _REFERENCE[key]


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x if isinstance(x, (int, float, str, bool, type(None))) else repr(x)


def _faster(q: dict[str, Any], r: dict[str, Any]) -> bool:
  """q is faster than r beyond both spreads."""
  return report.timing.faster(_row_timing(q), _row_timing(r))


def auto_beaten(rows: list[dict[str, Any]]) -> list[str]:
  """Each auto row that a strategy fitting its budget beats beyond both timing spreads.

  Empty when auto holds: no fitting strategy is faster than its plan by more
  than the timing noise.
  """
  timed = [r for r in rows if not r.get("error") and "step_ms_median" in r]
  out = []
  for a in timed:
    if "budget_bytes" not in a:
      continue
    for o in timed:
      if "budget_bytes" not in o and o["temp_bytes"] <= a["budget_bytes"] and _faster(o, a):
        out.append(f"{a['strategy']} ({a.get('auto_choice')}) is beaten by {o['strategy']}: "
                   f"{o['step_ms_median']:.2f}+-{o['step_ms_spread']:.2f} ms against "
                   f"{a['step_ms_median']:.2f}+-{a['step_ms_spread']:.2f} ms, "
                   f"{o['temp_bytes'] / 2**20:.1f} MiB within the budget")
  return out


def pareto(rows: list[dict[str, Any]], mem: str = "temp_bytes") -> list[str]:
  """The memory-time frontier, by memory ascending, that timing noise cannot fake.

  From the least memory up, a strategy joins the frontier only if it is faster
  than the last one on it beyond both timing spreads: each step along the
  frontier buys a speedup larger than the noise. Timings whose spreads overlap
  are a tie, and the tie goes to less memory.
  """
  ok = [r for r in rows if not r.get("error") and "step_ms_median" in r]
  return [r["strategy"] for r in report.timing.pareto_front(ok, lambda r: r[mem], _row_timing)]


def overhead_text(r: dict[str, Any], base: dict[str, Any]) -> str:
  """Step time relative to no remat, "≈1.00" when within the two spreads."""
  if r is base or report.timing.tied(_row_timing(r), _row_timing(base)):
    return "≈" + f"{r['step_ms_median'] / base['step_ms_median']:.2f}"
  return f"{r['step_ms_median'] / base['step_ms_median']:.2f}"


class Progress:
  """A one-line progress bar on stderr (no dependencies: GPU images lack rich/tqdm)."""

  def __init__(self, total: int) -> None:
    self.total, self.done, self.t0 = total, 0, time.perf_counter()

  def start(self, label: str) -> None:
    width = 24
    filled = width * self.done // max(self.total, 1)
    elapsed = time.perf_counter() - self.t0
    print(f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
          f"{elapsed:5.0f}s  {label}", file=sys.stderr, flush=True)
    self.done += 1


def run(size: str, repeats: int, only_models: list[str] | None, only: list[str] | None,
        isolate: bool, auto_budgets: tuple[float, ...],
        save: Callable[[dict[str, Any]], None] = lambda result: None,
        time_budget_s: float | None = None,
        page_for: Callable[[str], Path] | None = None) -> dict[str, Any]:
  """Every job, model by model; ``save(result)`` is called as each model's rows are done
  (so an interrupted run keeps what it finished). ``time_budget_s``: the wall-clock
  seconds each model's timing rounds may take (auto's search included). ``page_for(model)``:
  where to write the model's memory timeline page, every strategy on one scale."""
  mods = [m for m in SIZES[size]() if not only_models or m.name in only_models]
  jobs = [(m, s) for m in mods for s in m.strategies if not only or s in only]
  if auto_budgets:
    jobs += [(m, f"auto {int(b * 100)}%") for m in mods if m.name in ("mlp", "gpt")
             for b in auto_budgets]
  progress = Progress(len(jobs) + (0 if isolate else len(mods)))
  dev = jax.devices()[0]
  result: dict[str, Any] = {
      "device": getattr(dev, "device_kind", str(dev)),
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "python": platform.python_version(),
      "size": size,
      "repeats": repeats,
      "timing": ("each strategy in its own process, 2 x repeats steps" if isolate else
                 "interleaved rounds over a model's strategies (one step each per round), "
                 f"repeated until every spread is within {report.timing.RELIABLE:.0%} of its median or "
                 f"{3 * repeats} rounds; where auto ran, the rounds of its search, which "
                 "holds every strategy of the model, and near ties timed again by themselves"),
      "time_budget_s": time_budget_s,
      "models": {m.name: m.describe for m in mods},
      "live_peak_note": ("live peak from memory_stats(), each strategy in a fresh process"
                         if isolate else
                         "live peak not available on this backend: compiler numbers only"
                         if live_peak_bytes() is None else
                         "live peak from memory_stats() in one process: only increases are "
                         "attributable"),
      "rows": [], "pareto": {}, "complete": False,
  }
  for m in mods:
    rows = []
    for mm, s in jobs:
      if mm is not m:
        continue
      progress.start(f"{m.name} / {s}")
      rows.append(_run_isolated(size, m.name, s, repeats) if isolate
                  else measure_named(size, m.name, s, repeats, timed=False,
                                     fractions=auto_budgets, time_budget_s=time_budget_s))
    if not isolate:
      progress.start(f"{m.name}: timing {len(rows)} strategies, interleaved")
      _time_rows(m, rows, repeats, time_budget_s)
    lines = {r["strategy"]: r.pop("_timeline") for r in rows if "_timeline" in r}
    if page_for is not None and lines:
      page = page_for(m.name)
      MemoryTimeline(lines, jax.default_backend()).to_html(
          str(page), title=f"{m.name}: memory timeline of every strategy ({m.describe})")
      result.setdefault("pages", {})[m.name] = page.name
    result["rows"].extend(rows)
    result["pareto"][m.name] = pareto(rows)
    result.setdefault("auto_beaten", {})[m.name] = auto_beaten(rows)
    save(result)
  progress.start("done")
  result["complete"] = True
  return result


def measure_named(size: str, model_name: str, strategy: str, repeats: int,
                  timed: bool = True, fractions: tuple[float, ...] = (),
                  time_budget_s: float | None = None) -> dict[str, Any]:
  """One row by model and strategy name; ``fractions``: every auto budget of the run."""
  model = next(m for m in SIZES[size]() if m.name == model_name)
  if strategy.startswith("auto "):
    from experiments.auto_plan import plan_for

    budget = float(strategy.split()[1].rstrip("%")) / 100
    try:
      plan = plan_for(model, budget, min(repeats, 5), fractions, time_budget_s)
    except ValueError as e:
      return {"model": model_name, "strategy": strategy, "error": f"infeasible: {e}"}
    label = plan.pop("auto_choice")
    budget_bytes = plan.pop("budget_bytes")
    row = measure(model, strategy, repeats, plan=plan, timed=timed)
    row["auto_choice"] = label
    row["budget_fraction"] = budget
    row["budget_bytes"] = budget_bytes
    return row
  return measure(model, strategy, repeats, timed=timed)


def _run_isolated(size: str, model: str, strategy: str, repeats: int) -> dict[str, Any]:
  cmd = [sys.executable, "-m", "experiments.bench", "--worker", model, strategy,
         "--size", size, "--repeats", str(repeats)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
  return {"model": model, "strategy": strategy, "error": f"worker failed: {tail[0][:300]}"}


def _mib(b: int | None) -> str:
  return "-" if b is None else f"{b / 2**20:,.1f}"


def print_table(result: dict[str, Any]) -> None:
  print(f"\nremat_kit bench: {result['device']} ({result['backend']}), jax {result['jax']}, "
        f"size={result['size']}")
  print(result["live_peak_note"])
  timed = [r for r in result["rows"] if "step_ms_median" in r]
  print(f"step time: {result['timing']}; median +- half the 10-90th percentile range; "
        f"{sum(r['timing_reliable'] for r in timed)}/{len(timed)} rows within "
        f"{report.timing.RELIABLE:.0%}. x time is '≈' where it is within both spreads of no remat.")
  for name, desc in result["models"].items():
    rows, base = model_rows(result, name)
    print(f"\n{desc}")
    head = (f"{'strategy':30s} {'temp MiB':>9s} {'x temp':>7s} {'act MiB':>8s} "
            f"{'+FLOPs%':>8s} {'step ms':>15s} {'x time':>7s} {'live MiB':>9s} {'grads':>6s}")
    print(head)
    print("-" * len(head))
    for r in rows:
      if r.get("error"):
        print(f"{r['strategy']:30s} {r['error']}")
        continue
      xt = f"{r['temp_bytes'] / base['temp_bytes']:.2f}" if base else "-"
      xs = overhead_text(r, base) if base else "-"
      step = f"{r['step_ms_median']:.2f}±{r['step_ms_spread']:.2f}"
      step += "" if r["timing_reliable"] else "?"
      label = r["strategy"] + (f" = {r['auto_choice']}" if r.get("auto_choice") else "")
      print(f"{label[:30]:30s} {_mib(r['temp_bytes']):>9s} {xt:>7s} "
            f"{_mib(r['activation_bytes']):>8s} {r['recompute_overhead_pct']:>8.1f} "
            f"{step:>15s} {xs:>7s} {_mib(r['live_peak_bytes']):>9s} "
            f"{'ok' if r['grads_match'] else 'DIFF':>6s}")
      if r.get("note"):
        print(f"{'':30s} note: {r['note']}")
    front = result["pareto"].get(name, [])
    print(f"Pareto (less memory, or faster beyond the timing spread): {' < '.join(front)}")
    if any("budget_bytes" in r for r in rows):
      beaten = result.get("auto_beaten", {}).get(name, [])
      print("auto check: " + ("; ".join(beaten) if beaten else
                              "no strategy that fits an auto budget is faster than auto's "
                              "plan beyond both timing spreads"))
  if any(not r["timing_reliable"] for r in timed):
    print("?: spread above 5% of the median after the extra rounds: this machine was busy; "
          "treat that step time as unreliable.")


def plot(result: dict[str, Any], path: Path) -> bool:
  """Memory against step time per model: numbered points, a key beside each panel, the
  Pareto frontier (by :func:`pareto`) drawn through its points. False without matplotlib."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot written (pip install matplotlib).",
          file=sys.stderr)
    return False
  names = [n for n in result["models"] if any(
      r["model"] == n and "step_ms_median" in r for r in result["rows"])]
  if not names:
    return False
  fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.6), squeeze=False)
  for ax, name in zip(axes[0], names):
    rows = [r for r in result["rows"] if r["model"] == name and "step_ms_median" in r]
    base = next((r for r in rows if r["strategy"] == "no remat"), rows[0])
    mem = lambda r: r["temp_bytes"] / 2**20
    rel = lambda r: r["step_ms_median"] / base["step_ms_median"]
    err = lambda r: r["step_ms_spread"] / base["step_ms_median"]
    front = set(result["pareto"].get(name, []))
    key = []
    at: dict[tuple[float, float], list[str]] = {}  # an auto point sits on the plan it chose
    for i, r in enumerate(rows, 1):
      auto = r["strategy"].startswith("auto")
      color = "tab:red" if auto else "tab:green" if r["strategy"] in front else "tab:blue"
      ax.errorbar(mem(r), rel(r), yerr=err(r), fmt="*" if auto else "o", ms=8 if auto else 5,
                  color=color, capsize=2, lw=0.8)
      at.setdefault((round(mem(r), 3), round(rel(r), 4)), []).append(str(i))
      label = r["strategy"] + (f" = {r['auto_choice']}" if r.get("auto_choice") else "")
      key.append(f"{i} {label[:34]}")
    for (x, y), numbers in at.items():
      ax.annotate(",".join(numbers), (x, y), fontsize=7, xytext=(4, 2),
                  textcoords="offset points")
    pts = sorted((r for r in rows if r["strategy"] in front), key=mem)
    if len(pts) > 1:
      ax.plot([mem(r) for r in pts], [rel(r) for r in pts], "--", color="tab:green", lw=1,
              label="Pareto frontier")
      ax.legend(fontsize=7, loc="upper right")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set_title(name)
    ax.set_xlabel("compiled temp memory (MiB)")
    ax.set_ylabel("step time / no remat (bars: spread)")
    ax.text(1.02, 1.0, "\n".join(key), transform=ax.transAxes, fontsize=6.5, va="top",
            family="monospace")
  fig.suptitle(f"remat_kit bench: {result['device']} ({result['backend']}); green: Pareto, "
               "red stars: auto", fontsize=10)
  save_figure(fig, path, dpi=130, say=False)
  return True


def _default_also_target() -> str:
  if jax.default_backend() in ACCELERATORS:
    return "none"
  try:
    import libtpu  # noqa: F401
  except ImportError:
    return "none"
  return "tpu:v5e:2x2"


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  accel = jax.default_backend() in ACCELERATORS
  ap.add_argument("--size", choices=sorted(SIZES), default="large" if accel else "small")
  ap.add_argument("--repeats", type=int, default=20 if accel else 8,
                  help="timed steps per run (two runs, after 3 warm-up steps)")
  ap.add_argument("--models", nargs="*", help="models to run: mlp gpt cnn rnn")
  ap.add_argument("--only", nargs="*", help="strategies to run (by label)")
  ap.add_argument("--auto", type=float, nargs="*", default=[0.3, 0.5, 0.75],
                  help="budgets for the auto strategy, as fractions of the no-remat temp bytes")
  ap.add_argument("--time-budget", type=float, default=None if accel else 20.0,
                  help="wall-clock seconds each model's timing rounds may take, auto's search "
                       "included (default 20 on CPU, unlimited on GPU/TPU); the spreads "
                       "reached are reported")
  ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=accel,
                  help="run each strategy in a fresh process (default on GPU/TPU)")
  ap.add_argument("--out", type=Path, default=None,
                  help=f"results JSON path (default: {LOCAL.relative_to(RESULTS.parent.parent)}"
                       "/<backend>-<device>.json, an ignored folder)")
  ap.add_argument("--refresh", action="store_true",
                  help="write the committed results in experiments/results (make bench-refresh)")
  ap.add_argument("--worker", nargs=2, metavar=("MODEL", "STRATEGY"), help=argparse.SUPPRESS)
  ap.add_argument("--target", default=None,
                  help="compile for an accelerator that is not here instead (tpu:v5e:2x2, "
                       "gpu:h100, ...): see experiments.target_bench")
  ap.add_argument("--also-target", default=_default_also_target(),
                  help="after the local run, also compile the GPT for this target "
                       "(default tpu:v5e:2x2 on a CPU-only machine with libtpu; 'none' to skip)")
  ap.add_argument("--no-frontier", action="store_true",
                  help="skip auto_remat's frontier against the presets on the reference GPT "
                       "(about a minute and a half on 2 cores)")
  args, rest = ap.parse_known_args(argv)
  if args.target:
    from experiments import target_bench

    return target_bench.main(["--target", args.target, *rest,
                              *(["--refresh"] if args.refresh else []),
                              *(["--out", str(args.out)] if args.out else [])])
  if rest:
    ap.error(f"unrecognized arguments: {' '.join(rest)}")
  if args.repeats < 1:
    ap.error(f"--repeats must be >= 1, got {args.repeats}")
  if args.time_budget is not None and not args.time_budget > 0:
    ap.error(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
  if args.worker:
    row = measure_named(args.size, *args.worker, args.repeats)
    row.pop("_timeline", None)  # each worker's own process: no page
    print(json.dumps(row))
    return 0
  known = {m.name: m for m in SIZES[args.size]()}
  bad = [m for m in args.models or [] if m not in known]
  if bad:
    ap.error(f"--models: unknown {bad}; choose from {sorted(known)}")
  labels = {s for m in known.values() for s in m.strategies}
  bad = [s for s in args.only or [] if s not in labels]
  if bad:
    ap.error(f"--only: unknown strategies {bad}; choose from {sorted(labels)}")
  bad = [b for b in args.auto if not 0 < b <= 1]
  if bad:
    ap.error(f"--auto: budgets are fractions in (0, 1], got {bad}")
  dev = getattr(jax.devices()[0], "device_kind", "cpu").lower().replace(" ", "-")
  out = args.out or (RESULTS if args.refresh else LOCAL) / f"{jax.default_backend()}-{dev}.json"
  problem = check_out(out)
  if problem:
    ap.error(f"--out {str(out)!r}: {problem}")
  try:
    result = run(args.size, args.repeats, args.models, args.only, args.isolate,
                 tuple(args.auto), save=lambda r: write_atomic(out, r),
                 time_budget_s=args.time_budget,
                 page_for=lambda m: out.with_name(f"{out.stem}-{m}.html"))
  except KeyboardInterrupt:
    print(f"\ninterrupted: the models finished so far are in {out}", file=sys.stderr)
    return 130
  finish(out, result, print_table, plot)
  if args.also_target and args.also_target != "none" and not args.worker:
    from experiments import target_bench

    print(f"\n== a larger GPT compiled for {args.also_target} (deviceless: compiler figures "
          "and estimated time, nothing ran; every strategy at the training size: "
          "make bench ARGS='--target tpu:v5e:2x2', several minutes of compiles) ==")
    try:
      target_bench.main(["--target", args.also_target, "--models", "gpt", "--size", "demo",
                         "--only", "no remat", "full"])  # a subset: never the committed file
    except KeyboardInterrupt:
      print(f"\ninterrupted during the {args.also_target} compiles; the local results are in "
            f"{out}", file=sys.stderr)
      return 130
  if not args.no_frontier:
    from experiments import auto_remat_frontier

    frontier = out.with_name("auto_remat_frontier-quick.json")
    print("\n== auto_remat per tensor on the reference GPT, against every preset (measured "
          "with saved_residuals and flop_breakdown; the tag subsets and PyTorch: "
          "python -m experiments.auto_remat_frontier --torch) ==")
    try:
      auto_remat_frontier.main(["--quick", "--out", str(frontier)])
    except KeyboardInterrupt:
      print(f"\ninterrupted during the frontier; the local results are in {out}",
            file=sys.stderr)
      return 130
  bad = [f"{r['model']}/{r['strategy']}" for r in result["rows"]
         if not r.get("error") and not r["grads_match"]]
  if bad:
    print(f"gradients differ from no remat for: {bad}", file=sys.stderr)
  return 1 if bad else 0


if __name__ == "__main__":
  raise SystemExit(main())
