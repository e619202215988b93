"""Pipeline parallelism with remat, planned deviceless: per-stage memory and step time.

The blocks of a GPT (``remat_kit.models.GPTBlock``, bf16 activations, fp32
parameters, AdamW; embedding and LM head left out) trained through
``rk.pipeline`` on a TPU topology that is not here, compiled for every chip:

* ``tpu:v5e:2x2``: 4 stages;
* ``tpu:v5e:4x4``: 4 stages x 4-way FSDP (each stage's parameters, optimizer
  state and the batch sharded over the 4 chips of its row).

For each schedule x policy x microbatch count it compiles the training step
at 1 and 2 examples per chip per microbatch, prints the per-chip (= per-stage)
peak, the estimated step time (the library's roofline, bubble included) and
the largest microbatch size per chip under the chip's 16 GiB, and compares
with plain FSDP + remat over all chips of the same topology (no pipeline).

  python -m experiments.pipeline_plan [--layers 8] [--d-model 1024] [--seq 1024]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # deviceless: the CUDA plugin must not probe

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import remat_kit as rk  # noqa: E402
from experiments._io import write_json  # noqa: E402
from remat_kit import targets  # noqa: E402
from remat_kit.pipelining import largest_microbatch  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GIB = 2**30
# (target, fsdp, schedule, layers_per_stage (circular rounds), microbatches, policy)
GRID = [
    ("tpu:v5e:2x2", 1, "gpipe", 1, 4, None),
    ("tpu:v5e:2x2", 1, "gpipe", 1, 16, None),
    ("tpu:v5e:2x2", 1, "gpipe", 1, 16, "full"),
    ("tpu:v5e:2x2", 1, "gpipe", 1, 16, "save_dots_no_batch"),
    ("tpu:v5e:2x2", 1, "circular", 2, 16, "full"),
    ("tpu:v5e:4x4", 4, "gpipe", 1, 16, "full"),
    ("tpu:v5e:4x4", 4, "circular", 2, 16, "full"),
]
BASELINES = [("tpu:v5e:2x2", "full"), ("tpu:v5e:4x4", "full")]


def gpt_blocks(d_model: int, heads: int, seq: int) -> tuple[Any, Any, jax.ShapeDtypeStruct]:
  """One GPT block (bf16), its parameters' shapes and one example's shape."""
  block = rk.models.GPTBlock(d_model=d_model, num_heads=heads, dropout_rate=0.0,
                             dtype=jnp.bfloat16)
  x = jnp.ones((1, 8, d_model), jnp.bfloat16)
  one = jax.eval_shape(lambda: block.init(jax.random.key(0), x, train=False)["params"])
  return block, one, jax.ShapeDtypeStruct((seq, d_model), jnp.bfloat16)


def _stacked(one: Any, lead: tuple[int, ...]) -> Any:
  return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(lead + s.shape, s.dtype), one)


def _stage_fn(block: Any, policy: Any) -> Any:
  """A stage: its layers scanned with rk.remat_scan, ``policy`` inside each layer."""
  def stage_fn(p: Any, h: jax.Array) -> jax.Array:
    body = lambda c, q: (block.apply({"params": q}, c, train=False), None)
    return rk.remat_scan(body, h, p, policy=policy)[0]
  return stage_fn


def pipeline_row(target: str, fsdp: int, schedule: str, rounds: int, microbatches: int,
                 policy: Any, *, layers: int, d_model: int, heads: int,
                 seq: int, verify: bool = False) -> dict[str, Any]:
  """The largest microbatch per chip for GPT blocks pipelined over ``target``'s chips:
  ``devices / fsdp`` stages, each stage's layers sharded ``fsdp`` ways."""
  block, one, example = gpt_blocks(d_model, heads, seq)
  stages = len(targets.parse_target(target).devices()) // fsdp
  if layers % (stages * rounds):
    raise ValueError(f"`layers`={layers} must be a multiple of stages x rounds = "
                     f"{stages} x {rounds}.")
  per_piece = layers // (stages * rounds)
  lead = (stages, per_piece) if schedule == "gpipe" else (stages, rounds, per_piece)
  # circular: stage_params[s, r] holds the `per_piece` layers of piece r * S + s.
  stage_fn = _stage_fn(block, policy if policy else False)
  best = largest_microbatch(stage_fn, _stacked(one, lead), example, target=target,
                            microbatches=microbatches, fsdp=fsdp, schedule=schedule,
                            layers_per_stage=rounds if schedule == "circular" else None,
                            optimizer=optax.adamw(1e-4), verify=verify)
  r1 = best["rows"][0]
  return {"mode": "pipeline", "target": target, "stages": stages, "fsdp": fsdp,
          "schedule": schedule, "layers_per_stage": rounds, "microbatches": microbatches,
          "policy": policy or "none", "bubble_fraction": r1["bubble_fraction"],
          "peak_bytes_at_1": r1.get("peak_bytes"),
          "estimated_seconds_at_1": r1.get("estimated_seconds"),
          "largest_microbatch_per_chip": best["microbatch_size"],
          "examples_per_chip_per_step": best["microbatch_size"] * microbatches / stages,
          "fixed_bytes": best.get("fixed_bytes"),
          "bytes_per_example": best.get("bytes_per_example"),
          "compile_s": [r.get("compile_s") for r in best["rows"]],
          **_verified(best)}


def _verified(best: dict[str, Any]) -> dict[str, Any]:
  if "verified" not in best:
    return {}
  row = best["verified_row"]
  return {"predicted_microbatch_per_chip": best["predicted_size"],
          "refused_at": best.get("refused_at"),
          "verified": best["verified"], "verified_peak_bytes": row.get("peak_bytes"),
          "verified_estimated_seconds": row.get("estimated_seconds")}


def fsdp_row(target: str, policy: str, a: argparse.Namespace) -> dict[str, Any]:
  """No pipeline: all layers scanned on every chip, everything sharded over all chips
  (rk.pipeline with one stage, an n x 1 mesh, and one microbatch is plain FSDP)."""
  block, one, example = gpt_blocks(a.d_model, a.heads, a.seq)
  n = len(targets.parse_target(target).devices())
  best = largest_microbatch(_stage_fn(block, policy), _stacked(one, (1, a.layers)), example,
                            target=target, microbatches=1, fsdp=n,
                            optimizer=optax.adamw(1e-4), verify=a.verify)
  r1 = best["rows"][0]
  return {"mode": "fsdp", "target": target, "stages": 1, "fsdp": n, "schedule": "-",
          "layers_per_stage": 1, "microbatches": 1, "policy": policy, "bubble_fraction": 0.0,
          "peak_bytes_at_1": r1.get("peak_bytes"),
          "estimated_seconds_at_1": r1.get("estimated_seconds"),
          "largest_microbatch_per_chip": best["microbatch_size"],
          "examples_per_chip_per_step": float(best["microbatch_size"]),
          "fixed_bytes": best.get("fixed_bytes"), "bytes_per_example": best.get("bytes_per_example"),
          "compile_s": [r.get("compile_s") for r in best["rows"]], **_verified(best)}


def _checked(r: dict[str, Any]) -> str:
  """The compile at the chosen size: its peak, or why the line's size was not kept."""
  if "verified" not in r:
    return "predicted"
  if not r["verified"]:
    return "refused"
  return f"{r['verified_peak_bytes'] / GIB:.2f} GiB"


def table(rows: list[dict[str, Any]]) -> str:
  head = (f"{'target':12s} {'mode':8s} {'S x fsdp':8s} {'schedule':9s} {'M':>3s} "
          f"{'policy':19s} {'bubble':>6s} {'GiB@1':>6s} {'ms@1':>7s} {'fixed GiB':>9s} "
          f"{'GiB/ex':>7s} {'max mb':>6s} {'ex/chip':>7s} {'checked':>13s}")
  out = [head, "-" * len(head)]
  for r in rows:
    sched = r["schedule"] + (f"x{r['layers_per_stage']}" if r["schedule"] == "circular" else "")
    gib = lambda v: f"{v / GIB:.2f}" if v is not None else "-"
    ms = r["estimated_seconds_at_1"]
    out.append(f"{r['target']:12s} {r['mode']:8s} {r['stages']}x{r['fsdp']:<6d} {sched:9s} "
               f"{r['microbatches']:>3d} {r['policy']:19s} {r['bubble_fraction']:>6.3f} "
               f"{gib(r['peak_bytes_at_1']):>6s} {(ms or 0) * 1e3:>7.1f} "
               f"{gib(r['fixed_bytes']):>9s} {gib(r['bytes_per_example']):>7s} "
               f"{r['largest_microbatch_per_chip']:>6d} {r['examples_per_chip_per_step']:>7.1f} "
               f"{_checked(r):>13s}")
  return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--d-model", type=int, default=1024)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--quick", action="store_true", help="the first row only")
  ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                  help="compile each row at its predicted microbatch size (stepping down "
                       "until it fits) instead of trusting the line through 1 and 2")
  ap.add_argument("--out", type=Path, default=RESULTS / "pipeline_plan-tpu-v5e.json")
  a = ap.parse_args(argv)
  t0 = time.perf_counter()
  rows = []
  for cfg in GRID[:1] if a.quick else GRID:
    print("pipeline", cfg, file=sys.stderr, flush=True)
    rows.append(pipeline_row(*cfg, layers=a.layers, d_model=a.d_model, heads=a.heads,
                             seq=a.seq, verify=a.verify))
  for target, policy in [] if a.quick else BASELINES:
    print("fsdp", target, policy, file=sys.stderr, flush=True)
    rows.append(fsdp_row(target, policy, a))
  model = (f"GPT blocks: {a.layers} layers, d_model {a.d_model}, {a.heads} heads, seq "
           f"{a.seq}; bf16 activations, fp32 params, AdamW (embedding and head left out)")
  text = table(rows)
  result = {"jax": jax.__version__, "model": model, "targets": sorted({r["target"] for r in rows}),
            "source": "deviceless TPU compile of the whole training step, per chip (= per "
                      "stage); step time: remat_kit roofline (FLOPs/peak + HBM bytes/bandwidth, "
                      "bubble included, ppermute over ICI not)",
            "seconds": round(time.perf_counter() - t0, 1), "rows": rows, "table": text}
  legend = ("GiB@1, ms@1: per-chip peak and estimated step at 1 example per chip per "
            "microbatch; max mb: largest microbatch per chip under 16 GiB (the line through 1 "
            "and 2, then compiled at that size and stepped down until it fits); ex/chip: the "
            "global batch per chip at max mb; checked: the compiled per-chip peak there")
  print(f"\n{model}\nJAX {jax.__version__}; {legend}\n")
  print(text)
  write_json(a.out, result, say=False)
  md = a.out.with_suffix(".md")
  md.write_text(f"# Pipeline plan (deviceless)\n\n{model}. JAX {jax.__version__}, targets "
                f"{', '.join(result['targets'])}. {legend}.\n\n```text\n{text}\n```\n")
  print(f"wrote {a.out} and {md}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
