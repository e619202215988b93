"""The readouts on an lm1b-sized Flax model, against the compiled program they describe.

Flax's lm1b at a realistic size (12 layers, width 1024, sequence 1024, batch 8,
vocabulary 32k, bf16, dropout; :class:`remat_kit.models.TransformerLM`, a Python
loop of blocks with boxed params, passed as ``ShapeDtypeStruct``s), compiled for
``--target`` (default ``gpu:h100``, deviceless). It prints and records:

* without remat: the compiled peak, the activations ``memory_report`` says the
  compiled program carries from the forward to the backward pass, and
  ``explain_peak``'s saved-residual rows at the peak. The first must not exceed the
  peak, and must be within 5% of the last;
* with JAX's ``offload_dot_with_no_batch_dims``: what ``lint`` says
  (``offload-costs-memory`` where the offload plan's device peak is not below
  keeping the same dots on the device).

  python -m experiments.lm1b_readouts [--target gpu:h100] [--size lm1b]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax

import remat_kit as rk
from experiments.readout_cost import SIZES, lm_loss

GIB = 2**30


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--target", default="gpu:h100")
  ap.add_argument("--size", choices=sorted(SIZES), default="lm1b")
  ap.add_argument("--out", default=None)
  a = ap.parse_args(argv)
  out = pathlib.Path(a.out or f"experiments/results/lm1b_readouts-{a.size}-"
                     f"{a.target.replace(':', '-')}.json")
  loss, params, tokens = lm_loss(a.size)
  t0 = time.perf_counter()
  rep = rk.memory_report(loss, params, tokens, target=a.target, live=False, before_xla=True)
  seconds = time.perf_counter() - t0
  peak = rep.peak
  saved_rows = peak.by_kind.get("activation", 0)
  acts = rep.device_activation_bytes
  gap = (acts - saved_rows) / saved_rows if saved_rows else float("nan")
  print(f"{a.size} on {a.target}, no remat (jax {jax.__version__}, memory_report {seconds:.1f}s)")
  print(f"  compiled peak                            {peak.peak_bytes / GIB:8.2f} GiB")
  print(f"  activations carried (memory_report)      {acts / GIB:8.2f} GiB "
        f"({100 * acts / peak.peak_bytes:.0f}% of the peak)")
  print(f"  saved residuals at the peak (explain_peak){saved_rows / GIB:7.2f} GiB "
        f"(memory_report is {100 * gap:+.1f}% from it)")
  before = sum(r.bytes for r in rep.residuals_before_xla if r.kind == "activation")
  print(f"  the jaxpr's residuals, before XLA fuses  {before / GIB:8.2f} GiB "
        f"({100 * before / peak.peak_bytes:.0f}% of the peak: not what runs)")
  ok = acts <= peak.peak_bytes and abs(gap) <= 0.05
  print(f"  at most the peak and within 5%: {'yes' if ok else 'NO'}")
  policy = jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  loss_off, params, tokens = lm_loss(a.size, policy)
  t0 = time.perf_counter()
  warnings = rk.lint(loss_off, params, tokens, target=a.target)
  lint_s = time.perf_counter() - t0
  print(f"offload_dot_with_no_batch_dims: lint ({lint_s:.1f}s)")
  for w in warnings:
    print(f"  {w}")
  fired = any(w.code == "offload-costs-memory" for w in warnings)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({
      "jax": jax.__version__, "target": a.target, "size": a.size,
      "peak_bytes": peak.peak_bytes, "activation_bytes": acts,
      "saved_residual_rows_bytes": saved_rows, "relative_gap": gap,
      "before_xla_activation_bytes": before,
      "by_kind": peak.by_kind, "memory_report_s": seconds,
      "offload_lint": [str(w) for w in warnings], "lint_s": lint_s,
      "reconciles": ok, "offload_lint_fired": fired}, indent=1) + "\n")
  print(f"wrote {out}")
  return 0 if ok and fired else 1


if __name__ == "__main__":
  raise SystemExit(main())
