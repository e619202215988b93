"""What the readouts cost over the compile they read: one run, interleaved.

For each target (the local CPU, a deviceless ``tpu:v5e:2x2`` and ``gpu:h100``) this
times, on an lm1b-style Flax model written without remat_kit in mind
(:class:`remat_kit.models.TransformerLM`, bf16, dropout, ``ShapeDtypeStruct``
inputs), the bare compile of its gradient (``jit(grad(loss)).lower(...).compile()``
for that target) and ``memory_report`` followed by ``explain_peak`` and ``lint`` on
the same function (the compilation cache emptied first; ``lint`` too with
``--lint``: it compiles more, to answer its own questions), alternating ``--rounds``
times, and prints the median ratio of each readout to the bare compile. Target: at
most 1.3x for ``memory_report`` (which includes the one compile the readouts share);
``explain_peak`` after it reuses that compile.

  python -m experiments.readout_cost [--size small|medium|lm1b] [--rounds 2] [--lint]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import remat_kit as rk
from remat_kit import report, targets
from remat_kit.models import TransformerLM

SIZES = {
    "small": (dict(vocab_size=2048, emb_dim=256, num_heads=4, num_layers=4, mlp_dim=1024,
                   max_len=256), 4),
    "medium": (dict(vocab_size=8192, emb_dim=512, num_heads=8, num_layers=6, mlp_dim=2048,
                    max_len=512), 4),
    "lm1b": (dict(vocab_size=32000, emb_dim=1024, num_heads=16, num_layers=12, mlp_dim=4096,
                  max_len=1024), 8),
}
TARGETS = ("cpu", "tpu:v5e:2x2", "gpu:h100")


def lm_loss(size: str, policy: Any = None) -> tuple[Any, Any, Any]:
  """``(loss, params, tokens)`` of a TransformerLM of ``size``, as ShapeDtypeStructs."""
  cfg, batch = SIZES[size]
  lm = TransformerLM(**cfg, dtype=jnp.bfloat16, deterministic=False, remat=policy)
  tokens = jax.ShapeDtypeStruct((batch, cfg["max_len"]), jnp.int32)
  params = jax.eval_shape(
      lambda: lm.init(jax.random.key(0), jnp.ones(tokens.shape, jnp.int32))["params"])

  def loss(params: Any, tokens: jax.Array) -> jax.Array:
    logits = lm.apply({"params": params}, tokens, rngs={"dropout": jax.random.key(1)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

  return loss, params, tokens


def _seconds(fn: Any) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def measure(target: str, size: str, rounds: int, lint: bool = False) -> dict[str, Any]:
  loss, params, tokens = lm_loss(size)
  t = targets.parse_target(target)
  times: dict[str, list[float]] = {"bare compile": [], "memory_report": [],
                                   "explain_peak (after)": []}
  if lint:
    times["lint (after)"] = []
  # One untimed compile first: JAX's own caches (tracing, lowering rules) warm up.
  targets.compile_for(jax.grad(loss), t, params, tokens)
  for _ in range(rounds):
    times["bare compile"].append(
        _seconds(lambda: targets.compile_for(jax.grad(loss), t, params, tokens)))
    report.compiled.clear_cache()
    times["memory_report"].append(_seconds(
        lambda: rk.memory_report(loss, params, tokens, target=target, live=False)))
    times["explain_peak (after)"].append(_seconds(
        lambda: rk.explain_peak(loss, params, tokens, target=target)))
    if lint:  # its own questions compile more (the no-remat reference)
      times["lint (after)"].append(_seconds(
          lambda: rk.lint(loss, params, tokens, target=target)))
  med = {k: statistics.median(v) for k, v in times.items()}
  bare = med["bare compile"]
  return {"target": target, "size": size, "rounds": rounds, "seconds": med,
          "spread": {k: [min(v), max(v)] for k, v in times.items()},
          "ratio": {k: v / bare for k, v in med.items() if k != "bare compile"}}


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", choices=sorted(SIZES), default="small")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--targets", default=",".join(TARGETS))
  ap.add_argument("--lint", action="store_true", help="time lint after the two as well")
  ap.add_argument("--out", default="experiments/results/readout_cost.json")
  a = ap.parse_args(argv)
  rows = []
  for target in a.targets.split(","):
    r = measure(target, a.size, a.rounds, a.lint)
    rows.append(r)
    s = r["seconds"]
    print(f"{target:12s} bare compile {s['bare compile']:6.2f}s | "
          + " | ".join(f"{k} {s[k]:6.2f}s ({r['ratio'][k]:.2f}x)" for k in r["ratio"]),
          flush=True)
  worst = max(r["ratio"]["memory_report"] for r in rows)
  print(f"memory_report / bare compile, worst target: {worst:.2f}x (target: <= 1.3x); "
        f"jax {jax.__version__}, model {a.size}")
  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"jax": jax.__version__, "rows": rows}, indent=1) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
