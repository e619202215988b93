"""PyTorch's `activation_memory_budget` on the reference GPT: saved bytes and recompute.

Run by ``experiments/auto_remat_frontier.py`` in a Python 3.11 venv of its own with
``torch==2.13.0`` (CPU) and numpy (``.venv-torch``: outside remat_kit's lock and
dependencies). It imports neither JAX nor remat_kit.

It builds the same pre-LN GPT as ``remat_kit.models.GPT`` (Flax), loads the JAX
model's weights from ``--weights`` (an ``.npz``), checks that its loss equals the
JAX loss given, then for each budget ratio compiles the training step with
``aot_module_simplified`` and ``min_cut_rematerialization_partition`` under
``torch._functorch.config.activation_memory_budget`` and records:

* ``saved_bytes``: the backward graph's inputs that are activations (neither a
  parameter, an input of the step, nor an incoming gradient);
* ``recompute_matmul_flops``: the matmul FLOPs of the backward graph
  (``torch.utils.flop_counter.FlopCounterMode``) beyond those of the budget-1.0
  graph, which recomputes nothing.

  .venv-torch/bin/python experiments/torch_budget.py --weights w.npz --out t.json \
      --loss 5.54 --layers 4 --d-model 256 --heads 4 --seq 256 --batch 4 --vocab 256
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch.utils.flop_counter import FlopCounterMode

BUDGETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
EPS = 1e-6  # Flax's LayerNorm


class GPT(torch.nn.Module):
  """remat_kit.models.GPT in PyTorch: pre-LN blocks, fused qkv, materialized softmax."""

  def __init__(self, w: dict[str, np.ndarray], layers: int, heads: int):
    super().__init__()
    t = lambda a: torch.nn.Parameter(torch.tensor(a, dtype=torch.float32))
    self.tok, self.pos = t(w["Embed_0/embedding"]), t(w["pos_embed"])
    self.heads, self.layers = heads, layers
    self.p = torch.nn.ParameterDict()
    for k, v in w.items():
      self.p[k.replace("/", "__")] = t(v)

  def w(self, name: str) -> torch.Tensor:
    return self.p[name.replace("/", "__")]

  def ln(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], self.w(prefix + "/scale"), self.w(prefix + "/bias"), EPS)

  def dense(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
    return x @ self.w(prefix + "/kernel") + self.w(prefix + "/bias")

  def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    b, s = tokens.shape
    x = self.tok[tokens] + self.pos[None, :s]
    mask = torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None]
    for i in range(self.layers):
      pre = f"blocks/layers_{i}/"
      qkv = self.dense(self.ln(x, pre + "LayerNorm_0"), pre + "Dense_0")
      d = qkv.shape[-1] // 3
      dh = d // self.heads
      q, k, v = (u.reshape(b, s, self.heads, dh) for u in qkv.split(d, dim=-1))
      scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
      scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
      probs = torch.softmax(scores, dim=-1)
      o = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d)
      x = x + self.dense(o, pre + "Dense_1")
      h = self.dense(self.ln(x, pre + "LayerNorm_1"), pre + "Dense_2")
      h = F.gelu(h, approximate="tanh")
      x = x + self.dense(h, pre + "Dense_3")
    logits = self.dense(self.ln(x, "LayerNorm_0"), "Dense_0")
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, targets[..., None]).mean()


def _bytes(val: object) -> int:
  return int(val.numel()) * val.element_size()  # type: ignore[attr-defined]


def measure(model: GPT, tokens: torch.Tensor, targets: torch.Tensor, budget: float
            ) -> dict[str, float]:
  """Compiles one training step at ``budget``; its saved bytes and backward FLOPs."""
  functorch_config.activation_memory_budget = budget
  graphs: dict[str, torch.fx.GraphModule] = {}

  def keep(name: str):
    def compiler(gm: torch.fx.GraphModule, example_inputs: list) -> object:
      graphs[name] = gm
      return gm.forward
    return compiler

  def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    return aot_module_simplified(gm, example_inputs, fw_compiler=keep("fw"),
                                 bw_compiler=keep("bw"),
                                 partition_fn=min_cut_rematerialization_partition)

  torch._dynamo.reset()
  step = torch.compile(model, backend=backend, fullgraph=True)
  model.zero_grad()
  loss = step(tokens, targets)
  loss.backward()
  bw = graphs["bw"]
  saved, inputs = 0, []
  for node in bw.graph.nodes:
    if node.op != "placeholder":
      continue
    val = node.meta.get("val")
    inputs.append(val)
    if not hasattr(val, "numel") or node.name.startswith(("primals", "tangents")):
      continue
    saved += _bytes(val)
  args = [torch.randn(v.shape, dtype=v.dtype) if v.dtype.is_floating_point
          else torch.zeros(v.shape, dtype=v.dtype) if hasattr(v, "shape") else v
          for v in inputs]
  with FlopCounterMode(display=False) as counter:
    bw(*args)
  return {"budget": budget, "saved_bytes": saved, "backward_flops": counter.get_total_flops(),
          "loss": float(loss)}


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--weights", required=True)
  ap.add_argument("--inputs", required=True, help="an .npz with tokens and targets")
  ap.add_argument("--out", required=True)
  ap.add_argument("--loss", type=float, required=True, help="the JAX model's loss")
  ap.add_argument("--layers", type=int, required=True)
  ap.add_argument("--heads", type=int, required=True)
  a = ap.parse_args()
  torch.manual_seed(0)
  w = dict(np.load(a.weights))
  io = np.load(a.inputs)
  tokens = torch.tensor(io["tokens"], dtype=torch.long)
  targets = torch.tensor(io["targets"], dtype=torch.long)
  model = GPT(w, a.layers, a.heads)
  with torch.no_grad():
    eager = float(model(tokens, targets))
  if not math.isclose(eager, a.loss, rel_tol=1e-5, abs_tol=1e-6):
    raise SystemExit(f"torch_budget: the PyTorch loss {eager!r} differs from JAX's {a.loss!r}: "
                     "not the same model.")
  rows = []
  for b in BUDGETS:
    t0 = time.perf_counter()
    rows.append(measure(model, tokens, targets, b))
    rows[-1]["seconds"] = time.perf_counter() - t0
    print(f"torch budget {b:4.2f}: saved {rows[-1]['saved_bytes'] / 2**20:8.2f} MiB, backward "
          f"{rows[-1]['backward_flops'] / 1e9:7.3f} GFLOP", flush=True)
  base = next(r for r in rows if r["budget"] == 1.0)["backward_flops"]
  for r in rows:
    r["recompute_matmul_flops"] = r["backward_flops"] - base
  with open(a.out, "w") as f:
    json.dump({"torch": torch.__version__, "loss_torch": eager, "loss_jax": a.loss,
               "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
