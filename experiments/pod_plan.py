"""Which remat policy lets this GPT train on that TPU pod? Planned here, run there.

For a GPT (bf16 activations, fp32 parameters, AdamW), this compiles the whole
training step (gradient and optimizer update, parameters and optimizer state
donated) for every chip of a TPU topology, deviceless, sharded two ways:

* ``fsdp``: parameters, gradients and optimizer state sharded over all chips
  (each weight split along its largest divisible axis), the batch too;
* ``dp``: data parallel, everything but the batch replicated on every chip;
* ``pipeline``: the GPT's blocks pipelined with ``rk.pipeline`` (GPipe,
  ``--stages`` stages, ``--microbatches`` microbatches), each stage's layers,
  optimizer state and batch sharded FSDP over the other ``chips / stages``
  chips (see ``experiments/pipeline_plan.py``; embedding and LM head left out,
  as a pipeline puts them on the first and last stage).

For each policy it doubles the per-chip batch until the TPU compiler refuses
the program (it does when the step's memory exceeds the chip's HBM, 16 GiB on
v5e), and reports the largest per-chip batch that fits with its compiled
per-chip peak. The same function with real arrays on a Cloud TPU runs the step.

  python -m experiments.pod_plan [--topologies v5e:4x4 v5e:16x16] [--max-batch 64]
  python -m experiments.pod_plan --modes pipeline --topologies v5e:4x4 --stages 4
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments._io import write_json
from experiments.pipeline_plan import pipeline_row
from remat_kit import models, targets

RESULTS = Path(__file__).parent / "results"
POLICIES = {"no remat": False, "full": True, "save_dots_no_batch": "minimal",
            "save qkv, attn_out": "save_qkv_attn_out", "nested (2 levels)": (True, 2)}


def _model(policy: Any, a: argparse.Namespace) -> Any:
  levels = None
  if isinstance(policy, tuple):
    policy, levels = policy
  return models.GPT(vocab_size=a.vocab, max_len=a.seq, d_model=a.d_model, num_heads=a.heads,
                    num_layers=a.layers, dtype=jnp.bfloat16, policy=policy, levels=levels)


def _fsdp_spec(shape: tuple[int, ...], n: int) -> P:
  """Shard the largest axis that the chip count divides; replicate small leaves."""
  axes = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in axes:
    if shape[i] % n == 0 and shape[i] >= n:
      return P(*[("data" if j == i else None) for j in range(len(shape))])
  return P()


def step_memory(policy: Any, topology: str, batch_per_chip: int, mode: str,
                a: argparse.Namespace) -> dict[str, Any]:
  """The compiled per-chip memory of one training step, or the compiler's OOM."""
  t = targets.parse_target(f"tpu:{topology}")
  mesh = t.mesh(axes=("data",))
  n = mesh.size
  model = _model(policy, a)
  tokens = jax.ShapeDtypeStruct((batch_per_chip * n, a.seq), jnp.int32,
                                sharding=NamedSharding(mesh, P("data")))
  keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  params = jax.eval_shape(lambda tk: _model(False, a).init(keys, tk), tokens)["params"]
  opt = optax.adamw(1e-4)
  opt_state = jax.eval_shape(opt.init, params)

  def spec(x: Any) -> Any:
    p = _fsdp_spec(x.shape, n) if mode == "fsdp" else P()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, p))

  params, opt_state = jax.tree_util.tree_map(spec, (params, opt_state))

  def train_step(params: Any, opt_state: Any, tokens: jax.Array) -> Any:
    def loss(p: Any) -> jax.Array:
      logits = model.apply({"params": p}, tokens, rngs={"dropout": jax.random.key(2)})
      labels = jnp.roll(tokens, -1, axis=-1)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  row: dict[str, Any] = {"topology": topology, "chips": n, "mode": mode,
                         "batch_per_chip": batch_per_chip}
  t0 = time.perf_counter()
  try:
    c = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, tokens).compile()
  except Exception as e:  # noqa: BLE001 - the compiler's OOM is an answer
    m = re.search(r"exceeds available HBM \(([\d.]+)G", str(e))
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    row.update(fits=False, note=str(e).splitlines()[0][:200],
               hbm_gib=float(m.group(1)) if m else None)
    return row
  ma = c.memory_analysis()
  row.update(fits=True, peak_bytes=int(ma.peak_memory_in_bytes),
             temp_bytes=int(ma.temp_size_in_bytes),
             argument_bytes=int(ma.argument_size_in_bytes),
             compile_s=round(time.perf_counter() - t0, 1))
  return row


def largest_batch(policy: Any, topology: str, mode: str, a: argparse.Namespace
                  ) -> dict[str, Any]:
  """The largest per-chip batch whose step the compiler accepts, found in few compiles.

  Per-chip memory is (nearly) affine in the batch: fixed state (parameters,
  gradients, optimizer shards) plus activations per sample. Compile at
  batch 1 and 2, predict the largest batch under the chip's HBM from the
  line, then let the compiler decide: step down from the prediction until it
  accepts, and check that one more sample is refused.
  """
  log = lambda b, r: print(f"    batch/chip {b:4d}: " + (
      f"peak {r['peak_bytes'] / 2**30:6.2f} GiB" if r["fits"] else "refused (OOM)"),
      file=sys.stderr, flush=True)
  r1 = step_memory(policy, topology, 1, mode, a)
  log(1, r1)
  if not r1["fits"]:
    return {**r1, "batch_per_chip": 0, "compiles": 1}
  r2 = step_memory(policy, topology, 2, mode, a)
  log(2, r2)
  if not r2["fits"]:
    return {**r1, "compiles": 2, "refused_at": 2}
  slope = max(r2["peak_bytes"] - r1["peak_bytes"], 1)
  hbm = targets.CHIPS[topology.split(":")[0]].hbm_bytes
  guess = max(1, min(a.max_batch, int((hbm - (r1["peak_bytes"] - slope)) // slope)))
  line = {"fixed_bytes": r1["peak_bytes"] - slope, "bytes_per_sample": slope,
          "predicted_batch": guess,
          "predicted_peak_bytes": r1["peak_bytes"] + (guess - 1) * slope}
  if not a.verify:
    return {**r2, **line, "compiles": 2, "verified": False}
  compiles, best, b = 2, r2, guess
  while b > 2:
    r = step_memory(policy, topology, b, mode, a)
    compiles += 1
    log(b, r)
    if r["fits"]:
      best = r
      break
    b -= max(1, b // 8)
  if best["batch_per_chip"] < a.max_batch:
    nxt = step_memory(policy, topology, best["batch_per_chip"] + 1, mode, a)
    compiles += 1
    log(best["batch_per_chip"] + 1, nxt)
    if nxt["fits"]:  # the line was pessimistic: keep the larger one, say it is a lower bound
      best = {**nxt, "lower_bound": True}
  return {**best, **line, "compiles": compiles, "verified": True}


PIPELINE_POLICIES = {"no remat": None, "full": "full", "save_dots_no_batch": "save_dots_no_batch",
                     "save qkv, attn_out": "save_qkv_attn_out"}


def pipeline_batch(label: str, topology: str, a: argparse.Namespace) -> dict[str, Any]:
  """The pipeline mode's row: the largest microbatch per chip (affine fit through 1 and 2),
  as examples per chip per step, with the per-stage peak at one example."""
  if label not in PIPELINE_POLICIES:
    return {"topology": topology, "mode": "pipeline", "fits": False,
            "note": f"policy {label!r} has no per-layer form inside a pipeline stage"}
  chips = len(targets.parse_target(f"tpu:{topology}").devices())
  if chips % a.stages:
    raise SystemExit(f"pod_plan: --stages {a.stages} does not divide the {chips} chips of "
                     f"{topology}; pass a divisor of {chips}.")
  r = pipeline_row(f"tpu:{topology}", chips // a.stages, "gpipe", 1, a.microbatches,
                   PIPELINE_POLICIES[label], layers=a.layers, d_model=a.d_model,
                   heads=a.heads, seq=a.seq)
  batch = int(r["examples_per_chip_per_step"])
  fits = r["largest_microbatch_per_chip"] > 0
  return {"topology": topology, "chips": chips, "mode": "pipeline", "stages": a.stages,
          "microbatches": a.microbatches, "bubble_fraction": r["bubble_fraction"],
          "fits": fits, "batch_per_chip": batch, "predicted_batch": batch,
          "fixed_bytes": r["fixed_bytes"], "bytes_per_sample": r["bytes_per_example"],
          "peak_bytes": r["peak_bytes_at_1"],
          "predicted_peak_bytes": (r["fixed_bytes"] + r["largest_microbatch_per_chip"]
                                   * r["bytes_per_example"]) if fits else None,
          "estimated_seconds_at_1": r["estimated_seconds_at_1"], "verified": False}


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--topologies", nargs="*", default=["v5e:4x4", "v5e:16x16"])
  ap.add_argument("--modes", nargs="*", default=["fsdp", "dp"], choices=["fsdp", "dp", "pipeline"])
  ap.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES))
  ap.add_argument("--layers", type=int, default=24)
  ap.add_argument("--d-model", type=int, default=2048)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--seq", type=int, default=2048)
  ap.add_argument("--vocab", type=int, default=32768)
  ap.add_argument("--max-batch", type=int, default=64)
  ap.add_argument("--stages", type=int, default=4, help="pipeline mode: stages")
  ap.add_argument("--microbatches", type=int, default=16, help="pipeline mode: microbatches")
  ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=False,
                  help="compile at the predicted batch (and one more) to confirm it; near the "
                       "HBM limit the TPU compiler takes minutes per compile")
  ap.add_argument("--out", type=Path, default=RESULTS / "pod_plan-v5e.json")
  a = ap.parse_args(argv)
  rows = []
  for topo in a.topologies:
    for mode in a.modes:
      for label in a.policies:
        print(f"{topo} {mode} {label}", file=sys.stderr, flush=True)
        best = (pipeline_batch(label, topo, a) if mode == "pipeline"
                else largest_batch(POLICIES[label], topo, mode, a))
        rows.append({"policy": label, **best})
  result = {"jax": jax.__version__, "model": (
      f"GPT: {a.layers} layers, d_model {a.d_model}, {a.heads} heads, seq {a.seq}, "
      f"vocab {a.vocab}; bf16 activations, fp32 params, AdamW"),
      "source": "deviceless TPU compile of the whole training step; per-chip figures",
      "rows": rows}
  print(f"\n{result['model']}\nlargest per-chip batch under 16 GiB of v5e HBM "
        f"({'verified by compiling it' if a.verify else 'predicted: affine in batch from compiles at 1 and 2'}):")
  print(f"{'topology':10s} {'mode':8s} {'policy':22s} {'fixed GiB':>9s} {'GiB/sample':>10s} "
        f"{'batch/chip':>10s} {'peak GiB':>9s}")
  for r in rows:
    if not r.get("fits"):
      print(f"{r['topology']:10s} {r['mode']:8s} {r['policy']:22s} {'':>9s} {'':>10s} "
            f"{'none':>10s} {'-':>9s}")
      continue
    batch = r["batch_per_chip"] if a.verify else r.get("predicted_batch", r["batch_per_chip"])
    batch = f">={batch}" if r.get("lower_bound") else batch
    peak = r["peak_bytes"] if a.verify else r.get("predicted_peak_bytes", r["peak_bytes"])
    fixed = f"{r['fixed_bytes'] / 2**30:.2f}" if "fixed_bytes" in r else "-"
    per = f"{r['bytes_per_sample'] / 2**30:.3f}" if "bytes_per_sample" in r else "-"
    print(f"{r['topology']:10s} {r['mode']:8s} {r['policy']:22s} {fixed:>9s} {per:>10s} "
          f"{batch:>10} {peak / 2**30:>9.2f}")
  write_json(a.out, result)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
