"""Remat strategies on an accelerator that is not here: compiled memory and estimated time.

``make bench ARGS="--target tpu:v5e:2x2"`` (or ``python -m experiments.target_bench
--target tpu:v5e:2x2``) compiles the gradient of each reference model under
each strategy for the target, deviceless, at sizes people train at (nothing
runs, so size costs compile time only), and reports the compiler's temp and
peak bytes, remat_kit's FLOPs and the estimated step time on the target
(:mod:`remat_kit.report.estimate`). Results: ``experiments/results/<target>.json``
and a PNG of peak memory against estimated time with the Pareto frontier.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from experiments._io import LOCAL, check_out, finish, model_rows, save_figure
from remat_kit import models, report, targets
from remat_kit.flax import LayerStack
from remat_kit.report import memory_report

RESULTS = Path(__file__).parent / "results"


@dataclasses.dataclass(frozen=True)
class Case:
  """One model at a training size: a module factory, input structs, strategies."""

  name: str
  build: Callable[..., Any]
  inputs: tuple[Any, ...]  # array inputs (ShapeDtypeStructs)
  static: tuple[Any, ...]  # Python inputs after them (flags such as train)
  strategies: dict[str, dict[str, Any]]
  describe: str


def gpt(layers: int = 24, d: int = 2048, seq: int = 2048, batch: int = 4, heads: int = 16,
        vocab: int = 32000) -> Case:
  def build(**kw: Any) -> Any:
    return models.GPT(vocab_size=vocab, max_len=seq, d_model=d, num_heads=heads,
                      num_layers=layers, dtype=jnp.bfloat16, **kw)

  return Case(
      "gpt", build, (jax.ShapeDtypeStruct((batch, seq), jnp.int32),), (),
      {"no remat": {"policy": False}, "full": {"policy": True},
       "save_dots": {"policy": "save_dots"}, "save_dots_no_batch": {"policy": "minimal"},
       "save qkv, attn_out": {"policy": "save_qkv_attn_out"},
       "nested (2 levels)": {"policy": True, "levels": 2}},
      f"GPT bf16: {layers} layers, d_model {d}, seq {seq}, batch {batch}, {heads} heads, "
      f"vocab {vocab}")


def mlp(layers: int = 4, batch: int = 32768, width: int = 4096) -> Case:
  def build(**kw: Any) -> Any:
    return LayerStack(models.HiddenLayer(width, 0.1), layers, **kw)

  return Case(
      "mlp", build, (jax.ShapeDtypeStruct((batch, width), jnp.float32),), (True,),
      {"no remat": {"policy": False}, "full": {"policy": True},
       "save_dots": {"policy": "save_dots"}, "nested (2 levels)": {"policy": True, "levels": 2}},
      f"the seeds' dropout MLP, fp32: {layers} hidden layers, batch {batch}, width {width}")


CASES: dict[str, Callable[[], Case]] = {"gpt": gpt, "mlp": mlp}
# "demo" stays far from the chip's HBM, where the TPU compiler is quick (near the limit
# it works hard to fit, and one compile of the training size took over 3 minutes here).
SIZES: dict[str, dict[str, Callable[[], Case]]] = {
    "train": CASES,
    "demo": {"gpt": lambda: gpt(layers=12, d=1024, seq=1024, batch=4, heads=8),
             "mlp": lambda: mlp(layers=4, batch=8192, width=2048)},
}


def _loss(case: Case, kw: dict[str, Any]) -> tuple[Callable[..., Any], Any]:
  module = case.build(**kw)
  keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  params = jax.eval_shape(
      lambda *xs: case.build(policy=False).init(keys, *xs, *case.static), *case.inputs)["params"]

  def loss(params: Any, *inputs: Any) -> jax.Array:
    out = module.apply({"params": params}, *inputs, *case.static,
                       rngs={"dropout": jax.random.key(2)})
    return jnp.mean(out.astype(jnp.float32) ** 2)

  return loss, params


def measure(case: Case, strategy: str, target: str) -> dict[str, Any]:
  """One row: the compiled gradient of one strategy on the target."""
  row: dict[str, Any] = {"model": case.name, "strategy": strategy, "target": target}
  t0 = time.perf_counter()
  try:
    loss, params = _loss(case, case.strategies[strategy])
    rep = memory_report(loss, params, *case.inputs, target=target, live=False)
  except Exception as e:  # noqa: BLE001 - one failing strategy must not end the run
    text = str(e)
    need = re.search(r"HLO temporaries \(([\d.]+)([GM])\) exceeds available HBM \(([\d.]+)G", text)
    if need:  # the target's compiler refuses a program larger than the chip's HBM
      scale = 2**30 if need.group(2) == "G" else 2**20
      row["oom_required_bytes"] = int(float(need.group(1)) * scale)
      row["error"] = (f"OOM on the target: needs {need.group(1)}{need.group(2)}iB of "
                      f"temporaries, the chip has {need.group(3)} GiB")
    else:
      row["error"] = f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
    return row
  c = rep.compiled
  row.update(temp_bytes=c.get("temp_size", 0), peak_bytes=c["peak_bytes"],
             argument_bytes=c.get("argument_size", 0), output_bytes=c.get("output_size", 0),
             hbm_bytes_moved=c.get("hbm_bytes_moved"), flops=rep.flops["total"],
             recompute_pct=rep.flops["recompute_pct"], estimated_ms=rep.estimated_seconds * 1e3,
             compile_s=round(time.perf_counter() - t0, 1), error=None)
  return row


def pareto(rows: list[dict[str, Any]]) -> list[str]:
  """Strategies no other beats on both peak bytes and estimated time, by peak ascending
  (:func:`remat_kit.report.timing.pareto_front`; an estimate has no spread)."""
  ok = [r for r in rows if not r.get("error")]
  est = lambda r: report.timing.Timing(r["estimated_ms"] / 1e3, 0.0, 1)
  return [r["strategy"] for r in report.timing.pareto_front(ok, lambda r: r["peak_bytes"], est)]


def run(target: str, names: list[str], only: list[str] | None = None,
        size: str = "train") -> dict[str, Any]:
  t = targets.parse_target(target)
  cases = [SIZES[size][n]() for n in names]
  jobs = [(c, s) for c in cases for s in c.strategies if not only or s in only]
  rows = []
  t0 = time.perf_counter()
  for i, (c, s) in enumerate(jobs):
    print(f"[{i + 1}/{len(jobs)} {time.perf_counter() - t0:5.0f}s] {t.name}: {c.name} / {s}",
          file=sys.stderr, flush=True)
    rows.append(measure(c, s, t.name))
  chip = t.chip
  return {
      "target": t.name, "size": size, "jax": jax.__version__,
      "chip": dataclasses.asdict(chip) if chip else None,
      "source": "deviceless compile by the target's compiler; nothing ran",
      "models": {c.name: c.describe for c in cases},
      "rows": rows,
      "pareto": {c.name: pareto([r for r in rows if r["model"] == c.name]) for c in cases},
  }


def print_table(result: dict[str, Any]) -> None:
  print(f"\n{result['target']} (compiled deviceless, jax {result['jax']}; estimated step = "
        "remat_kit FLOPs / peak FLOP/s + compiled HBM bytes / bandwidth)")
  for name, desc in result["models"].items():
    rows, base = model_rows(result, name)
    print(f"\n{desc}")
    head = (f"{'strategy':24s} {'temp MiB':>10s} {'peak MiB':>10s} {'x peak':>7s} "
            f"{'+FLOPs%':>8s} {'est. ms':>9s} {'x est.':>7s}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
      if r.get("error"):
        print(f"{r['strategy']:24s} {r['error']}")
        continue
      xp = f"{r['peak_bytes'] / base['peak_bytes']:.2f}" if base else "-"
      xe = f"{r['estimated_ms'] / base['estimated_ms']:.2f}" if base else "-"
      print(f"{r['strategy']:24s} {r['temp_bytes'] / 2**20:>10,.1f} "
            f"{r['peak_bytes'] / 2**20:>10,.1f} {xp:>7s} {r['recompute_pct']:>8.1f} "
            f"{r['estimated_ms']:>9.2f} {xe:>7s}")
    print(f"fastest at each memory level (estimated, Pareto): {' < '.join(result['pareto'][name])}")


def plot(result: dict[str, Any], path: Path) -> bool:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  names = list(result["models"])
  fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.2), squeeze=False)
  for ax, name in zip(axes[0], names):
    rows = [r for r in result["rows"] if r["model"] == name and not r.get("error")]
    if not rows:
      continue
    for r in rows:
      ax.scatter(r["peak_bytes"] / 2**30, r["estimated_ms"], color="tab:blue", s=30)
      ax.annotate(r["strategy"], (r["peak_bytes"] / 2**30, r["estimated_ms"]), fontsize=7,
                  xytext=(4, 3), textcoords="offset points")
    front = [next(r for r in rows if r["strategy"] == s) for s in result["pareto"][name]]
    ax.plot([r["peak_bytes"] / 2**30 for r in front], [r["estimated_ms"] for r in front],
            "--", color="gray", lw=1, label="Pareto frontier")
    ax.set_title(f"{name} on {result['target']} (deviceless)", fontsize=9)
    ax.set_xlabel("compiled peak memory per chip (GiB)")
    ax.set_ylabel("estimated step time (ms)")
    ax.legend(fontsize=7)
  save_figure(fig, path, say=False)
  return True


def main(argv: list[str] | None = None) -> int:

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--target", default="tpu:v5e:2x2", help="e.g. tpu:v5e:2x2, gpu:h100")
  ap.add_argument("--models", nargs="*", default=sorted(CASES), help="gpt mlp")
  ap.add_argument("--only", nargs="*", help="strategies to run (by label)")
  ap.add_argument("--size", choices=sorted(SIZES), default="train",
                  help="train: GPT d_model 2048, seq 2048, 24 layers, bf16 and the seeds' MLP "
                       "(minutes of compile); demo: a quarter of that (seconds)")
  ap.add_argument("--out", type=Path, default=None,
                  help="results JSON path (default: experiments/results/local/, ignored by git)")
  ap.add_argument("--refresh", action="store_true",
                  help="write the committed results in experiments/results")
  args = ap.parse_args(argv)
  try:
    t = targets.parse_target(args.target)
  except ValueError as e:
    ap.error(str(e))
  if t.is_local:
    ap.error("--target: give an accelerator target (tpu:... or gpu:...); "
             "`python -m experiments.bench` measures the local backend")
  bad = [m for m in args.models if m not in CASES]
  if bad:
    ap.error(f"--models: unknown {bad}; choose from {sorted(CASES)}")
  suffix = "" if args.size == "train" else f"-{args.size}"
  out = args.out or (RESULTS if args.refresh else LOCAL) / \
      f"{t.name.replace(':', '-')}{suffix}.json"
  problem = check_out(out)
  if problem:
    ap.error(f"--out {str(out)!r}: {problem}")
  try:
    result = run(t.name, args.models, args.only, args.size)
  except KeyboardInterrupt:
    print("\ninterrupted: nothing written (the rows are compiled together)", file=sys.stderr)
    return 130
  finish(out, result, print_table, plot)
  # A plan the chip cannot hold is a result; any other failure is not.
  return 1 if any(r.get("error") and "oom_required_bytes" not in r
                  for r in result["rows"]) else 0


if __name__ == "__main__":
  raise SystemExit(main())
