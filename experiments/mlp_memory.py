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
* ``best``: ``rk.auto`` searches the plans of the pre-activation model (the
  policy inside each layer: none, full, keeping the dropout masks, saving one
  tagged name; offloading tagged names where the target has host memory),
  each at 1, 4, 8 and 16 microbatches (``auto(..., microbatches=)``: the
  gradient over slices of the batch added up in one buffer) and with either
  dropout PRNG (``auto(..., options={"prng": ...})``), compiles and times
  them all in one interleaved run (or estimates them for a ``--target``), and
  takes the least peak within 1.25x of no remat's step time
  (``AutoResult.least_memory``); it prints both ratios and checks gradients.

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
from remat_kit.planner import AutoResult, Candidate
from remat_kit.report import compilation, count_flops, estimate_seconds, explain_peak
from remat_kit.report.core import memory_fields

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


# What `best` asks `rk.auto` to search, besides no remat, full remat and each tagged name
# saved (or offloaded, where the target has host memory).
PRESETS = ("prims:lt",)  # keep each layer's bool dropout mask (bernoulli's compare)
MICROBATCHES = (1, 4, 8, 16)
PRNGS = ("threefry", "unsafe_rbg")
NOTES = {
    "microbatches": "the batch is cut into {k} slices whose gradients add up in one buffer "
                    "(rk.microbatched_value_and_grad); each slice draws its own dropout masks",
    "unsafe_rbg": "dropout bits from XLA's RngBitGenerator (`jax.random.key(.., "
                  "impl='unsafe_rbg')`, seeded from the step's key): the same Bernoulli(0.9) "
                  "masks in distribution, one op instead of threefry's large temporaries",
}


def loss_of(model: nn.Module, prng: str = "threefry", train: bool = True
            ) -> Any:
  """The seed's loss, ``loss(params, x, y, key)``: cross-entropy of ``model`` with dropout
  drawn from ``key`` (a threefry key; with ``prng="unsafe_rbg"`` it seeds an rbg key)."""
  def loss(p: Any, x: Any, y: Any, key: Any) -> Any:
    if prng != "threefry":
      key = jax.random.key(jax.random.bits(key, dtype=jnp.uint32), impl=prng)
    logits = model.apply({"params": p}, x, train, rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss


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
               prng: str = "threefry", microbatches: int = 1):
    self.model, self.target, self.microbatches = model, target, microbatches
    self.prng, self.loss = prng, loss_of(model, prng)
    self.cache: dict[Any, Any] = {}
    b, din = sizes["batch"], sizes["din"]
    x = jax.ShapeDtypeStruct((b, din), jnp.float32)
    init_x = jnp.zeros((8, din), jnp.float32)
    params = model.init({"params": jax.random.key(2), "dropout": jax.random.key(3)},
                        init_x)["params"]
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    self.opt = optax.adamw(1e-3)
    state = jax.eval_shape(self.opt.init, params)
    key = jax.eval_shape(lambda: jax.random.key(4))
    self.abstract = (params, state, x, jax.ShapeDtypeStruct((b,), jnp.int32), key)

  def step(self, params: Any, state: Any, x: Any, y: Any, key: Any) -> Any:
    # One slice is the whole batch when microbatches == 1 (no scan, the seed's step).
    vg = rk.microbatched_value_and_grad(self.loss, self.microbatches, batch_argnums=(1, 2),
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
      opts = dict(target=self.target, grad=False, arg_kinds=KINDS, out_kinds=OUT_KINDS,
                  compiler_options=options, donate_argnums=(0, 1))
      rep = explain_peak(self.step, *self.abstract, top=8, **opts)
      # The same program, from the cache: no second compile.
      return compilation(self.step, self.abstract, {}, **opts).compiled, rep

  def concrete(self) -> tuple[Any, ...]:
    params, state, x, y, _ = self.abstract
    return (_filled(params), _filled(state), *_batch(x.shape[0], x.shape[1]))

  def flops(self) -> int:
    with jax.numpy_dtype_promotion("standard"):
      return count_flops(lambda *a: self.step(*a)[2], *self.abstract)


def _filled(tree: Any) -> Any:
  """Arrays of ``tree``'s shapes: floats 0.01 (a step's timing does not depend on values)."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype) + 0.01
                      if s.dtype == jnp.float32 else jnp.zeros(s.shape, s.dtype), tree)


def _batch(b: int, din: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The step's inputs: a batch, its labels and the dropout key."""
  return (jax.random.normal(jax.random.key(0), (b, din)),
          jax.random.randint(jax.random.key(1), (b,), 0, OUTPUTS), jax.random.key(4))


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
                     ) -> dict[str, report.timing.Timing]:
  """Step times of each compiled step (:func:`remat_kit.report.timing.time_interleaved`), the
  donated buffers rebuilt for each call outside the timed region."""
  steps = {k: (lambda *leaves, c=c: c(*leaves)) for k, (c, _) in entries.items()}
  fresh = {k: (lambda s=s: tuple(jax.tree.leaves(s.concrete()))) for k, (_, s) in entries.items()}
  return report.timing.time_interleaved(steps, rounds, max_rounds=rounds, args=fresh)


def _mb(b: float) -> str:
  return f"{b / 2**20:.1f}"


def _breakdown(by_kind: dict[str, int]) -> str:
  groups = {"parameters": ("parameter",), "optimizer state": ("optimizer state",),
            "gradients": ("gradient",), "saved activations": ("activation",),
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
  ap.add_argument("--time-budget", type=float, default=60.0,
                  help="best: seconds all timing rounds may take together (default 60)")
  args = ap.parse_args(argv)
  if args.json:
    out = Path(args.json)
    if out.is_dir() or not out.parent.exists():
      ap.error(f"--json {args.json!r}: must be a file in an existing directory")
  if not args.time_budget > 0:
    ap.error(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
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
    chosen, label = _choose_best(sizes, t, args.layout, result, args.time_budget), "best"
  peak = _peak(chosen, keep_remat=args.checkpoint is not False)
  live = None
  if t.is_local and jax.default_backend() != "cpu":
    jax.block_until_ready(peak["compiled"](*jax.tree.leaves(chosen.concrete())))
    live = rk.report.core.live_peak_bytes()
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
  the same way); for a sliced batch, also the slices' gradient against the whole batch's,
  without remat and with dropout off (slices draw their own masks, so only without
  dropout is the whole batch the same function).
  """
  model, k = setup.model, setup.microbatches
  plain = model.clone(policy=False) if hasattr(model, "policy") else model
  x, y, key = _batch(64, sizes["din"])
  params = model.init({"params": jax.random.key(2), "dropout": key}, x)["params"]

  def grad_of(m: nn.Module, slices: int, train: bool) -> Any:
    vg = rk.microbatched_value_and_grad(loss_of(m, setup.prng, train), slices,
                                        batch_argnums=(1, 2), key_argnums=3)
    return jax.jit(vg)(params, x, y, key)[1]

  def max_diff(a: Any, b: Any) -> float:
    return float(max(jax.tree.leaves(jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b))))

  ref = grad_of(plain, k, True)
  scale = float(max(jax.tree.leaves(jax.tree.map(lambda u: jnp.max(jnp.abs(u)), ref))))
  err = max_diff(grad_of(model, k, True), ref)
  what = "the same model without remat (same dropout keys)"
  if k > 1:
    # Dropout off, without remat (a policy may refer to dropout's compare): slicing alone.
    err = max(err, max_diff(grad_of(plain, k, False), grad_of(plain, 1, False)))
    what += f"; and, dropout off, the {k} slices' gradient against the whole batch's"
  return err, f"{what}: max |diff| {err:.1e} (largest |gradient| {scale:.1e})"


def _choose_best(sizes: dict[str, int], t: targets.Target, layout: str,
                 result: dict[str, Any], time_budget_s: float) -> Setup:
  """``rk.auto``'s plan of least peak within TIME_LIMIT x no remat's step time."""
  def build(policy: Any, prng: str = "threefry") -> Any:
    return loss_of(PreActMLP(sizes["width"], policy=policy, layout=layout), prng)

  model = PreActMLP(sizes["width"], policy=False, layout=layout)
  x, y, key = _batch(sizes["batch"], sizes["din"])
  params = model.init({"params": jax.random.key(2), "dropout": key}, x[:8])["params"]
  if t.is_local:
    params = _filled(params)
  else:  # compiled for the target, nothing runs: shapes only
    params, x, y, key = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                     (params, x, y, key))
  res: AutoResult = rk.auto(
      build, params, x, y, key, budget=None, budget_kind="peak", presets=PRESETS,
      max_names_exact=0, microbatches=MICROBATCHES, options={"prng": PRNGS}, target=t,
      verbose=True, time_budget_s=time_budget_s if t.is_local else None)
  ref = res.reference
  assert ref is not None and ref.cost_s is not None
  chosen = res.least_memory(TIME_LIMIT)

  def ratios(c: Candidate) -> tuple[float, float]:
    assert c.cost_s is not None and ref.cost_s is not None
    return c.peak_bytes / ref.peak_bytes, c.cost_s / ref.cost_s

  print(f"  rk.auto: {len(res.candidates)} plans, the gradient's peak and step time against "
        f"no remat; its Pareto front:")
  print(f"  {'plan':56s} memory   time")
  for c in res.pareto:
    m, sec = ratios(c)
    print(f"  {c.label:56s} {m:5.2f}x {sec:5.2f}x" + ("  <- chosen" if c is chosen else ""))
  prng = dict(chosen.options)["prng"]
  notes = [f"policy {chosen.policy!r} inside each layer"]
  if chosen.microbatches > 1:
    notes.append(NOTES["microbatches"].format(k=chosen.microbatches))
  if prng in NOTES:
    notes.append(NOTES[prng])
  print(f"  chosen: {chosen.label}, the least peak within {TIME_LIMIT}x no remat's step "
        f"time: " + "; ".join(notes))
  _, time_ratio = ratios(chosen)
  result.update(candidates=[{"label": c.label, "memory_ratio": ratios(c)[0],
                             "time_ratio": ratios(c)[1], "microbatches": c.microbatches,
                             "prng": dict(c.options)["prng"], "policy": repr(c.policy)}
                            for c in res.candidates],
                pareto=[c.label for c in res.pareto], chosen=chosen.label,
                time_ratio=time_ratio, time_source=f"rk.auto, {chosen.cost_source}")
  return Setup(PreActMLP(sizes["width"], policy=chosen.policy, layout=layout), sizes, t,
               prng, chosen.microbatches)


if __name__ == "__main__":
  sys.exit(main())
