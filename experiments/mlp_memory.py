"""The seeds' comparison: peak memory of the dropout MLP with and without checkpointing.

    python -m experiments.mlp_memory --checkpoint true
    python -m experiments.mlp_memory --checkpoint false

The JAX counterpart of the PyTorch reference, which prints "Peak GPU memory
usage: X MB with Checkpoint = True/False". On a GPU or TPU the figure is the
device's live peak (``memory_stats()["peak_bytes_in_use"]``) after one
training step, in this fresh process. On CPU there is no live counter: the
figure is XLA's compiled estimate (temp + arguments + outputs), labelled as
such. ``--layout scan`` runs the hidden layers as a scanned stack, the layout
in which XLA:CPU keeps remat's saving (in a Python loop, XLA:CPU merges the
recomputation back into the forward pass; XLA:GPU does not).
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import optax

from remat_kit import models
from remat_kit.flax import LayerStack
from remat_kit.report import compiled_memory, live_peak_bytes


class ScannedMLP(nn.Module):
  """The same MLP with its hidden layers as a `LayerStack` (remat on when ``policy``)."""

  width: int
  depth: int
  num_outputs: int
  policy: object

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = models.HiddenLayer(self.width, 0.1, name="input")(x, train)
    x = LayerStack(models.HiddenLayer(self.width, 0.1), self.depth, policy=self.policy,
                   name="hidden")(x, train)
    return nn.Dense(self.num_outputs, name="output")(x)


def _bool(s: str) -> bool:
  if s.lower() in ("true", "1", "yes"):
    return True
  if s.lower() in ("false", "0", "no"):
    return False
  raise argparse.ArgumentTypeError(f"--checkpoint takes true or false, got {s!r}")


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", type=_bool, required=True, help="true or false")
  ap.add_argument("--layout", choices=["loop", "scan"], default="loop")
  ap.add_argument("--batch", type=int, default=16384)
  ap.add_argument("--width", type=int, default=1024)
  ap.add_argument("--depth", type=int, default=4)
  args = ap.parse_args(argv)
  if args.layout == "loop":
    model = models.CheckpointedMLP(width=args.width, depth=args.depth,
                                   checkpoint=args.checkpoint)
  else:
    model = ScannedMLP(args.width, args.depth, 10, True if args.checkpoint else False)
  x = jax.random.normal(jax.random.key(0), (args.batch, args.width))
  y = jax.random.randint(jax.random.key(1), (args.batch,), 0, 10)
  params = model.init({"params": jax.random.key(2), "dropout": jax.random.key(3)}, x)["params"]
  opt = optax.adamw(1e-3)
  state = opt.init(params)

  def step(params, state, x, y, key):
    def loss(p):
      logits = model.apply({"params": p}, x, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  args_ = (params, state, x, y, jax.random.key(4))
  mem = compiled_memory(step, *args_)
  jax.block_until_ready(jax.jit(step)(*args_))
  live = live_peak_bytes()
  label = f"Checkpoint = {args.checkpoint} ({args.layout} layout)"
  if live is not None:
    print(f"Peak {jax.default_backend().upper()} memory usage: {live / 2**20:.1f} MB with "
          f"{label} [live, memory_stats()]; compiler estimate {mem['peak_bytes'] / 2**20:.1f} MB")
  else:
    print(f"Peak memory (compiler estimate, {jax.default_backend()} has no live counter): "
          f"{mem['peak_bytes'] / 2**20:.1f} MB with {label}")
    if jax.default_backend() == "cpu" and args.layout == "loop":
      print("note: XLA:CPU undoes remat in Python loops, so this estimate shows no saving; "
            "try --layout scan, or a GPU.")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
