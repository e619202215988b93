"""Remat strategies side by side: memory, FLOPs, step time, gradient check.

Run with ``make bench`` (or ``python -m experiments.bench``). On CPU the
default size finishes in about a minute on 2 cores; ``--size large`` is the
default when a GPU or TPU is found. Results go to
``experiments/results/<backend>-<device>.json``.

Each strategy is applied to the same model (a stack of MLP blocks with
dropout-free residual updates, tagged with ``checkpoint_name``) laid out as a
``lax.scan`` over layers, the layout where CPU XLA keeps remat's savings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import remat_kit as rk
from remat_kit.report import activation_bytes, compiled_memory, count_flops, live_peak_bytes

RESULTS = Path(__file__).parent / "results"

SIZES = {
    # layers, batch, width, hidden
    "small": (16, 512, 256, 1024),
    "large": (48, 1024, 2048, 8192),
}


def block(h: jax.Array, p: dict[str, jax.Array]) -> tuple[jax.Array, None]:
  """One pre-norm MLP block with a residual; its activations are tagged."""
  x = h - h.mean(-1, keepdims=True)
  x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6)
  up = rk.checkpoint_name(x @ p["w_in"], "mlp_in")
  act = rk.checkpoint_name(jax.nn.gelu(up), "mlp_hidden")
  out = rk.checkpoint_name(act @ p["w_out"], "mlp_out")
  return h + out, None


def init(size: str, key: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
  layers, batch, width, hidden = SIZES[size]
  k1, k2, k3 = jax.random.split(key, 3)
  params = {
      "w_in": jax.random.normal(k1, (layers, width, hidden)) / np.sqrt(width),
      "w_out": jax.random.normal(k2, (layers, hidden, width)) / np.sqrt(hidden),
  }
  return params, jax.random.normal(k3, (batch, width))


# Strategy name -> (policy, groups). groups=None: flat scan.
STRATEGIES: dict[str, tuple[Any, Any]] = {
    "no remat": (False, None),
    "full": ("full", None),
    "save_dots": ("save_dots", None),
    "minimal (dots, no batch)": ("minimal", None),
    "save mlp_hidden": ("save:mlp_hidden", None),
    "save all but mlp_hidden": ("except:mlp_hidden", None),
    "save mlp_in | mlp_out": ("save:mlp_in,mlp_out", None),
    "nested scan (2 levels)": ("full", 2),
    "nested scan (3 levels)": ("full", 3),
}


def make_loss(policy: Any, groups: Any) -> Callable[..., jax.Array]:
  def loss(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    if policy is False and groups is None:
      h, _ = jax.lax.scan(block, x, params)
    else:
      h, _ = rk.remat_scan(block, x, params, policy=policy, groups=groups)
    return jnp.mean(h * h)

  return loss


@dataclass
class Row:
  strategy: str
  temp_bytes: int | None
  peak_bytes: int | None
  activation_bytes: int | None
  flops: int | None
  recompute_overhead_pct: float | None
  step_ms_median: float | None
  step_ms_spread: float | None
  live_peak_bytes: int | None
  grads_match: bool | None
  error: str | None = None


def _time_step(step: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> list[float]:
  jax.block_until_ready(step(*args))  # compile + warm-up
  jax.block_until_ready(step(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return times


def run(size: str, repeats: int, only: list[str] | None) -> dict[str, Any]:
  params, x = init(size, jax.random.key(0))
  ref_loss = make_loss(False, None)
  ref_grads = jax.jit(jax.grad(ref_loss))(params, x)
  base_flops = count_flops(jax.grad(ref_loss), params, x)
  rows: list[Row] = []
  names = [s for s in STRATEGIES if not only or s in only]
  progress = _progress(len(names))
  for name in names:
    progress(name)
    policy, groups = STRATEGIES[name]
    loss = make_loss(policy, groups)
    grad = jax.grad(loss)
    try:
      mem = compiled_memory(grad, params, x)
      flops = count_flops(grad, params, x)
      step = jax.jit(grad)
      times = _time_step(step, (params, x), repeats)
      g = step(params, x)
      match = all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in
                  zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_grads)))
      rows.append(Row(
          strategy=name,
          temp_bytes=mem["temp_size"],
          peak_bytes=mem["peak_bytes"],
          activation_bytes=activation_bytes(loss, params, x),
          flops=flops,
          recompute_overhead_pct=100.0 * (flops - base_flops) / base_flops,
          step_ms_median=statistics.median(times),
          step_ms_spread=(max(times) - min(times)) / 2,
          live_peak_bytes=live_peak_bytes(),
          grads_match=match,
      ))
    except Exception as e:  # noqa: BLE001 - one failing strategy must not end the run
      kind = "OOM" if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e) else "error"
      rows.append(Row(name, None, None, None, None, None, None, None, None, None,
                      error=f"{kind}: {str(e).splitlines()[0][:200]}"))
  layers, batch, width, hidden = SIZES[size]
  dev = jax.devices()[0]
  return {
      "device": getattr(dev, "device_kind", str(dev)),
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "python": platform.python_version(),
      "size": size,
      "model": {"layers": layers, "batch": batch, "width": width, "hidden": hidden},
      "live_peak_note": ("live peak from memory_stats()" if live_peak_bytes() is not None
                         else "live peak not available on this backend (CPU): compiler numbers only"),
      "rows": [r.__dict__ for r in rows],
  }


def _progress(total: int) -> Callable[[str], None]:
  count = [0]

  def tick(name: str) -> None:
    count[0] += 1
    print(f"[{count[0]}/{total}] {name}", file=sys.stderr, flush=True)

  return tick


def _mib(b: int | None) -> str:
  return "-" if b is None else f"{b / 2**20:,.1f}"


def print_table(result: dict[str, Any]) -> None:
  rows = result["rows"]
  base = next((r for r in rows if r["strategy"] == "no remat" and r["temp_bytes"]), None)
  head = (f"{'strategy':28s} {'temp MiB':>9s} {'peak MiB':>9s} {'act MiB':>8s} "
          f"{'x temp':>7s} {'+FLOPs%':>8s} {'step ms':>14s} {'grads':>6s}")
  print(f"\nremat_kit bench: {result['device']} ({result['backend']}), jax {result['jax']}, "
        f"size={result['size']} {result['model']}")
  print(result["live_peak_note"])
  print(head)
  print("-" * len(head))
  for r in rows:
    if r["error"]:
      print(f"{r['strategy']:28s} {r['error']}")
      continue
    ratio = f"{r['temp_bytes'] / base['temp_bytes']:.2f}" if base else "-"
    step = f"{r['step_ms_median']:.2f}±{r['step_ms_spread']:.2f}"
    print(f"{r['strategy']:28s} {_mib(r['temp_bytes']):>9s} {_mib(r['peak_bytes']):>9s} "
          f"{_mib(r['activation_bytes']):>8s} {ratio:>7s} {r['recompute_overhead_pct']:>8.1f} "
          f"{step:>14s} {'ok' if r['grads_match'] else 'DIFF':>6s}")


def write_atomic(path: Path, data: dict[str, Any]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  accel = jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")
  ap.add_argument("--size", choices=sorted(SIZES), default="large" if accel else "small")
  ap.add_argument("--repeats", type=int, default=10, help="timed steps after warm-up")
  ap.add_argument("--only", nargs="*", help=f"strategies to run, from {list(STRATEGIES)}")
  ap.add_argument("--out", type=Path, default=None, help="results JSON path")
  args = ap.parse_args(argv)
  if args.repeats < 1:
    ap.error(f"--repeats must be >= 1, got {args.repeats}")
  unknown = [s for s in args.only or [] if s not in STRATEGIES]
  if unknown:
    ap.error(f"--only: unknown strategies {unknown}; choose from {list(STRATEGIES)}")
  result = run(args.size, args.repeats, args.only)
  print_table(result)
  dev = result["device"].lower().replace(" ", "-")
  out = args.out or RESULTS / f"{result['backend']}-{dev}.json"
  write_atomic(out, result)
  print(f"\nwrote {out}")
  return 0 if all(r["grads_match"] for r in result["rows"] if not r["error"]) else 1


if __name__ == "__main__":
  raise SystemExit(main())
