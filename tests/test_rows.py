"""Every readout row names its tensor: the op that made it, the user's source line, its
`checkpoint_name`, the layer, its shape and dtype; buffers that hold no tensor of the
model say what they are. Checked against tensors worked out by hand (which tensor, which
shape, which line of the model), on the targets a user compiles for.
"""

import inspect

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import checkpoint_name

import remat_kit as rk
from remat_kit.models import gpt as gpt_module
from remat_kit.report import tensor

TARGETS = [None, "gpu:h100", "tpu:v5e:2x2"]
X, W = jnp.ones((256, 512)), jnp.ones((512, 512))
TENSOR = 256 * 512 * 4  # x @ w and its tanh: the one tensor the backward reads


def small(x, w):
  return jnp.sum(jnp.tanh(x @ w) ** 2)


SMALL_LINE = f"test_rows.py:{inspect.getsourcelines(small)[1] + 1}"


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t or "cpu")
def test_small_case_rows_on_every_target(target):
  rep = rk.memory_report(small, X, W, target=target)
  acts = [r for r in rep.residuals if r.kind == "activation"]
  # XLA:TPU fuses the forward matmul into the gradient's kernel: nothing is carried.
  assert len(acts) == (len(acts) if target == "tpu:v5e:2x2" else 1) <= 1
  for r in acts:
    assert (r.bytes, r.shape, r.dtype) == (TENSOR, (256, 512), "float32")
    assert r.primitive in ("dot_general", "tanh") and r.source.startswith(SMALL_LINE)
  assert rep.activation_bytes == TENSOR * len(acts)
  assert rep.by_name == {}  # no checkpoint_name, so no name: never a primitive
  assert all(r.kind in tensor.KINDS for r in rep.residuals)
  assert all(r.rule == tensor.KINDS[r.kind] for r in rep.residuals if r.kind != "activation")
  peak = rk.explain_peak(small, X, W, target=target)
  for r in peak.rows:
    if r.kind not in ("other", "packing", "tuple table"):  # a table of addresses
      assert r.dtype and (r.shape or r.bytes <= 16), r  # or a scalar
  # the peak's activations are the residuals' (a split matmul split the same way)
  assert peak.by_kind.get("activation", 0) <= rep.activation_bytes


def test_save_h_credits_h_in_the_compiled_view():
  def body(c, w):
    h = checkpoint_name(jnp.sin(c @ w), "h")
    return jnp.cos(h) @ w, None

  def loss(ws, c):
    return jnp.sum(rk.remat_scan(body, c, ws, policy="save:h")[0])

  rep = rk.memory_report(loss, jnp.ones((6, 32, 32)), jnp.ones((64, 32)))
  assert rep.by_name == {"h": 6 * 64 * 32 * 4}
  (h,) = [r for r in rep.residuals if r.name == "h"]
  assert "SaveNames(names=('h',))" in h.rule and "(name 'h')" in h.rule
  assert (h.layers, h.primitive, h.layer) == (6, "sin", "scan body")
  carry = [r for r in rep.residuals if r.primitive == "scan carry"]
  assert [(r.bytes, r.layers) for r in carry] == [(6 * 64 * 32 * 4, 6)]


def _gpt_loss(scan):
  gpt = rk.models.GPT(vocab_size=256, max_len=128, d_model=128, num_heads=4, num_layers=2,
                      policy=False, tags=False, scan=scan)
  tokens = jnp.zeros((4, 128), jnp.int32)
  params = jax.eval_shape(lambda: gpt.init({"params": jax.random.key(0),
                                            "dropout": jax.random.key(1)}, tokens))["params"]
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)

  def loss(params, tokens):
    logits = gpt.apply({"params": params}, tokens, rngs={"dropout": jax.random.key(2)})
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  return loss, params, tokens


def _line_of(text):
  """``gpt.py:<n>``: the line of the model's source that holds ``text``."""
  lines = inspect.getsource(gpt_module).splitlines()
  (n,) = [i for i, line in enumerate(lines, start=1) if text in line]
  return f"gpt.py:{n}"


def _at(r, line):
  return r.source.split(" (")[0] == line


def _check_named(rep):
  """Every row over 1% of the activations names its producing op (not the scan's
  stacking) and a line of the model's file (or of the loss, here)."""
  big = [r for r in rep.residuals if r.kind == "activation"
         and r.bytes > 0.01 * rep.activation_bytes]
  assert big
  for r in big:
    assert r.primitive not in (None, "", "?", "dynamic_update_slice", "parameter"), r
    assert r.source.startswith(("gpt.py:", "test_rows.py:")), r  # the model, the loss
  return big


def test_scanned_gpt_without_tags_on_h100_tells_its_tensors_apart():
  loss, params, tokens = _gpt_loss(scan=True)
  rep = rk.memory_report(loss, params, tokens, target="gpu:h100")
  big = _check_named(rep)
  softmax, gelu = _line_of("jax.nn.softmax(scores"), _line_of("nn.gelu(h)")
  probs = [r for r in big if _at(r, softmax)]
  masks = [r for r in big if r.dtype == "bool" and "Dropout" in r.layer]
  hidden = [r for r in big if _at(r, gelu)]
  assert probs and masks and hidden
  assert {id(r) for r in probs}.isdisjoint({id(r) for r in masks + hidden})
  # each attention probability tensor: batch 4, heads 4, 128x128, per layer (2 layers)
  assert all(r.shape == (2, 4, 4, 128, 128) and r.layers == 2 for r in probs)
  assert all(r.shape[-1] == 4 * 128 and "scan body" in r.layer for r in hidden)


def test_python_loop_gpt_rows_name_their_layer():
  loss, params, tokens = _gpt_loss(scan=False)
  rep = rk.memory_report(loss, params, tokens)
  big = _check_named(rep)
  layers = {r.layer.split("/")[2] for r in big if r.layer.startswith("GPT/blocks/")}
  assert layers == {"layers_0", "layers_1"}
  timeline = rk.memory_timeline(loss, params, tokens)
  (line,) = timeline.timelines.values()
  assert {b.layer.split("/")[2] for b in line.buffers
          if b.layer.startswith("GPT/blocks/")} >= {"layers_0", "layers_1"}
