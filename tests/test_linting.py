"""lint's compiled rules, on a model written without remat_kit in mind."""

import jax
import jax.numpy as jnp
import optax
import pytest

import remat_kit as rk
from remat_kit.models import TransformerLM
from remat_kit.report import compiled
from remat_kit.report.table import format_bytes


def _lm_loss(policy):
  lm = TransformerLM(vocab_size=512, emb_dim=128, num_heads=2, num_layers=2, mlp_dim=512,
                     max_len=128, deterministic=True, remat=policy)
  tok = jax.ShapeDtypeStruct((2, 128), jnp.int32)
  with jax.numpy_dtype_promotion("standard"):
    params = jax.eval_shape(lambda: lm.init(jax.random.key(0), jnp.ones((2, 128), jnp.int32)))

  def loss(params, tokens):
    logits = lm.apply(params, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

  return loss, params, tok


@pytest.mark.slow
def test_offload_that_costs_device_memory_is_flagged_and_readouts_share_one_compile():
  """JAX's offload_dot_with_no_batch_dims on the H100 compiler: the device peak is above
  that of saving the same dots on the device, so lint says so, with both figures. The
  readouts on one function and target compile it once."""
  policy = jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  loss, params, tok = _lm_loss(policy)
  compiled.clear_cache()
  before = compiled.cache_info()
  with jax.numpy_dtype_promotion("standard"):
    rep = rk.memory_report(loss, params, tok, target="gpu:h100", live=False)
    peak = rk.explain_peak(loss, params, tok, target="gpu:h100")
    warnings = {w.code: w.message for w in rk.lint(loss, params, tok, target="gpu:h100")}
  info = compiled.cache_info()
  # one compile of the function (memory_report), reused by explain_peak and lint; one of
  # the reference that keeps the offloaded tensors on the device (lint's question)
  assert info["misses"] - before["misses"] == 2
  assert info["hits"] - before["hits"] >= 2
  assert rep.peak.peak_bytes == peak.peak_bytes
  assert any(r.memory == "host" for r in rep.residuals)
  msg = warnings["offload-costs-memory"]
  assert f"device peak is {format_bytes(peak.peak_bytes)} against" in msg
  assert "save_dots_no_batch" in msg
  # the same dots saved on the device: no offload, nothing to say
  loss2, params2, tok2 = _lm_loss(jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  with jax.numpy_dtype_promotion("standard"):
    codes = [w.code for w in rk.lint(loss2, params2, tok2, target="gpu:h100")]
  assert "offload-costs-memory" not in codes


# --------------------------------------------------------------------------
# lint: silent no-ops
# --------------------------------------------------------------------------
def _mlp(after_gelu):
  def layer(p, x):
    if after_gelu:
      h = rk.checkpoint_name(jax.nn.gelu(x @ p["up"]), "hidden")
      return x + h @ p["down"]
    h = rk.checkpoint_name(x @ p["up"], "hidden")
    return x + jax.nn.gelu(h) @ p["down"]
  return layer


def _stack(layer):
  def loss(params, x):
    for p in params:
      x = layer(p, x)
    return jnp.sum(x)
  return loss


D = 32
PARAMS = [{"up": jnp.ones((D, 4 * D)) / D, "down": jnp.ones((4 * D, D)) / D}] * 3
X = jnp.ones((256, D))


def _codes(fn, *args, target=None):
  return [w.code for w in rk.lint(fn, *args, target=target)]


def test_lint_dominated_flags_a_name_after_the_nonlinearity_only():
  bad = _stack(rk.remat(_mlp(True), policy="save:hidden"))
  good = _stack(rk.remat(_mlp(False), policy="save:hidden"))
  assert "dominated" in _codes(bad, PARAMS, X)
  assert "dominated" not in _codes(good, PARAMS, X)
  msg = next(str(w) for w in rk.lint(bad, PARAMS, X) if w.code == "dominated")
  assert "pre-activation" in msg and "policy='full'" in msg


def test_lint_no_effect_when_the_compiler_keeps_what_remat_drops():
  """The lint fires exactly when the compiled temp does not shrink. XLA:CPU merged the
  recomputation back in a Python loop up to JAX 0.10 (not from 0.11 on); a scan keeps
  the saving on every version."""
  loop = _stack(rk.remat(_mlp(False), policy="full"))
  temp = lambda f: rk.report.compiled_memory(jax.grad(f), PARAMS, X)["temp_size"]
  undone = temp(loop) >= 0.99 * temp(_stack(_mlp(False)))
  assert ("no-effect" in _codes(loop, PARAMS, X)) == undone
  if undone:
    assert "XLA:CPU" in str(next(w for w in rk.lint(loop, PARAMS, X) if w.code == "no-effect"))
  # remat of a layer whose backward reads only its inputs saves nothing on any compiler
  linear = _stack(rk.remat(lambda p, x: x * jnp.mean(p["up"]), policy="full"))
  assert "no-effect" in _codes(linear, PARAMS, X)

  def body(x, p):
    return _mlp(False)(p, x), None

  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *PARAMS)
  scanned = lambda ps, x: jnp.sum(rk.remat_scan(body, x, ps, policy="full")[0])
  assert "no-effect" not in _codes(scanned, stacked, X)
