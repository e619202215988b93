"""The memory timeline of the reference GPT on an H100, compiled without the device.

    python -m experiments.timeline_demo                 # gpu:h100
    python -m experiments.timeline_demo --target tpu:v5e:2x2

Writes ``experiments/results/timeline_gpt_<target>.png`` and ``.html``: the bytes
live at every point of the compiled gradient's schedule, by kind, for no remat, full
remat and ``save_dots``, on one scale, with each peak (``rk.explain_peak``'s) marked.
The hump of saved residuals in the forward pass is what the policies flatten.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import remat_kit as rk
from remat_kit import models

RESULTS = Path(__file__).parent / "results"
POLICIES = {"none": False, "full": True, "save_dots": "save_dots"}
# Small enough to compile in seconds per policy on two CPU cores.
CONFIG = dict(vocab_size=256, max_len=256, d_model=256, num_heads=4, num_layers=6)
BATCH, SEQ = 8, 256


def gpt_case() -> tuple[dict[str, object], tuple[object, ...]]:
  """``({label: loss}, (params, tokens))`` for the GPT with each policy (also the
  command line's ``python -m remat_kit timeline experiments/timeline_demo.py:gpt_case``)."""
  tokens = jnp.zeros((BATCH, SEQ), jnp.int32)
  params = jax.eval_shape(lambda: models.GPT(**CONFIG, policy=False).init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, tokens)["params"])

  def loss_for(policy: object):
    model = models.GPT(**CONFIG, policy=policy)

    def loss(p, tokens):
      logits = model.apply({"params": p}, tokens, rngs={"dropout": jax.random.key(2)})
      return jnp.mean(logits ** 2)
    return loss

  return {k: loss_for(v) for k, v in POLICIES.items()}, (params, tokens)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--target", default="gpu:h100")
  a = ap.parse_args()
  fns, args = gpt_case()
  t0 = time.time()
  tl = rk.memory_timeline(fns, *args, target=a.target)
  chip = a.target.split(":")[1] if ":" in a.target else a.target  # gpu:h100 -> h100
  stem = RESULTS / f"timeline_gpt_{chip}"
  RESULTS.mkdir(exist_ok=True)
  tl.to_png(f"{stem}.png")
  tl.to_html(f"{stem}.html", title=f"GPT ({CONFIG['num_layers']} layers, d_model "
             f"{CONFIG['d_model']}, batch {BATCH}x{SEQ}) on {tl.target}")
  print(f"jax {jax.__version__}, target {tl.target}, {time.time() - t0:.0f} s")
  for label, t in tl.timelines.items():
    at = {k: v[t.peak_point] for k, v in t.by_kind.items()}
    print(f"{label:10s} peak {rk.report.table.format_bytes(t.peak_bytes):>10s} "
          f"({t.peak_bytes:,} B), saved residuals at the peak "
          f"{rk.report.table.format_bytes(at.get('activation', 0))}")
  print(f"wrote {stem}.png and {stem}.html")


if __name__ == "__main__":
  main()
