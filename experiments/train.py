"""Train with remat: optax AdamW, a real bundled dataset, sharding, offload, mixed precision.

    python experiments/train.py            # MLP and GPT, with and without remat
    python experiments/train.py --steps 200 --bf16

The data is text that ships with every Python: the source of a fixed list of
standard-library modules, read with ``inspect`` (no download). The GPT
predicts the next character; the dropout MLP predicts it from a one-hot
window of the previous 8. Each model trains twice from the same keys, with
and without remat; the loss curves must match (XLA may reassociate sums
differently, so "match" is within a printed tolerance). The script also
reports, from the compiler, the largest batch whose training step fits a
memory budget with remat and without, and saves a plot of the curves.

``sharded_train_step`` runs the same step on a device mesh (data parallel
plus FSDP parameter sharding) with remat inside; the tests check it against
the single-device step on 8 simulated CPU devices.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python experiments/train.py`
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments._io import save_figure
from remat_kit import models, targets
from remat_kit.report import compiled_memory, memory_report

CORPUS_MODULES = ("argparse", "dataclasses", "textwrap", "json.decoder", "json.encoder",
                  "inspect", "functools", "string", "difflib", "calendar")
VOCAB = 128
WINDOW = 8


def corpus() -> np.ndarray:
  """ASCII codes of the bundled text (about 400k characters)."""
  import importlib

  text = "".join(inspect.getsource(importlib.import_module(m)) for m in CORPUS_MODULES)
  return np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int32) % VOCAB


def batches(data: np.ndarray, batch: int, seq: int, seed: int) -> Callable[[int], np.ndarray]:
  """Step -> ``[batch, seq + 1]`` windows, the same for every run with this seed."""
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(data) - seq - 1, size=(10_000, batch))
  return lambda step: np.stack([data[s:s + seq + 1] for s in starts[step % len(starts)]])


def gpt_model(policy: Any, dtype: Any = jnp.float32, layers: int = 4) -> Any:
  return models.GPT(vocab_size=VOCAB, max_len=64, d_model=64, num_heads=4, num_layers=layers,
                    dropout_rate=0.1, dtype=dtype, policy=policy)


def gpt_loss(model: Any) -> Callable[..., jax.Array]:
  def loss(params: Any, chunk: jax.Array, key: jax.Array) -> jax.Array:
    logits = model.apply({"params": params}, chunk[:, :-1], rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, chunk[:, 1:]).mean()
  return loss


def mlp_model(checkpoint: bool) -> Any:
  return models.CheckpointedMLP(width=256, depth=4, num_outputs=VOCAB, dropout_rate=0.1,
                                checkpoint=checkpoint)


def mlp_loss(model: Any) -> Callable[..., jax.Array]:
  def loss(params: Any, chunk: jax.Array, key: jax.Array) -> jax.Array:
    x = jax.nn.one_hot(chunk[:, :WINDOW], VOCAB).reshape(chunk.shape[0], -1)
    logits = model.apply({"params": params}, x, rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, chunk[:, WINDOW]).mean()
  return loss


def train_step(loss: Callable[..., jax.Array], opt: optax.GradientTransformation
               ) -> Callable[..., tuple[Any, Any, jax.Array]]:
  def step(params: Any, state: Any, chunk: jax.Array, key: jax.Array) -> tuple[Any, Any, Any]:
    # optax and Flax's LayerNorm mix dtypes internally; our code does not rely on it
    with jax.numpy_dtype_promotion("standard"):
      value, grads = jax.value_and_grad(loss)(params, chunk, key)
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state, value
  return step


def init(model: Any, example: Any, key: jax.Array) -> Any:
  return jax.jit(lambda k: model.init({"params": k, "dropout": k}, example))(key)["params"]


def train(loss: Callable[..., jax.Array], params: Any, data: Callable[[int], np.ndarray],
          steps: int, label: str, lr: float = 3e-3) -> list[float]:
  """AdamW for ``steps`` steps; returns the loss curve. Prints a progress bar."""
  opt = optax.adamw(lr)
  state = opt.init(params)
  step = jax.jit(train_step(loss, opt))
  curve = []
  t0 = time.perf_counter()
  for i in range(steps):
    params, state, value = step(params, state, jnp.asarray(data(i)), jax.random.key(i))
    curve.append(float(value))
    if (i + 1) % max(1, steps // 20) == 0 or i + 1 == steps:
      done = 24 * (i + 1) // steps
      print(f"\r{label:28s} [{'#' * done}{'.' * (24 - done)}] {i + 1}/{steps} loss "
            f"{curve[-1]:.3f} {time.perf_counter() - t0:5.1f}s", end="", file=sys.stderr,
            flush=True)
  print(file=sys.stderr)
  return curve


def largest_batch(make_loss: Callable[[], Callable[..., jax.Array]], params: Any,
                  example: Callable[[int], np.ndarray], budget: int, limit: int = 1 << 16) -> int:
  """The largest power-of-two batch whose compiled training step peaks under ``budget``."""
  opt = optax.adamw(1e-3)
  step = train_step(make_loss(), opt)
  state = opt.init(params)
  best, batch = 0, 8
  while batch <= limit:
    peak = compiled_memory(step, params, state, jnp.asarray(example(batch)),
                           jax.random.key(0))["peak_bytes"]
    if peak > budget:
      break
    best, batch = batch, batch * 2
  return best


def fsdp_sharding(mesh: Mesh, tree: Any) -> Any:
  """Each array split over the ``fsdp`` axis along its largest divisible dimension."""
  n = mesh.shape["fsdp"]

  def spec(x: Any) -> NamedSharding:
    dims = sorted(range(x.ndim), key=lambda d: -x.shape[d])
    for d in dims:
      if x.shape[d] % n == 0:
        parts: list[Any] = [None] * x.ndim
        parts[d] = "fsdp"
        return NamedSharding(mesh, P(*parts))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map(spec, tree)


def sharded_train_step(loss: Callable[..., jax.Array], opt: optax.GradientTransformation,
                       mesh: Mesh, params: Any, state: Any) -> Callable[..., Any]:
  """The training step on ``mesh`` (axes ``data``, ``fsdp``): batch split over both axes,
  parameters and optimizer state sharded over ``fsdp``."""
  p_sh, s_sh = fsdp_sharding(mesh, params), fsdp_sharding(mesh, state)
  batch_sh = NamedSharding(mesh, P(("data", "fsdp")))
  return jax.jit(train_step(loss, opt), in_shardings=(p_sh, s_sh, batch_sh, None),
                 out_shardings=(p_sh, s_sh, None))


def plot(curves: dict[str, list[float]], path: Path) -> None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot written (pip install matplotlib).")
    return
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for label, c in curves.items():
    ax.plot(c, label=label, lw=1, ls="--" if "remat" in label and "no" not in label else "-")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.legend(fontsize=7)
  save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--bf16", action="store_true", help="bf16 activations, fp32 weights (GPT)")
  ap.add_argument("--budget-mib", type=float, default=256.0,
                  help="memory budget for the largest-batch search")
  ap.add_argument("--plot", type=Path, default=Path(__file__).parent / "results" / "train.png")
  args = ap.parse_args(argv)
  if args.steps < 1 or args.batch < 1:
    ap.error(f"--steps and --batch must be >= 1, got {args.steps}, {args.batch}")
  text = corpus()
  print(f"corpus: {len(text):,} characters of Python stdlib source ({', '.join(CORPUS_MODULES)})")
  dtype = jnp.bfloat16 if args.bf16 else jnp.float32
  data = batches(text, args.batch, 64, seed=0)
  curves, ok = {}, True
  with jax.numpy_dtype_promotion("standard"):
    gpt_params = init(gpt_model(False, dtype), jnp.asarray(data(0))[:, :-1], jax.random.key(0))
    mlp_params = init(mlp_model(False), jnp.zeros((args.batch, WINDOW * VOCAB)),
                      jax.random.key(0))
    for name, make, params in [
        ("GPT", lambda remat: gpt_loss(gpt_model("save_dots" if remat else False, dtype)),
         gpt_params),
        ("MLP", lambda remat: mlp_loss(mlp_model(remat)), mlp_params)]:
      off = train(make(False), params, data, args.steps, f"{name} without remat")
      on = train(make(True), params, data, args.steps, f"{name} with remat")
      diff = max(abs(a - b) for a, b in zip(off, on))
      same = diff <= 1e-4 * max(abs(x) for x in off)
      ok &= same
      curves[f"{name} no remat"], curves[f"{name} remat"] = off, on
      verdict = "bitwise equal" if diff == 0 else "match" if same else "DIFFER"
      print(f"{name}: final loss {off[-1]:.4f} without remat, {on[-1]:.4f} with; max |diff| "
            f"over {args.steps} steps {diff:.2e} ({verdict})")
    budget = int(args.budget_mib * 2**20)
    example = lambda b: np.stack([text[i:i + 65] for i in range(b)])
    plain = largest_batch(lambda: gpt_loss(gpt_model(False, dtype)), gpt_params, example, budget)
    remat = largest_batch(lambda: gpt_loss(gpt_model(True, dtype)), gpt_params, example, budget)
    print(f"largest GPT batch under {args.budget_mib:.0f} MiB (compiler peak, "
          f"{jax.default_backend()}): {plain} without remat, {remat} with full remat "
          f"({remat / max(plain, 1):.1f}x)")
    for dt in (jnp.float32, jnp.bfloat16):
      rep = memory_report(gpt_loss(gpt_model(False, dt)), gpt_params, jnp.asarray(data(0)),
                          jax.random.key(0), live=False)
      print(f"GPT residual activations at {jnp.dtype(dt).name} activations: "
            f"{rep.activation_bytes / 2**20:.2f} MiB")
  if targets.can_offload():
    off_loss = gpt_loss(gpt_model("offload_dots", dtype))
    with jax.numpy_dtype_promotion("standard"):
      rep = memory_report(off_loss, gpt_params, jnp.asarray(data(0)), jax.random.key(0),
                          live=False)
    host = sum(r.bytes for r in rep.residuals if r.memory == "host")
    opt = optax.adamw(3e-3)
    mem = compiled_memory(train_step(off_loss, opt), gpt_params, opt.init(gpt_params),
                          jnp.asarray(data(0)), jax.random.key(0))
    steps = min(args.steps, 10)
    curve = train(off_loss, gpt_params, data, steps, "GPT, offload_dots")
    ref = curves["GPT no remat"][:steps]
    print(f"offload_dots train step: {host / 2**20:.2f} MiB of residuals marked for "
          f"pinned_host; compiler host temp {mem.get('host_temp_size', 0) / 2**20:.2f} MiB, "
          f"device temp {mem['temp_size'] / 2**20:.2f} MiB"
          + (" (XLA:CPU has one memory)" if jax.default_backend() == "cpu" else "")
          + f"; {steps} steps, max |loss diff| vs no remat "
          f"{max(abs(x - y) for x, y in zip(curve, ref)):.2e}")
  else:
    print(f"offload: the {jax.default_backend()} backend has no pinned_host memory; "
          "offload policies are not run here.")
  args.plot.parent.mkdir(parents=True, exist_ok=True)
  plot(curves, args.plot)
  return 0 if ok else 1


if __name__ == "__main__":
  raise SystemExit(main())
