"""Readouts checked against bytes and FLOPs worked out by hand."""

import jax
import jax.numpy as jnp
import pytest
from _util import activation_bytes
from jax import lax

import remat_kit as rk
from remat_kit.report import compiled_memory, count_flops, saved_residuals
from remat_kit.report.core import live_peak_bytes

B, D, H, OUT = 4, 8, 16, 3


def dense(w, b, x):
  return jnp.sum(jnp.tanh(x @ w + b[None, :]))


def mlp2(w1, w2, x):
  return jnp.sum(jnp.tanh(x @ w1) @ w2)


def _ones(*shape):
  return jnp.ones(shape, jnp.float32)


def test_dense_flops_follow_the_rule():
  # dot 2*B*D*H, add B*H, tanh B*H, reduce_sum B*H (broadcasting b is free)
  assert count_flops(dense, _ones(D, H), _ones(H), _ones(B, D)) == 2 * B * D * H + 3 * B * H


def test_mlp2_flops():
  # 2*B*D*H + B*H (tanh) + 2*B*H*OUT + B*OUT (sum)
  flops = count_flops(mlp2, _ones(D, H), _ones(H, OUT), _ones(B, D))
  assert flops == 2 * B * D * H + B * H + 2 * B * H * OUT + B * OUT


def test_scan_flops_multiply_the_trip_count():
  def f(ws, x):
    return lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0].sum()

  body = 2 * B * D * D + B * D
  assert count_flops(f, _ones(8, D, D), _ones(B, D)) == 8 * body + B * D


def test_while_loop_with_a_constant_counter_multiplies_its_trip_count():
  # 3 trips: body mul (2) + add (1) per trip; the condition `lt` is a comparison (0 FLOPs)
  f = lambda x: lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 2), (0, x))[1]
  assert count_flops(f, _ones(2)) == 3 * (2 + 1)


def test_while_loops_with_unknown_trip_counts_are_refused_with_a_fix():
  f = lambda x, n: lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] * 2), (0, x))[1]
  with pytest.raises(ValueError, match="while loop.*not a constant counter.*lax.scan"):
    count_flops(f, _ones(2), 3)


def test_dense_residual_bytes_by_policy():
  args = (_ones(D, H), _ones(H), _ones(B, D))
  assert activation_bytes(rk.remat(dense, policy="full"), *args) == 0
  rows = [r for r in saved_residuals(rk.remat(dense, policy="save_dots"), *args)
          if r.kind == "activation"]
  assert [(r.primitive, r.shape, r.bytes) for r in rows] == [("dot_general", (B, H), B * H * 4)]
  # the parameters and input are kept as arguments, never counted as activations
  kinds = {r.kind for r in saved_residuals(rk.remat(dense, policy="full"), *args)}
  assert kinds == {"argument"}


def test_scan_residuals_count_each_layer_and_separate_parameter_views():
  n = 8

  def f(ws, x):
    c, _ = rk.remat_scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws, policy="full")
    return c.sum()

  rows = saved_residuals(f, _ones(n, D, D), _ones(B, D))
  acts = [r for r in rows if r.kind == "activation"]
  # full remat in a scan keeps one carry per layer: (n, B, D) float32
  assert [(r.shape, r.bytes) for r in acts] == [((n, B, D), n * B * D * 4)]


def test_compiled_memory_fields():
  m = compiled_memory(jax.grad(dense), _ones(D, H), _ones(H), _ones(B, D))
  assert m["backend"] == jax.default_backend()
  assert m["argument_size"] == (D * H + H + B * D) * 4
  assert m["output_size"] == D * H * 4
  # The gradient holds at least its arguments and its output at once.
  assert m["peak_bytes"] >= m["argument_size"] + m["output_size"] - m["alias_size"]
  assert m["peak_bytes"] >= m["temp_size"] > 0


def test_live_peak_is_none_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("CPU-only statement")
  assert live_peak_bytes() is None


def test_a_compilations_total_flops_are_count_flops_of_what_it_compiled():
  """From the program already traced: the gradient's, and a whole (sliced) step's."""
  w, x = jnp.full((16, 32), 0.1), jnp.ones((64, 16))

  def loss(w, x):
    return jnp.mean(jnp.tanh(rk.remat(lambda x: x @ w, policy="full")(x)) ** 2)

  g = rk.report.compilation(loss, (w, x), {})
  assert g.total_flops() == g.flops()["total"] == count_flops(jax.grad(loss), w, x) > 0
  step = rk.microbatched_value_and_grad(loss, 4, batch_argnums=1)
  s = rk.report.compilation(step, (w, x), {}, grad=False)
  assert s.total_flops() == count_flops(step, w, x) > 0
