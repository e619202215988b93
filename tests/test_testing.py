"""remat_kit.testing: each assertion passes on correct code and fails, naming the cause,
on a wrong policy or a changed saved set."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import remat_kit as rk
from remat_kit import models
from remat_kit import testing as rkt


def loss(w, x):
  h = rk.checkpoint_name(jnp.sin(x @ w), "h")
  return jnp.sum(jnp.cos(h) @ w)


W, X = jnp.eye(4) / 2 + 0.1, jnp.ones((3, 4))


# --------------------------------------------------------------------------
# assert_remat_equivalent
# --------------------------------------------------------------------------
def test_equivalent_passes_for_a_function_every_variant():
  rkt.assert_remat_equivalent(loss, W, X, policies=["full", "save:h", "save_dots"])


def test_equivalent_fails_naming_policy_variant_and_leaf(monkeypatch):
  """A remat that changes the function (a policy bug, simulated) is caught."""
  real = rkt.remat

  def broken(fn, policy):
    f = real(fn, policy=policy)
    return lambda w, x: f(w * 1.001, x)

  monkeypatch.setattr(rkt, "remat", broken)
  with pytest.raises(AssertionError, match=r"policy 'full' \((classic|remat3), no jit\): "
                                           r"output: leaf \(root\) differs by up to"):
    rkt.assert_remat_equivalent(loss, W, X, policies=["full"])


def test_equivalent_for_a_linen_module_with_dropout():
  x = jnp.ones((4, 8))
  rkt.assert_remat_equivalent(models.HiddenLayer(8, 0.5), x, True, static_argnames="train",
                              policies=["full", "save:dense"], rtol=1e-5)


def test_equivalent_for_an_nnx_module():
  m = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  rkt.assert_remat_equivalent(m, jnp.ones((2, 4)), policies=["full"])


def test_equivalent_rejects_bad_input():
  with pytest.raises(ValueError, match="scalar loss"):
    rkt.assert_remat_equivalent(lambda x: x * 2, jnp.ones(3))
  with pytest.raises(ValueError, match="unknown policy 'fulll'"):
    rkt.assert_remat_equivalent(loss, W, X, policies=["fulll"])
  with pytest.raises(ValueError, match="example inputs"):
    rkt.assert_remat_equivalent(nn.Dense(3))
  with pytest.raises(TypeError, match="function or a Flax module"):
    rkt.assert_remat_equivalent(3, W)


# --------------------------------------------------------------------------
# assert_saves
# --------------------------------------------------------------------------
def test_saves_exactly_and_at_least():
  rkt.assert_saves(rk.remat(loss, policy="save:h"), W, X, names=["h"])
  plain = lambda w, x: jnp.sum(rk.checkpoint_name(jnp.sin(x @ w), "h") @ w)  # dW reads h
  rkt.assert_saves(plain, W, X, names=["h"], exact=False)
  with pytest.raises(AssertionError, match="saved but not asked for"):
    rkt.assert_saves(plain, W, X, names=[])


def test_saves_fails_listing_what_was_saved():
  with pytest.raises(AssertionError, match=r"not saved: \['h'\].*Saved: nothing"):
    rkt.assert_saves(rk.remat(loss, policy="full"), W, X, names=["h"])
  with pytest.raises(AssertionError, match="more than max_bytes=10"):
    rkt.assert_saves(rk.remat(loss, policy="save:h"), W, X, names=["h"], max_bytes=10)
  with pytest.raises(TypeError, match=r"names=\['h'\]"):
    rkt.assert_saves(loss, W, X, names="h")


# --------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------
def test_fingerprint_pins_and_catches_a_changed_saved_set(tmp_path):
  path = tmp_path / "fp" / "loss.json"
  rkt.assert_fingerprint(rk.remat(loss, policy="save:h"), W, X, expected=path)  # writes
  record = json.loads(path.read_text())
  assert [r["label"] for r in record["residuals"]] == ["h"] and record["temp_bytes"] >= 0
  rkt.assert_fingerprint(rk.remat(loss, policy="save:h"), W, X, expected=path)  # same: passes
  with pytest.raises(AssertionError, match=r"- no longer saved: h float32\[3, 4\]"):
    rkt.assert_fingerprint(rk.remat(loss, policy="full"), W, X, expected=path)


def test_fingerprint_update_rewrites(tmp_path, monkeypatch):
  path = tmp_path / "f.json"
  rkt.assert_fingerprint(rk.remat(loss, policy="save:h"), W, X, expected=path)
  monkeypatch.setenv(rkt.UPDATE_ENV, "1")
  rkt.assert_fingerprint(rk.remat(loss, policy="full"), W, X, expected=path)
  assert json.loads(path.read_text())["residuals"] == []


# --------------------------------------------------------------------------
# Recompute determinism
# --------------------------------------------------------------------------
def test_recompute_deterministic_passes_on_cpu():
  rkt.assert_recompute_deterministic(loss, W, X, policy="full")


def test_recompute_that_differs_is_caught():
  """A value whose recomputation differs from the forward (simulated with an RNG that
  is not replayed) fails, naming it."""
  state = {"n": 0}

  def noisy(w, x):
    def bump(v):
      state["n"] += 1
      return v + 1e-3 * state["n"]
    noise = jax.pure_callback(bump, jax.ShapeDtypeStruct((3, 4), x.dtype),
                              jax.lax.stop_gradient(x @ jnp.ones((4, 4))))
    h = rk.checkpoint_name(jnp.sin(x @ w + noise), "h")
    return jnp.sum(jnp.sin(h) @ w)

  with pytest.raises(AssertionError, match="'h' recomputed in the backward pass"):
    rkt.assert_recompute_deterministic(noisy, W, X, policy="full")


def test_recompute_needs_tags_that_are_recomputed():
  with pytest.raises(ValueError, match="tags no values"):
    rkt.assert_recompute_deterministic(lambda w, x: jnp.sum(jnp.sin(x @ w)), W, X)
  with pytest.raises(ValueError, match="recomputes none"):
    rkt.assert_recompute_deterministic(loss, W, X, policy="no_remat")


# --------------------------------------------------------------------------
# The plugin
# --------------------------------------------------------------------------
def test_remat_impl_fixture_switches_the_implementation(remat_impl):
  from remat_kit import _jax
  assert remat_impl in rkt.implementations()
  if _jax.has_remat3():
    assert _jax.remat3_enabled() == (remat_impl == "remat3")


def test_plugin_option_is_registered(pytestconfig):
  assert pytestconfig.getoption("--remat-update-fingerprints") in (False, True)


def test_the_docs_pytest_example_runs(tmp_path):
  """The testing page's test file, run by pytest as a user would (the plugin from the install)."""
  import os
  import re
  import subprocess
  import sys
  from pathlib import Path
  readme = (Path(__file__).parent.parent / "docs" / "testing.md").read_text()
  block = re.search(r"<!-- pytest-example -->\n```python\n(.*?)```", readme, re.S).group(1)
  (tmp_path / "test_my_model.py").write_text(block)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *extra: subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra],
      cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
  first = run()
  assert first.returncode == 0, first.stdout + first.stderr
  assert (tmp_path / "loss.fingerprint.json").exists()
  n = 5 if len(rkt.implementations()) == 2 else 4
  assert f"{n} passed" in first.stdout


def test_plugin_and_testing_agree_on_the_update_variable():
  import pytest_remat_kit
  assert pytest_remat_kit.UPDATE_ENV == rkt.UPDATE_ENV


def test_the_plugin_imports_no_jax(tmp_path):
  """pytest loads the plugin (an entry point) before any conftest.py: it must not import
  JAX, so a conftest can still set JAX_PLATFORMS (the CUDA plugin reads it at startup)."""
  import subprocess
  import sys
  code = "import sys, pytest_remat_kit; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
