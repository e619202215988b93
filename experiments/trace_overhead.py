"""Tracing overhead of remat_kit against plain JAX, on a 24-layer Python-loop stack.

remat_kit adds trace-time work on top of ``jax.checkpoint`` (config policies,
the check that each policy name is tagged, the jax_remat3 translation). The
HLO is the same, so the difference is Python time alone. This prints, for
``full`` and ``save:<name>``, the median time to trace the gradient of the
stack (``jax.make_jaxpr(jax.grad(loss))``) through each wrapper, and the
ratio remat_kit / JAX. Target: at most 1.2.

  python -m experiments.trace_overhead [--layers 24] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import remat_kit as rk
from remat_kit import testing as rkt
from remat_kit.flax import remat_policy


def layer(w: jax.Array, x: jax.Array) -> jax.Array:
  h = rk.checkpoint_name(x @ w, "pre")
  return jnp.sin(h) @ w.T + x


def _loss(step: Callable[..., Any], layers: int) -> Callable[..., Any]:
  def loss(ws: list[jax.Array], x: jax.Array) -> jax.Array:
    for w in ws[:layers]:
      x = step(w, x)
    return jnp.sum(x)
  return loss


class Block(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = rk.checkpoint_name(nn.Dense(x.shape[-1], use_bias=False)(x), "pre")
    return nn.Dense(x.shape[-1], use_bias=False)(jnp.sin(h)) + x


def _stack(block: type, layers: int) -> type:
  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
      for i in range(layers):
        x = block(name=f"b{i}")(x)
      return x
  return Stack


def _paired(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[float, float]:
  """Median times of ``a`` and ``b``, interleaved (a, b, a, b, ...) so that load on a
  shared machine falls on both alike."""
  a(), b()  # warm caches that both sides share (primitive rules, imports)
  ta, tb = [], []
  for _ in range(repeats):
    for fn, out in ((a, ta), (b, tb)):
      t = time.perf_counter()
      fn()
      out.append(time.perf_counter() - t)
  return statistics.median(ta), statistics.median(tb)


def main(argv: list[str] | None = None) -> dict[str, float]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", type=int, default=24)
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--width", type=int, default=64)
  ap.add_argument("--remat3", choices=("on", "off", "both"), default="both",
                  help="which JAX remat implementation to trace under (default: both)")
  a = ap.parse_args(argv)
  modes = {"on": [True], "off": [False], "both": [False, True]}[a.remat3]
  if "remat3" not in rkt.implementations():
    modes = [False]
  ratios = {}
  for on in modes:
    with rkt.remat_implementation("remat3" if on else "classic"):
      ratios.update({f"{k} (remat3={on})": v for k, v in _measure(a).items()})
  worst = max(ratios.values())
  print(f"worst ratio {worst:.2f} (target <= 1.2): {'ok' if worst <= 1.2 else 'over'}")
  return ratios


def _measure(a: argparse.Namespace) -> dict[str, float]:
  d, n = a.width, a.layers
  ws = [jnp.eye(d) * (1 + i / n) for i in range(n)]
  x = jnp.ones((8, d))
  jax_pol = {"full": None, "save:pre": jax.checkpoint_policies.save_only_these_names("pre")}
  ratios = {}
  print(f"trace time of grad over a {n}-layer Python loop, median of {a.repeats} "
        f"({jax.__version__}, remat3={bool(getattr(jax.config, 'jax_remat3', False))})")
  for label, pol in jax_pol.items():
    # A fresh wrapper per trace, as a user's model code makes one per call of the step.
    def trace_jax(pol: Any = pol) -> Any:
      ck = jax.checkpoint(layer, policy=pol)
      return jax.make_jaxpr(jax.grad(_loss(ck, n)))(ws, x)

    def trace_rk(label: str = label) -> Any:
      ck = rk.remat(layer, policy=label)
      return jax.make_jaxpr(jax.grad(_loss(ck, n)))(ws, x)

    tj, tr = _paired(trace_jax, trace_rk, a.repeats)
    ratios[f"remat {label}"] = tr / tj
    print(f"  rk.remat       {label:9s} jax {tj * 1e3:7.1f} ms  rk {tr * 1e3:7.1f} ms  "
          f"rk/jax {tr / tj:.2f}")

  for label, pol in jax_pol.items():
    plain = _stack(nn.remat(Block, policy=pol), n)()
    deco = _stack(remat_policy(label)(Block), n)()
    params = plain.init(jax.random.key(0), x)
    params_d = deco.init(jax.random.key(0), x)

    def trace_nn(m: Any = plain, p: Any = params) -> Any:
      return jax.make_jaxpr(jax.grad(lambda p: jnp.sum(m.apply(p, x))))(p)

    def trace_deco(m: Any = deco, p: Any = params_d) -> Any:
      return jax.make_jaxpr(jax.grad(lambda p: jnp.sum(m.apply(p, x))))(p)

    tj, tr = _paired(trace_nn, trace_deco, a.repeats)
    ratios[f"remat_policy {label}"] = tr / tj
    print(f"  remat_policy   {label:9s} nn  {tj * 1e3:7.1f} ms  rk {tr * 1e3:7.1f} ms  "
          f"rk/nn.remat {tr / tj:.2f}")
  return ratios


if __name__ == "__main__":
  main()
