"""The seeds' demo: peak memory of the dropout MLP with and without checkpointing.

    python -m experiments.mlp_memory --checkpoint false
    python -m experiments.mlp_memory --checkpoint true
    python -m experiments.mlp_memory --checkpoint best
    python -m experiments.mlp_memory --checkpoint best --target tpu:v5e:2x2

The PyTorch reference (``python run.py True|False``) prints "Peak GPU memory
usage: X MB with Checkpoint = True/False" for one training step of its
``CheckpointedMLP`` (input layer, 4 hidden layers of Linear -> ReLU ->
Dropout, output layer). This prints ``Peak memory: X MB with Checkpoint =
...`` for one AdamW step of the same model, then what the peak is made of.

* ``false``: the seed's model, no remat.
* ``true``: every hidden layer rematerialized (full remat), with remat_kit's
  layout: the layers as a scan (``LayerStack``; XLA:CPU merges recomputation
  back in a Python loop, ``--layout loop`` shows it) and the remat boundary
  at each layer's pre-activation (each unit is ReLU -> Dropout -> Dense, the
  same ops regrouped, so the backward recomputes ReLU and dropout, never a
  matmul).
* ``plain``: for comparison, the seed's model and Python loop with each hidden
  layer under ``jax.checkpoint`` (full remat), as a plain-JAX port would.
* ``best``: remat_kit chooses among strategies (the policy inside each
  layer, keeping the dropout masks or recomputing them from their keys, the
  dropout PRNG, offloading layer inputs where the target has host memory,
  and cutting the batch into microbatches with
  ``rk.microbatched_value_and_grad``) the one with the least peak whose step
  time is at most 1.25x of no remat, and prints both ratios.

Where the peak comes from: on a GPU or TPU, the device's live peak after the
step (``memory_stats()``), as the seed does; for a ``--target`` compiled
without the device, the compiler's peak; on CPU, which has no live counter,
the memory the XLA:CPU runtime reserves for the step (temp + arguments +
outputs, from :func:`remat_kit.explain_peak`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import remat_kit as rk
from remat_kit import models, report, targets
from remat_kit.flax import LayerStack, remat_policy
from remat_kit.report import compile_explained, count_flops, estimate_seconds, memory_fields

SEED_SIZES = {"batch": 32768, "din": 1024, "width": 4096}
CPU_SIZES = {"batch": 16384, "din": 256, "width": 512}
DEPTH, OUTPUTS, RATE = 4, 10, 0.1
# The seed's figures, measured on an H100 at SEED_SIZES (fp32, 4 hidden layers).
PYTORCH = "PyTorch torch.utils.checkpoint: 7.07 -> 5.05 GB (-28.5%) at +32% step time"
PLAIN_JAX = "plain jax.checkpoint per layer: 6.78 -> 5.17 GB (-23.8%) at +25.5% step time"
TIME_LIMIT = 1.25
KINDS = ("parameter", "optimizer state", "input", "input", "input")
OUT_KINDS = ("parameter", "optimizer state", "output")


class PreAct(nn.Module):
  """ReLU -> Dropout -> Dense: one hidden layer, cut at the pre-activation."""

  width: int
  rate: float = RATE

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = True) -> jax.Array:
    z = rk.checkpoint_name(z, "carry")  # the layer's input, so a policy can offload it
    h = rk.checkpoint_name(nn.relu(z), "relu")
    h = nn.Dropout(self.rate, deterministic=not train)(h)
    return rk.checkpoint_name(nn.Dense(self.width)(h), "dense")


class PreActMLP(nn.Module):
  """The seed's MLP with its layers cut at pre-activations: Dense, then ``depth``
  units of ReLU -> Dropout -> Dense (a `LayerStack`), then ReLU -> Dropout ->
  Dense to the outputs. The same function as ``models.CheckpointedMLP``."""

  width: int
  depth: int = DEPTH
  policy: Any = True
  layout: str = "scan"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    z = rk.checkpoint_name(nn.Dense(self.width, name="input")(x), "dense")
    z = LayerStack(PreAct(self.width), self.depth, policy=self.policy,
                   scan=self.layout == "scan", name="hidden")(z, train)
    last = remat_policy(self.policy, static_argnames="train")(PreAct) if self.policy else PreAct
    return last(OUTPUTS, name="output")(z, train)


# (label, model policy, dropout PRNG, microbatches): what `best` chooses among.
CANDIDATES = (
    ("full remat", "full", None, 1),
    ("keep dropout masks", "prims:lt", None, 1),
    ("full remat, rbg dropout", "full", "unsafe_rbg", 1),
    ("keep dropout masks, rbg dropout", "prims:lt", "unsafe_rbg", 1),
    # The batch cut into slices (rk.microbatched_value_and_grad): what a layer's backward
    # holds at full batch (its input, output gradient and input gradient) divided.
    # "seed": the seed's model and Python loop, no remat (a scan only adds stacked buffers).
    ("4 microbatches, the seed's layers", "seed", None, 4),
    ("8 microbatches, the seed's layers", "seed", None, 8),
    ("16 microbatches, the seed's layers", "seed", None, 16),
    ("8 microbatches, the seed's layers, rbg dropout", "seed", "unsafe_rbg", 8),
    ("8 microbatches, full remat, rbg dropout", "full", "unsafe_rbg", 8),
)
# Where the target has host memory (GPU, TPU): each layer's input offloaded to it.
OFFLOAD = (("offload layer inputs", "offload:carry", None, 1),
           ("offload layer inputs, rbg dropout", "offload:carry", "unsafe_rbg", 1))
STRATEGY_NOTES: dict[Any, str] = {
    "microbatches": "the batch is cut into {k} slices whose gradients add up in one buffer "
                    "(rk.microbatched_value_and_grad); each slice draws its own dropout masks",
    "prims:lt": "each layer's bool dropout mask is kept (1 byte/element; `prims:lt` saves "
                "bernoulli's compare), ReLU is recomputed",
    "full": "everything inside each layer is recomputed, masks from their keys",
    "offload:carry": "each layer's input is offloaded to host memory and fetched back for "
                     "the backward; the rest is recomputed",
    "seed": "the seed's layers as they are, nothing recomputed",
    "unsafe_rbg": "dropout bits from XLA's RngBitGenerator (`jax.random.key(.., "
                  "impl='unsafe_rbg')`): the same Bernoulli(0.9) masks in distribution, one op "
                  "instead of threefry's large temporaries",
}


def _bool_or_best(s: str) -> bool | str:
  low = s.lower()
  if low in ("true", "1", "yes"):
    return True
  if low in ("false", "0", "no"):
    return False
  if low in ("best", "plain"):
    return low
  raise argparse.ArgumentTypeError(f"--checkpoint takes true, false, best or plain, got {s!r}")


class Setup:
  """One configuration: its model, step, arguments and compile for a target."""

  def __init__(self, model: nn.Module, sizes: dict[str, int], target: targets.Target,
               prng: str | None = None, microbatches: int = 1):
    self.model, self.target, self.microbatches = model, target, microbatches
    self.cache: dict[Any, Any] = {}
    b, din = sizes["batch"], sizes["din"]
    x = jax.ShapeDtypeStruct((b, din), jnp.float32)
    init_x = jnp.zeros((8, din), jnp.float32)
    params = model.init({"params": jax.random.key(2), "dropout": jax.random.key(3)},
                        init_x)["params"]
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    self.opt = optax.adamw(1e-3)
    state = jax.eval_shape(self.opt.init, params)
    key = jax.eval_shape(lambda: jax.random.key(4, impl=prng) if prng else jax.random.key(4))
    self.prng = prng
    self.abstract = (params, state, x, jax.ShapeDtypeStruct((b,), jnp.int32), key)

  def step(self, params: Any, state: Any, x: Any, y: Any, key: Any) -> Any:
    def loss(p: Any, x: Any, y: Any, key: Any) -> Any:
      logits = self.model.apply({"params": p}, x, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    # One slice is the whole batch when microbatches == 1 (no scan, the seed's step).
    vg = rk.microbatched_value_and_grad(loss, self.microbatches, batch_argnums=(1, 2),
                                        key_argnums=3)
    value, grads = vg(params, x, y, key)
    updates, state = self.opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  def compile(self, keep_remat: bool) -> tuple[Any, Any]:
    """The compiled step (parameters and optimizer state donated) and its peak."""
    options = ({"xla_disable_hlo_passes": "cse_barrier_expander"}
               if keep_remat and self.target.is_local and jax.default_backend() == "cpu"
               else None)
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes dtypes
      return compile_explained(self.step, self.abstract, {}, target=self.target, top=8,
                               grad=False, arg_kinds=KINDS, out_kinds=OUT_KINDS,
                               compiler_options=options, donate_argnums=(0, 1))

  def concrete(self) -> tuple[Any, ...]:
    params, state, x, y, _ = self.abstract
    real = lambda s: jnp.zeros(s.shape, s.dtype) + 0.01 if s.dtype == jnp.float32 else \
        jnp.zeros(s.shape, s.dtype)
    key = jax.random.key(4, impl=self.prng) if self.prng else jax.random.key(4)
    return (jax.tree.map(real, params), jax.tree.map(real, state),
            jax.random.normal(jax.random.key(0), x.shape),
            jax.random.randint(jax.random.key(1), y.shape, 0, OUTPUTS), key)

  def flops(self) -> int:
    with jax.numpy_dtype_promotion("standard"):
      return count_flops(lambda *a: self.step(*a)[2], *self.abstract)


def _peak(setup: Setup, keep_remat: bool) -> dict[str, Any]:
  """The compiled step's peak (and estimated time on a target), compiled once per setup:
  `best` and the ratios ask for the same setups again."""
  key = ("peak", keep_remat)
  if key not in setup.cache:
    setup.cache[key] = _compile_peak(setup, keep_remat)
  return setup.cache[key]


def _compile_peak(setup: Setup, keep_remat: bool) -> dict[str, Any]:
  compiled, rep = setup.compile(keep_remat)
  out = {"peak_bytes": rep.peak_bytes, "by_kind": rep.by_kind, "rows": rep.to_dict()["rows"],
         "compiler": rep.compiler, "compiled": compiled}
  if not setup.target.is_local:
    fields = memory_fields(compiled, setup.target)
    out["peak_bytes"] = fields["peak_bytes"]
    out["seconds"], out["seconds_source"] = estimate_seconds(setup.flops(), fields,
                                                             setup.target)
  return out


def time_interleaved(entries: dict[str, tuple[Any, Setup]], rounds: int = 5
                     ) -> dict[str, report.Timing]:
  """Step times of each compiled step (:func:`remat_kit.report.time_interleaved`), the
  donated buffers rebuilt for each call outside the timed region."""
  steps = {k: (lambda *leaves, c=c: c(*leaves)) for k, (c, _) in entries.items()}
  fresh = {k: (lambda s=s: tuple(jax.tree.leaves(s.concrete()))) for k, (_, s) in entries.items()}
  return report.time_interleaved(steps, rounds, max_rounds=rounds, args=fresh)


def _mb(b: float) -> str:
  return f"{b / 2**20:.1f}"


def _breakdown(by_kind: dict[str, int]) -> str:
  groups = {"parameters": ("parameter",), "optimizer state": ("optimizer state",),
            "gradients": ("gradient",), "saved activations": ("saved residual",),
            "inputs": ("input",), "temporaries": ("forward temporary", "backward temporary",
                                                  "temporary", "output"),
            "allocator packing": ("packing",), "other": ("other",)}
  parts = []
  for label, kinds in groups.items():
    b = sum(by_kind.get(k, 0) for k in kinds)
    if b:
      parts.append(f"{label} {_mb(b)}")
  return ", ".join(parts) + " (MB)"


def _how(target: targets.Target, live: bool) -> str:
  if live:
    return (f"live peak on this {jax.default_backend().upper()} after one step "
            "(memory_stats()['peak_bytes_in_use']), as the seed measures")
  if not target.is_local:
    return f"the {target.name} compiler's peak for one step (compiled here, nothing ran)"
  return ("XLA:CPU reserves this for one step: temp + arguments + outputs of the compiled "
          "step, remat kept (CSE barrier pass off); CPU has no live counter")


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", type=_bool_or_best, required=True,
                  help="true, false, best, or plain (the seed's model under plain "
                       "jax.checkpoint, for comparison)")
  ap.add_argument("--target", default=None,
                  help="compile for this target instead of running here (tpu:v5e:2x2, gpu:h100)")
  ap.add_argument("--layout", choices=["scan", "loop"], default="scan",
                  help="hidden layers as a scan (default) or the seed's Python loop")
  ap.add_argument("--seed-sizes", action="store_true",
                  help=f"the seed's sizes {SEED_SIZES} (default on accelerators)")
  ap.add_argument("--batch", type=int)
  ap.add_argument("--din", type=int)
  ap.add_argument("--width", type=int)
  ap.add_argument("--json", help="also write the result to this JSON file")
  args = ap.parse_args(argv)
  if args.json:
    out = Path(args.json)
    if out.is_dir() or not out.parent.exists():
      ap.error(f"--json {args.json!r}: must be a file in an existing directory")
  t = targets.parse_target(args.target)
  on_accel = not t.is_local or jax.default_backend() != "cpu"
  sizes = dict(SEED_SIZES if (args.seed_sizes or on_accel) else CPU_SIZES)
  for k in ("batch", "din", "width"):
    v = getattr(args, k)
    if v is not None:
      if v < 1:
        ap.error(f"--{k} must be positive, got {v}")
      sizes[k] = v

  base = Setup(models.CheckpointedMLP(width=sizes["width"], depth=DEPTH, checkpoint=False),
               sizes, t)
  print(f"one AdamW step, batch {sizes['batch']}, input {sizes['din']}, hidden "
        f"{sizes['width']} x {DEPTH} layers, dropout {RATE}, fp32, on {t.name}", flush=True)
  result: dict[str, Any] = {"sizes": sizes, "target": t.name, "checkpoint": args.checkpoint}
  if args.checkpoint is False:
    chosen, label = base, "False"
  elif args.checkpoint in (True, "plain"):
    if args.checkpoint is True:
      chosen = Setup(PreActMLP(sizes["width"], policy="full", layout=args.layout), sizes, t)
    else:  # the seed's model and layout, each hidden layer under jax.checkpoint
      chosen = Setup(models.CheckpointedMLP(width=sizes["width"], depth=DEPTH,
                                            checkpoint=True), sizes, t)
    label = "True" if args.checkpoint is True else "True (plain jax.checkpoint)"
    _time_against(base, chosen, t, result)
  else:
    chosen, label = _choose_best(base, sizes, t, args.layout, result), "best"
  peak = _peak(chosen, keep_remat=args.checkpoint is not False)
  live = None
  if t.is_local and jax.default_backend() != "cpu":
    jax.block_until_ready(peak["compiled"](*jax.tree.leaves(chosen.concrete())))
    live = rk.report.live_peak_bytes()
  figure = live if live is not None else peak["peak_bytes"]
  print(f"Peak memory: {_mb(figure)} MB with Checkpoint = {label}")
  print(f"  how: {_how(t, live is not None)}")
  print(f"  made of: {_breakdown(peak['by_kind'])}")
  result.update(peak_bytes=figure, live=live is not None, by_kind=peak["by_kind"],
                rows=peak["rows"])
  if args.checkpoint is not False:
    base_peak = result.get("baseline_peak_bytes") or _peak(base, keep_remat=False)["peak_bytes"]
    print(f"  {figure / base_peak:.2f}x the peak without checkpointing ({_mb(base_peak)} MB)")
    result["memory_ratio"] = figure / base_peak
  if "time_ratio" in result:
    print(f"  step time {result['time_ratio']:.2f}x of no checkpointing "
          f"({result['time_source']})")
  if args.checkpoint == "best":
    err, what = _gradient_check(chosen, sizes)
    print(f"  gradients equal {what}")
    result["gradient_max_abs_diff"] = err
  if args.checkpoint is not False:
    print(f"  the seed, on an H100 at its sizes: {PYTORCH}; {PLAIN_JAX}")
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.json}")
  return 0


def _time_against(base: Setup, chosen: Setup, t: targets.Target, result: dict[str, Any]
                  ) -> None:
  """``result["time_ratio"]``: ``chosen``'s step time over ``base``'s (measured here,
  interleaved, or estimated for a target)."""
  pb, pc = _peak(base, keep_remat=False), _peak(chosen, keep_remat=True)
  result["baseline_peak_bytes"] = pb["peak_bytes"]
  if t.is_local:
    timed = time_interleaved({"base": (pb["compiled"], base), "chosen": (pc["compiled"], chosen)})
    result["time_ratio"] = timed["chosen"].median_s / timed["base"].median_s
    spread = max(v.spread_s / v.median_s for v in timed.values())
    result["time_source"] = (f"measured on {jax.default_backend()}, median of 5 interleaved "
                             f"rounds, largest spread (half the 10-90th percentile range) "
                             f"{spread:.0%}")
  else:
    result["time_ratio"] = pc["seconds"] / pb["seconds"]
    result["time_source"] = f"estimated for {t.name} ({pb['seconds_source']})"


def _gradient_check(setup: Setup, sizes: dict[str, int]) -> tuple[float, str]:
  """Max |grad(chosen) - grad(reference)| at a small batch, and what the reference was.

  The reference is the same model without remat, with the same dropout keys (sliced
  the same way); for a sliced batch, also the whole batch's gradient with dropout off
  (slices draw their own masks, so only without dropout is the whole batch the same
  function).
  """
  model, k = setup.model, setup.microbatches
  plain = model.clone(policy=False) if hasattr(model, "policy") else model
  x = jax.random.normal(jax.random.key(0), (64, sizes["din"]))
  y = jax.random.randint(jax.random.key(1), (64,), 0, OUTPUTS)
  key = jax.random.key(4, impl=setup.prng) if setup.prng else jax.random.key(4)
  params = model.init({"params": jax.random.key(2), "dropout": key}, x)["params"]

  def grad_of(m: nn.Module, slices: int, train: bool) -> Any:
    def loss(p: Any, x: Any, y: Any, key: Any) -> Any:
      logits = m.apply({"params": p}, x, train, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    vg = rk.microbatched_value_and_grad(loss, slices, batch_argnums=(1, 2), key_argnums=3)
    return jax.jit(vg)(params, x, y, key)[1]

  def max_diff(a: Any, b: Any) -> float:
    return float(max(jax.tree.leaves(jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b))))

  ref = grad_of(plain, k, True)
  scale = float(max(jax.tree.leaves(jax.tree.map(lambda u: jnp.max(jnp.abs(u)), ref))))
  err = max_diff(grad_of(model, k, True), ref)
  what = "the same model without remat (same dropout keys)"
  if k > 1:
    err = max(err, max_diff(grad_of(model, k, False), grad_of(plain, 1, False)))
    what += f"; and, dropout off, the whole batch's gradient without the {k} slices"
  return err, f"{what}: max |diff| {err:.1e} (largest |gradient| {scale:.1e})"


def _choose_best(base: Setup, sizes: dict[str, int], t: targets.Target, layout: str,
                 result: dict[str, Any]) -> Setup:
  """The candidate with the least peak whose step time is at most TIME_LIMIT x no remat."""
  candidates = CANDIDATES + (OFFLOAD if targets.has_host_memory(t) else ())
  def model(policy: Any) -> nn.Module:
    if policy == "seed":
      return models.CheckpointedMLP(width=sizes["width"], depth=DEPTH, checkpoint=False)
    return PreActMLP(sizes["width"], policy=policy, layout=layout)

  setups = {label: Setup(model(policy), sizes, t, prng, k)
            for label, policy, prng, k in candidates}
  peaks = {"no checkpointing": _peak(base, keep_remat=False)}
  for label, s in setups.items():
    print(f"  trying: {label}", flush=True)
    peaks[label] = _peak(s, keep_remat=True)
  if t.is_local:
    timed = time_interleaved({"no checkpointing": (peaks["no checkpointing"]["compiled"], base),
                              **{k: (peaks[k]["compiled"], s) for k, s in setups.items()}})
    seconds = {k: v.median_s for k, v in timed.items()}
    spread = max(v.spread_s / v.median_s for v in timed.values())
    source = (f"measured on {jax.default_backend()}, median of 5 interleaved rounds, "
              f"largest spread (half the 10-90th percentile range) {spread:.0%}")
  else:
    seconds = {k: v["seconds"] for k, v in peaks.items()}
    source = f"estimated for {t.name} ({peaks['no checkpointing']['seconds_source']})"
  base_peak, base_s = peaks["no checkpointing"]["peak_bytes"], seconds["no checkpointing"]
  rows = []
  for k in setups:
    rows.append((k, peaks[k]["peak_bytes"] / base_peak, seconds[k] / base_s))
  print(f"  {'candidate':42s} memory   time")
  for k, m, s in rows:
    print(f"  {k:42s} {m:5.2f}x {s:5.2f}x")
  fits = [r for r in rows if r[2] <= TIME_LIMIT]
  if not fits:
    print(f"  no candidate is within {TIME_LIMIT}x step time; taking the fastest")
    fits = [min(rows, key=lambda r: r[2])]
  name, mem, sec = min(fits, key=lambda r: r[1])
  policy, prng, k = next((p, g, k) for label, p, g, k in candidates if label == name)
  print(f"  chosen: {name}: {STRATEGY_NOTES[policy]}"
        + (f"; {STRATEGY_NOTES[prng]}" if prng else "")
        + (f"; {STRATEGY_NOTES['microbatches'].format(k=k)}" if k > 1 else ""))
  result.update(candidates=[{"label": k, "memory_ratio": m, "time_ratio": s} for k, m, s in rows],
                chosen=name, time_ratio=sec, time_source=source,
                baseline_peak_bytes=base_peak)
  return setups[name]


if __name__ == "__main__":
  sys.exit(main())
