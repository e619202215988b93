"""auto against exhaustive search, on an accelerator target: does auto find the best plan?

For GPT stacks compiled deviceless for ``--target`` (``tpu:v5e:2x2`` by
default), this enumerates, independently of ``rk.auto``'s own candidate list,
every registered preset and every subset of the model's ``checkpoint_name``
tags, compiles each (through the same compile-and-estimate step auto uses,
cached by policy), and at 25%, 50% and 75% of the no-remat temp bytes takes
the least ``estimated_seconds`` that fits. It then runs ``rk.auto`` at each
budget and prints auto's estimate over the exhaustive best (auto may also
try nesting and offload, so the ratio can be below 1). The claim checked is
ratio <= 1.02 at every budget. Dropout is off (``train=False``): each
deviceless TPU compile of the small GPT takes ~20 s on a 2-core machine
(~50 s with dropout), and there are ~150 of them per model.

  python -m experiments.auto_vs_exhaustive [--target tpu:v5e:2x2] [--models small large]

Results go to ``experiments/results/auto_vs_exhaustive-<target>.json``
(written as each model finishes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from remat_kit import models
from remat_kit.planner import Search
from remat_kit.policies import SaveNames, from_config, registered

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "small": dict(num_layers=6, d_model=512, seq=512, batch=8, num_heads=8),
    "large": dict(num_layers=12, d_model=1024, seq=1024, batch=8, num_heads=16),
}
FRACTIONS = (0.25, 0.5, 0.75)


def _setup(spec: dict[str, int]) -> tuple[Any, Any, Any]:
  gpt = models.GPT(vocab_size=1024, max_len=spec["seq"], d_model=spec["d_model"],
                   num_heads=spec["num_heads"], num_layers=spec["num_layers"],
                   dtype=jnp.bfloat16)
  # Tokens are closed over by the loss (a small constant); parameters are only shapes.
  tokens = jax.random.randint(jax.random.key(2), (spec["batch"], spec["seq"]), 0, 1024)
  params = jax.eval_shape(lambda: gpt.init({"params": jax.random.key(0),
                                            "dropout": jax.random.key(1)}, tokens))["params"]
  return gpt, params, tokens


def run_model(name: str, target: str) -> dict[str, Any]:
  spec = MODELS[name]
  gpt, params, tokens = _setup(spec)
  t0 = time.perf_counter()
  # train=False: no dropout (the TPU compiler takes ~2.5x longer with threefry dropout, and
  # the search compiles ~150 programs per model).
  search = Search(gpt, params, tokens, False, target=target, verbose=True)
  # The exhaustive list, built here: every preset that applies, every subset of the names.
  names = search.names
  exhaustive = []
  for p in registered():
    pol = from_config(p)
    if pol.referenced_names() <= set(names) and "offload" not in repr(pol).lower():
      exhaustive.append((p, pol))
  for r in range(1, len(names) + 1):
    for combo in itertools.combinations(names, r):
      exhaustive.append(("save:" + ",".join(combo), SaveNames(combo)))
  measured = [search.measure(label, pol, None, "exhaustive") for label, pol in exhaustive]
  none = search.none
  rows = []
  for f in FRACTIONS:
    budget = int(f * none.temp_bytes)
    fits = [c for c in measured if c.temp_bytes <= budget]
    best = min(fits, key=lambda c: (c.cost_s, c.temp_bytes)) if fits else None
    result = search.solve(budget)
    ch = result.choice
    row = {"fraction": f, "budget_bytes": budget, "auto": ch.label,
           "auto_temp_bytes": ch.temp_bytes, "auto_estimated_s": ch.cost_s,
           "exhaustive_best": best.label if best else None,
           "exhaustive_temp_bytes": best.temp_bytes if best else None,
           "exhaustive_estimated_s": best.cost_s if best else None,
           "ratio": ch.cost_s / best.cost_s if best else None}
    rows.append(row)
  return {"model": name, "spec": spec, "target": target, "names": names,
          "no_remat_temp_bytes": none.temp_bytes, "no_remat_estimated_s": none.cost_s,
          "exhaustive_candidates": len({id(c) for c in measured}),
          "auto_candidates": len(search.measured), "seconds": time.perf_counter() - t0,
          "estimate_source": none.cost_source, "rows": rows,
          "candidates": [c.to_dict() for c in search.measured.values()]}


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--target", default="tpu:v5e:2x2")
  ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
  ap.add_argument("--out", type=Path, default=None)
  args = ap.parse_args(argv)
  out = args.out or RESULTS / f"auto_vs_exhaustive-{args.target.replace(':', '-')}.json"
  result: dict[str, Any] = {"target": args.target, "jax": jax.__version__, "models": []}
  try:
    for name in args.models:
      res = run_model(name, args.target)
      result["models"].append(res)
      out.write_text(json.dumps(result, indent=1))
      spec = res["spec"]
      print(f"\nGPT {name}: {spec['num_layers']} layers, d_model {spec['d_model']}, seq "
            f"{spec['seq']}, batch {spec['batch']}, bf16, on {args.target}: "
            f"{res['exhaustive_candidates']} exhaustive candidates, auto tried "
            f"{res['auto_candidates']}")
      print(f"{'budget':>8} {'auto plan':34} {'auto ms':>9} {'exhaustive best':34} "
            f"{'best ms':>9} {'ratio':>6}")
      for r in res["rows"]:
        print(f"{r['fraction']:>8.0%} {r['auto']:34} {r['auto_estimated_s'] * 1e3:9.3f} "
              f"{r['exhaustive_best'] or '-':34} "
              f"{(r['exhaustive_estimated_s'] or 0) * 1e3:9.3f} "
              f"{r['ratio'] if r['ratio'] is None else format(r['ratio'], '.4f'):>6}")
  except KeyboardInterrupt:
    print(f"interrupted: the models finished so far are in {out}", file=sys.stderr)
    return 130
  worst = max((r["ratio"] for m in result["models"] for r in m["rows"] if r["ratio"]),
              default=None)
  print(f"\nworst auto / exhaustive ratio: {worst:.4f} (claim: <= 1.02)" if worst else
        "\nno budget had a fitting exhaustive candidate")
  print(f"wrote {out}")
  return 0 if worst is None or worst <= 1.02 else 1


if __name__ == "__main__":
  raise SystemExit(main())
