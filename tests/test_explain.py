"""remat_kit.report.explain and the residual accounting: one count per buffer, credit by
provenance."""


import jax.numpy as jnp
from _facts import TANH_DERIVATIVE
from _util import activation_bytes

import remat_kit as rk
from remat_kit.report import saved_residuals


# --------------------------------------------------------------------------
# One buffer, one count
# --------------------------------------------------------------------------
def test_a_named_tanh_output_is_one_buffer():
  """h is the tanh output: kept once, with 1 - tanh**2 (129,024 bytes were reported)."""
  def f(w1, w2, x):
    h = rk.checkpoint_name(jnp.tanh(x @ w1), "h")
    return jnp.sum(h @ w2)

  args = jnp.ones((64, 168)), jnp.ones((168, 4)), jnp.ones((64, 64))
  assert activation_bytes(f, *args) == 86_016
  rows = [r for r in saved_residuals(f, *args) if r.kind == "activation"]
  assert sorted(r.primitive for r in rows) == sorted([TANH_DERIVATIVE, "tanh"])
  assert next(r for r in rows if r.primitive == "tanh").names == ("h",)


def test_a_buffer_reached_by_two_names_and_a_reshape_is_one_row_with_both_names():
  def f(w, v, x):
    y = jnp.exp(x @ w)  # exp's derivative reads y; a @ v and b * b read a and b: one buffer
    a = rk.checkpoint_name(y, "a")
    b = rk.checkpoint_name(y.reshape(-1), "b")
    return jnp.sum(a @ v) + jnp.sum(b * b)

  rows = [r for r in saved_residuals(f, jnp.ones((4, 4)), jnp.ones((4, 3)), jnp.ones((2, 4)))
          if r.kind == "activation"]
  assert len(rows) == 1 and set(rows[0].names) == {"a", "b"} and rows[0].bytes == 32


def test_a_cast_to_another_dtype_is_another_buffer():
  def f(w, x):
    y = rk.checkpoint_name(jnp.exp(x @ w), "y")
    yb = y.astype(jnp.bfloat16)
    return jnp.sum(y * y) + jnp.sum(yb * yb).astype(jnp.float32)

  rows = [r for r in saved_residuals(f, jnp.ones((4, 4)), jnp.ones((2, 4)))
          if r.kind == "activation"]
  assert {r.dtype for r in rows} == {"float32", "bfloat16"}


# --------------------------------------------------------------------------
# Credit by provenance
# --------------------------------------------------------------------------
def test_a_residual_made_outside_remat_is_not_credited_to_its_policy(remat_impl):
  """x @ w is computed outside the remat: shape matching used to credit it to the policy."""
  inner = rk.remat(lambda w, y: jnp.sum(jnp.sin(y @ w.T)), policy="full")
  g = lambda w, x: inner(w, (x @ w) ** 2)
  rep = rk.memory_report(g, jnp.ones((32, 32)), jnp.ones((16, 32)), live=False,
                         before_xla=True)
  # As compiled: the remat's input, and x @ w (which the square's derivative reads).
  acts = [r for r in rep.residuals if r.kind == "activation"]
  assert acts and not any("saved by policy" in r.rule for r in acts)
  rules = {r.primitive: r.rule for r in acts}
  assert rules["integer_pow"].startswith("the input of a remat")
  assert rules["dot_general"] == "kept by autodiff outside remat"
  # Before XLA, autodiff keeps 2 * (x @ w) instead; XLA keeps the product it came from.
  before = {r.primitive: r.rule for r in rep.residuals_before_xla if r.kind == "activation"}
  assert before["integer_pow"].startswith("the input of a remat")
  assert before["mul"] == "kept by autodiff outside remat"


def test_a_residual_saved_inside_a_scanned_remat_is_credited_to_its_name(remat_impl):
  def body(c, w):
    h = rk.checkpoint_name(c @ w, "pre")
    return jnp.tanh(h), None

  f = lambda ws, x: jnp.sum(rk.remat_scan(body, x, ws, policy="save:pre")[0])
  rep = rk.memory_report(f, jnp.ones((4, 8, 8)), jnp.ones((2, 8)), live=False)
  pre = [r for r in rep.residuals if "pre" in r.names]
  assert pre and all("saved by policy" in r.rule and "'pre'" in r.rule for r in pre)
