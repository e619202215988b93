"""Does the step-time estimate rank plans like the clock does? Checked on the local CPU.

The accelerator targets' ``estimated_seconds`` is FLOPs / peak rate + compiled
HBM bytes / bandwidth. Here the same formula runs on the local CPU with the
CPU's *measured* rates (a matmul and a copy), for the bench's small models
under each strategy, and each plan's step is timed (strategies interleaved,
round after round, so that load on a shared machine falls on all alike). For
every pair of plans of one model whose measured spreads do not overlap, the
estimate either orders them as the clock does or not; this prints how often
it agrees.

  python -m experiments.estimate_check [--rounds 12]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments._io import write_json
from experiments.bench import SIZES, model_loss
from remat_kit.report import compiled_memory, estimate_seconds, flop_breakdown
from remat_kit.report.estimate import measure_local_rates

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=12, help="timed steps per plan (interleaved)")
  ap.add_argument("--out", type=Path, default=RESULTS / "estimate_check-cpu.json")
  a = ap.parse_args(argv)
  rates = measure_local_rates()
  print(rates[2])
  out: dict[str, Any] = {"rates": rates[2], "jax": jax.__version__, "models": {}}
  total_agree = total_pairs = 0
  for model in SIZES["small"]():
    inputs = model.inputs(jax.random.key(1))
    params = model.build(**model.strategies["no remat"]).init(
        {"params": jax.random.key(0), "dropout": jax.random.key(3)}, *inputs)["params"]
    plans = {}
    for label, kw in model.strategies.items():
      if "offload" in label:
        continue
      loss = model_loss(model, kw, inputs)
      grad = jax.grad(loss)
      est, _ = estimate_seconds(flop_breakdown(loss, params)["total"],
                                compiled_memory(grad, params, hbm_bytes=True), "cpu",
                                rates=rates)
      step = jax.jit(grad)
      jax.block_until_ready(step(params))
      plans[label] = {"step": step, "estimated_ms": est * 1e3, "times": []}
    for _ in range(a.rounds):
      for p in plans.values():
        t0 = time.perf_counter()
        jax.block_until_ready(p["step"](params))
        p["times"].append((time.perf_counter() - t0) * 1e3)
    rows = {}
    for label, p in plans.items():
      q10, q50, q90 = np.percentile(p["times"], [10, 50, 90])
      rows[label] = {"estimated_ms": p["estimated_ms"], "measured_ms": float(q50),
                     "lo": float(q10), "hi": float(q90)}
    agree = pairs = 0
    for x, y in itertools.combinations(rows, 2):
      rx, ry = rows[x], rows[y]
      if rx["hi"] >= ry["lo"] and ry["hi"] >= rx["lo"]:
        continue  # within noise: the clock does not order them
      pairs += 1
      agree += (rx["measured_ms"] < ry["measured_ms"]) == (rx["estimated_ms"] < ry["estimated_ms"])
    total_agree, total_pairs = total_agree + agree, total_pairs + pairs
    out["models"][model.name] = {"rows": rows, "agree": agree, "pairs": pairs}
    print(f"\n{model.describe}")
    for label, r in rows.items():
      print(f"  {label:28s} estimated {r['estimated_ms']:8.2f} ms   measured "
            f"{r['measured_ms']:8.2f} ms (p10-p90 {r['lo']:.2f}-{r['hi']:.2f})")
    print(f"  ranking agrees on {agree}/{pairs} pairs the clock separates")
  out["agree"], out["pairs"] = total_agree, total_pairs
  print(f"\nall models: the estimate orders {total_agree}/{total_pairs} separable pairs as "
        "the clock does")
  write_json(a.out, out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
