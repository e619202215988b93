"""rk.auto on the reference GPT for an H100: the model search against the exhaustive one.

The reference GPT (``remat_kit.models.GPT``: 4 layers, d_model 256, seq 256, batch
4, its seven tags, scanned by ``LayerStack``), ``rk.auto(..., budget=--budget,
target="gpu:h100")`` (deviceless):

1. ``search="model"`` (the default), in a fresh process so nothing is cached: its
   wall time from a cold start, the compiles it made, its choice and estimate;
2. ``search="exhaustive", per_tensor=False``: every preset, every subset of the
   seven tags, nesting and offload, each compiled (what ``auto`` did before the
   model search).

It prints the model search's estimate over the exhaustive search's best; the claims
checked are under 60 s and a ratio of at most 1.

  python -m experiments.auto_speed [--budget 64MiB] [--skip-exhaustive]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax

import remat_kit as rk

RESULTS = Path(__file__).resolve().parent / "results"


def setup() -> tuple[Any, Any, Any]:
  gpt = rk.models.GPT(vocab_size=256, max_len=256, d_model=256, num_heads=4, num_layers=4)
  tokens = jax.random.randint(jax.random.key(2), (4, 256), 0, 256)
  params = jax.eval_shape(lambda: gpt.init({"params": jax.random.key(0),
                                            "dropout": jax.random.key(1)}, tokens))["params"]
  return gpt, params, tokens


def run(search: str, budget: str) -> dict[str, Any]:
  t0 = time.perf_counter()
  gpt, params, tokens = setup()
  res = rk.auto(gpt, params, tokens, False, budget=budget, target="gpu:h100", verbose=True,
                search=search, per_tensor=search != "exhaustive")
  c = res.choice
  return {"search": search, "seconds": time.perf_counter() - t0, "choice": c.label,
          "source": c.source, "temp_bytes": c.temp_bytes, "estimated_s": c.cost_s,
          "compiled": len(res.candidates),
          "candidates": [{"label": x.label, "temp_bytes": x.temp_bytes, "estimated_s": x.cost_s}
                         for x in res.candidates]}


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--budget", default="64MiB")
  ap.add_argument("--skip-exhaustive", action="store_true")
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  ap.add_argument("--out", type=Path, default=RESULTS / "auto_speed-gpu-h100.json")
  a = ap.parse_args(argv)
  if a.worker:
    print("RESULT " + json.dumps(run(a.worker, a.budget)), flush=True)
    return 0
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "experiments.auto_speed", "--worker", "model",
                         "--budget", a.budget], capture_output=True, text=True, check=True)
  wall = time.perf_counter() - t0
  model = json.loads(next(line for line in proc.stdout.splitlines()
                          if line.startswith("RESULT "))[7:])
  model["process_seconds"] = wall
  print(proc.stderr[-3000:], file=sys.stderr)
  print(f"model search: {wall:.1f} s from a cold start (process), {model['compiled']} "
        f"compiled plans; choice {model['choice']} ({model['source']}), temp "
        f"{model['temp_bytes'] / 2**20:.2f} MiB, estimated {model['estimated_s'] * 1e3:.4f} ms")
  result: dict[str, Any] = {"jax": jax.__version__, "budget": a.budget, "model": model}
  if not a.skip_exhaustive:
    ex = run("exhaustive", a.budget)
    result["exhaustive"] = ex
    ratio = model["estimated_s"] / ex["estimated_s"]
    result["ratio"] = ratio
    print(f"exhaustive search: {ex['seconds']:.0f} s, {ex['compiled']} compiled plans; choice "
          f"{ex['choice']}, temp {ex['temp_bytes'] / 2**20:.2f} MiB, estimated "
          f"{ex['estimated_s'] * 1e3:.4f} ms")
    print(f"model / exhaustive estimated step time: {ratio:.4f} (claim: <= 1); model search "
          f"{wall:.1f} s (claim: < 60 s)")
  a.out.write_text(json.dumps(result, indent=1))
  print(f"wrote {a.out}")
  ok = wall < 60 and (a.skip_exhaustive or result["ratio"] <= 1.0)
  return 0 if ok else 1


if __name__ == "__main__":
  raise SystemExit(main())
