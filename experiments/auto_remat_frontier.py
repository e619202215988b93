"""auto_remat's frontier against the best presets and tag subsets, and against PyTorch.

The reference GPT (``remat_kit.models.GPT``: 4 pre-LN layers, d 256, seq 256, batch
4, 4 heads, fp32, materialized softmax, no dropout, a Python loop of blocks) is
planned by ``rk.auto_remat`` with no tags used and no policy hook. Every figure is
measured on the program, never taken from a solver: saved bytes are the activations
``saved_residuals`` lists for the gradient with respect to the parameters,
recomputation is ``flop_breakdown``'s (every FLOP, and matmuls alone).

1. **Presets and tag subsets.** Each registered preset that applies and (unless
   ``--quick``) each of the 127 subsets of the model's seven tags, applied per block,
   is measured; their Pareto frontier is compared with ``auto_remat`` at each of
   its points and at the midpoints between consecutive points.
2. **PyTorch** (``--torch``). The same model in PyTorch 2.13 (same weights, the same
   loss checked equal) under ``activation_memory_budget`` ratios
   (``experiments/torch_budget.py``, in a Python 3.11 venv ``.venv-torch`` made here
   with pip: ``torch==2.13.0`` comes from this machine's disk). At each of PyTorch's
   saved bytes, ``auto_remat`` (``cost="matmul_flops"``) is measured the same way,
   and the matmul recomputation, as PyTorch's FlopCounterMode counts it, compared.

Every ratio printed comes from this one run. Results go to
``experiments/results/auto_remat_frontier.json`` and a PNG beside it.

  python -m experiments.auto_remat_frontier [--quick] [--torch] [--out PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import remat_kit as rk
from remat_kit.planner import auto_remat_frontier
from remat_kit.policies import SaveNames, from_config, registered
from remat_kit.report import flop_breakdown, saved_residuals

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
SPEC = dict(vocab_size=256, max_len=256, d_model=256, num_heads=4, num_layers=4, batch=4)
MIB = 2**20


def setup(spec: dict[str, int] = SPEC) -> tuple[Any, Any, Any, Any]:
  """``(loss_of(policy), params, tokens, targets)`` of the reference GPT."""
  cfg = {k: v for k, v in spec.items() if k != "batch"}
  tokens = jax.random.randint(jax.random.key(2), (spec["batch"], spec["max_len"]), 0,
                              spec["vocab_size"])
  targets = jnp.roll(tokens, -1, axis=1)
  model = rk.models.GPT(**cfg, dropout_rate=0.0, scan=False, policy=False)
  params = model.init(jax.random.key(0), tokens[:, :8], False)["params"]

  def loss_of(policy: Any) -> Any:
    m = rk.models.GPT(**cfg, dropout_rate=0.0, scan=False, policy=policy)

    def loss(p: Any, tokens: jax.Array, targets: jax.Array) -> jax.Array:
      logp = jax.nn.log_softmax(m.apply({"params": p}, tokens, False))
      return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    return loss

  return loss_of, params, tokens, targets


def measure(fn: Any, params: Any, *rest: Any) -> dict[str, int]:
  """Saved activation bytes and recomputed FLOPs of the gradient w.r.t. ``params``."""
  f = lambda p: fn(p, *rest)
  saved = sum(r.bytes for r in saved_residuals(f, params) if r.kind == "activation")
  fb = flop_breakdown(f, params)
  return {"saved_bytes": int(saved), "recompute_flops": int(fb["recompute"]),
          "recompute_matmul_flops": int(fb["recompute_matmul"])}


def pareto(points: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
  out: list[dict[str, Any]] = []
  for p in sorted(points, key=lambda p: (p["saved_bytes"], p[key])):
    if not out or p[key] < out[-1][key]:
      out.append(p)
  return out


def best_within(frontier: list[dict[str, Any]], budget: int, key: str) -> dict[str, Any] | None:
  fits = [p for p in frontier if p["saved_bytes"] <= budget]
  return min(fits, key=lambda p: p[key]) if fits else None


def presets_and_subsets(loss_of: Any, args: tuple[Any, ...], quick: bool, say: Any
                        ) -> list[dict[str, Any]]:
  names = ("qkv", "attn_scores", "attn_probs", "attn_out", "mlp_in", "mlp_hidden", "mlp_out")
  plans: list[tuple[str, Any]] = []
  for p in registered():
    pol = from_config(p)
    if pol.referenced_names() <= set(names) and not pol.offloads:
      plans.append((p, pol))
  if not quick:
    for r in range(1, len(names) + 1):
      for combo in itertools.combinations(names, r):
        plans.append(("save:" + ",".join(combo), SaveNames(combo)))
  seen, rows = set(), []
  for i, (label, pol) in enumerate(plans):
    if pol in seen:
      continue
    seen.add(pol)
    row = {"plan": label, **measure(loss_of(pol), *args)}
    rows.append(row)
    say(f"  [{i + 1}/{len(plans)}] {label:56s} saved {row['saved_bytes'] / MIB:7.2f} MiB  "
        f"recompute {row['recompute_flops'] / 1e9:6.3f} GFLOP")
  return rows


def against_presets(loss_of: Any, args: tuple[Any, ...], quick: bool, say: Any
                    ) -> dict[str, Any]:
  base = loss_of(False)
  t0 = time.perf_counter()
  rows = presets_and_subsets(loss_of, args, quick, say)
  front = pareto(rows, "recompute_flops")
  budgets = sorted({p["saved_bytes"] for p in front}
                   | {(a["saved_bytes"] + b["saved_bytes"]) // 2 for a, b in zip(front, front[1:])})
  mids = {(a["saved_bytes"] + b["saved_bytes"]) // 2 for a, b in zip(front, front[1:])}
  planner = rk.planner.Planner(base, args)
  compared = []
  for b in budgets:
    if b < planner.least_bytes:
      continue
    t = time.perf_counter()
    plan = planner.plan(b, "saved", compile=False)
    planning = time.perf_counter() - t
    got = measure(plan.fn, *args)
    ref = best_within(front, b, "recompute_flops")
    row = {"budget": b, "midpoint": b in mids, "auto_remat": got, "planning_seconds": planning,
           "best_preset": ref}
    compared.append(row)
    say(f"  budget {b / MIB:7.2f} MiB: auto_remat saved {got['saved_bytes'] / MIB:7.2f} MiB, "
        f"recompute {got['recompute_flops'] / 1e9:6.3f} GFLOP | best preset/subset "
        f"{(ref or {}).get('plan', '-'):40s} {(ref or {}).get('recompute_flops', 0) / 1e9:6.3f}")
  return {"presets_and_subsets": rows, "frontier": front, "compared": compared,
          "least_bytes": planner.least_bytes, "seconds": time.perf_counter() - t0}


def _torch_python() -> str:
  """The Python of ``.venv-torch`` (made here with pip where missing)."""
  venv = ROOT / ".venv-torch"
  py = venv / "bin" / "python"
  if not py.exists():
    base = shutil.which("python3.11")
    if base is None:
      raise SystemExit("auto_remat_frontier --torch: needs python3.11 (PyTorch 2.13's CPU "
                       "wheel on this machine is for 3.11).")
    print(f"making {venv} (pip install torch==2.13.0 numpy)", file=sys.stderr, flush=True)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0", "numpy"],
                   check=True)
  return str(py)


def against_torch(loss_of: Any, args: tuple[Any, ...], say: Any) -> dict[str, Any]:
  params, tokens, targets = args
  base = loss_of(False)
  loss = float(base(*args))
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  with tempfile.TemporaryDirectory() as tmp:
    np.savez(os.path.join(tmp, "w.npz"), **flat)
    np.savez(os.path.join(tmp, "io.npz"), tokens=np.asarray(tokens), targets=np.asarray(targets))
    out = os.path.join(tmp, "torch.json")
    cmd = [_torch_python(), str(ROOT / "experiments" / "torch_budget.py"), "--weights",
           os.path.join(tmp, "w.npz"), "--inputs", os.path.join(tmp, "io.npz"), "--out", out,
           "--loss", repr(loss), "--layers", str(SPEC["num_layers"]),
           "--heads", str(SPEC["num_heads"])]
    subprocess.run(cmd, check=True)
    torch_res = json.loads(Path(out).read_text())
  planner = rk.planner.Planner(base, args, cost="matmul_flops")
  whole = None  # one segment: the whole forward recomputed at once, as PyTorch may do
  rows = []
  for r in torch_res["rows"]:
    b = int(r["saved_bytes"])
    row: dict[str, Any] = {"torch": r, "segments": "layers"}
    if b < planner.least_bytes:
      whole = whole or rk.planner.Planner(base, args, cost="matmul_flops", segments=1)
      plan = whole.plan(b, "saved", compile=False)
      row["segments"] = "one"
      row["note"] = (f"below the per-layer plan's least ({planner.least_bytes:,} bytes: each "
                     "layer's input); planned with segments=1, the whole forward recomputed "
                     "at once in the backward, as PyTorch does at this budget")
    else:
      plan = planner.plan(b, "saved", compile=False)
    row["auto_remat"] = measure(plan.fn, *args)
    rows.append(row)
    a = row["auto_remat"]
    say(f"  torch budget {r['budget']:4.2f}: saved {b / MIB:7.2f} MiB, matmul recompute "
        f"{r['recompute_matmul_flops'] / 1e9:6.3f} GFLOP | auto_remat ({row['segments']} "
        f"segment{'s' if row['segments'] == 'layers' else ''}) saved "
        f"{a['saved_bytes'] / MIB:7.2f} MiB, {a['recompute_matmul_flops'] / 1e9:6.3f} GFLOP")
  return {"torch_version": torch_res["torch"], "loss_torch": torch_res["loss_torch"],
          "loss_jax": loss, "rows": rows, "least_bytes": planner.least_bytes}


def plot(result: dict[str, Any], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  pres = result["presets"]
  pts = pres["presets_and_subsets"]
  ax.scatter([p["saved_bytes"] / MIB for p in pts], [p["recompute_flops"] / 1e9 for p in pts],
             s=10, c="#bbbbbb", label="presets and tag subsets")
  fr = pres["frontier"]
  ax.step([p["saved_bytes"] / MIB for p in fr], [p["recompute_flops"] / 1e9 for p in fr],
          where="post", c="#888888", label="their frontier")
  au = sorted((c["auto_remat"] for c in pres["compared"]), key=lambda a: a["saved_bytes"])
  ax.plot([a["saved_bytes"] / MIB for a in au], [a["recompute_flops"] / 1e9 for a in au],
          "o-", c="#d62728", label="auto_remat (every FLOP)")
  if result.get("torch"):
    tr = result["torch"]["rows"]
    ax.plot([r["torch"]["saved_bytes"] / MIB for r in tr],
            [r["torch"]["recompute_matmul_flops"] / 1e9 for r in tr], "s--", c="#1f77b4",
            label="PyTorch activation_memory_budget (matmul)")
    ax.plot([r["auto_remat"]["saved_bytes"] / MIB for r in tr],
            [r["auto_remat"]["recompute_matmul_flops"] / 1e9 for r in tr], "^:", c="#2ca02c",
            label="auto_remat at PyTorch's bytes (matmul)")
  ax.set_xlabel("saved for the backward (MiB)")
  ax.set_ylabel("recomputed (GFLOP)")
  ax.set_title(f"Reference GPT (4 x d256, seq 256, batch 4, fp32), JAX {jax.__version__}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summary(result: dict[str, Any]) -> list[str]:
  lines = []
  cmp = result["presets"]["compared"]
  worse = [c for c in cmp if c["best_preset"] and c["auto_remat"]["recompute_flops"]
           > c["best_preset"]["recompute_flops"]]
  mids = [c for c in cmp if c["midpoint"] and c["best_preset"]]
  strictly = [c for c in mids if c["auto_remat"]["recompute_flops"]
              < c["best_preset"]["recompute_flops"]]
  lines.append(f"presets/subsets: {len(result['presets']['presets_and_subsets'])} plans, "
               f"frontier of {len(result['presets']['frontier'])}; auto_remat at "
               f"{len(cmp)} budgets: more recompute than the best fitting preset at "
               f"{len(worse)}, strictly less at {len(strictly)} of {len(mids)} midpoints")
  for c in cmp:
    ref = c["best_preset"]
    if ref and ref["recompute_flops"]:
      r = c["auto_remat"]["recompute_flops"] / ref["recompute_flops"]
      lines.append(f"  {c['budget'] / MIB:7.2f} MiB{' (mid)' if c['midpoint'] else '      '}: "
                   f"auto_remat / best preset recompute = {r:.3f}")
  if result.get("torch"):
    t = result["torch"]
    lines.append(f"PyTorch {t['torch_version']}: loss {t['loss_torch']:.6f} vs JAX "
                 f"{t['loss_jax']:.6f}")
    worse = 0
    for r in t["rows"]:
      a, tr = r["auto_remat"], r["torch"]
      worse += a["recompute_matmul_flops"] > tr["recompute_matmul_flops"]
      ratio = (a["recompute_matmul_flops"] / tr["recompute_matmul_flops"]
               if tr["recompute_matmul_flops"] else float("nan"))
      lines.append(f"  budget {tr['budget']:4.2f} ({tr['saved_bytes'] / MIB:7.2f} MiB): "
                   f"matmul recompute torch {tr['recompute_matmul_flops'] / 1e9:6.3f} "
                   f"GFLOP, auto_remat {a['recompute_matmul_flops'] / 1e9:6.3f} "
                   f"(ratio {ratio:.3f}) at {a['saved_bytes'] / MIB:7.2f} MiB"
                   + ("" if r["segments"] == "layers" else " [one segment]"))
    lines.append(f"  auto_remat recomputes more matmul FLOPs than PyTorch at {worse} of "
                 f"{len(t['rows'])} of PyTorch's budgets")
  return lines


def markdown(result: dict[str, Any]) -> str:
  """The two comparison tables, as the docs quote them."""
  out = ["| saved (MiB) | best preset or tag subset (GFLOP) | auto_remat (GFLOP) | ratio |",
         "|---|---|---|---|"]
  for c in result["presets"]["compared"]:
    ref, a = c["best_preset"], c["auto_remat"]
    if not ref:
      continue
    ratio = (f"{a['recompute_flops'] / ref['recompute_flops']:.2f}" if ref["recompute_flops"]
             else "-")
    out.append(f"| {c['budget'] / MIB:.2f}{' (midpoint)' if c['midpoint'] else ''} | "
               f"{ref['recompute_flops'] / 1e9:.3f} (`{ref['plan']}`) | "
               f"{a['recompute_flops'] / 1e9:.3f} | {ratio} |")
  if result.get("torch"):
    out += ["", "| PyTorch ratio | saved (MiB) | PyTorch matmul recompute (GFLOP) | "
            "auto_remat (GFLOP) |", "|---|---|---|---|"]
    for r in result["torch"]["rows"]:
      t, a = r["torch"], r["auto_remat"]
      out.append(f"| {t['budget']:.2f} | {t['saved_bytes'] / MIB:.2f} | "
                 f"{t['recompute_matmul_flops'] / 1e9:.3f} | "
                 f"{a['recompute_matmul_flops'] / 1e9:.3f}"
                 f"{'' if r['segments'] == 'layers' else ' (one segment)'} |")
  return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="presets only, no tag subsets")
  ap.add_argument("--torch", action="store_true", help="also compare with PyTorch 2.13")
  ap.add_argument("--out", type=Path, default=RESULTS / "auto_remat_frontier.json")
  a = ap.parse_args(argv)
  say = lambda msg: print(msg, flush=True)
  loss_of, params, tokens, targets = setup()
  args = (params, tokens, targets)
  result: dict[str, Any] = {"jax": jax.__version__, "spec": SPEC}
  t0 = time.perf_counter()
  try:
    say("presets and tag subsets, measured:")
    result["presets"] = against_presets(loss_of, args, a.quick, say)
    result["frontier_points"] = auto_remat_frontier(loss_of(False), *args, points=10)
    if a.torch:
      say("PyTorch activation_memory_budget:")
      result["torch"] = against_torch(loss_of, args, say)
  except KeyboardInterrupt:
    print("interrupted: nothing written", file=sys.stderr)
    return 130
  result["seconds"] = time.perf_counter() - t0
  result["summary"] = summary(result)
  a.out.parent.mkdir(parents=True, exist_ok=True)
  a.out.write_text(json.dumps(result, indent=1, default=str))
  png = a.out.with_suffix(".png")
  plot(result, png)
  a.out.with_suffix(".md").write_text(markdown(result))
  print("\n".join(result["summary"]))
  print(f"wrote {a.out} and {png} ({result['seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
