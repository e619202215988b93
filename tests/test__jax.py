"""remat_kit._jax: what the JAX boundary finds in the installed JAX."""

import jax
import jax.numpy as jnp
import pytest

from remat_kit import _jax


def test_version_gate_and_report():
  assert _jax.JAX_VERSION >= _jax.MIN_JAX
  rep = _jax.version_report()
  assert rep["jax"] == jax.__version__
  assert rep["jax_remat3 flag"] == ("jax_remat3" in jax.config.values)


def _f(x):
  return jnp.sin(_jax.checkpoint_name(jnp.cos(x), "h"))


def test_names_and_remat_boundaries_are_recognised(remat_impl):
  closed = jax.make_jaxpr(jax.checkpoint(_f))(jnp.ones(3))
  (eqn,) = closed.jaxpr.eqns
  assert _jax.is_remat(eqn)
  body = _jax.remat_params(eqn)["jaxpr"]
  body = getattr(body, "jaxpr", body)
  names = [_jax.checkpoint_name_of(e.primitive, e.params) for e in body.eqns]
  assert names == [None, "h", None]
  assert not any(_jax.is_remat(e) for e in body.eqns)


def test_remat3_context_sets_and_restores(remat_impl):
  if not _jax.has_remat3():
    pytest.skip("this JAX has no jax_remat3")
  before = _jax.remat3_enabled()
  with _jax.remat3(not before):
    assert _jax.remat3_enabled() is (not before)
  assert _jax.remat3_enabled() is before


@pytest.mark.parametrize("value, expected", [(True, "Saveable"), (False, "Recompute")])
def test_ensure_decision(value, expected):
  assert _jax.ensure_decision(value) is getattr(_jax, expected)


def test_ensure_decision_rejects_other_values():
  with pytest.raises(TypeError, match="must return a bool"):
    _jax.ensure_decision("yes")


def test_jax_policy_names():
  cp = jax.checkpoint_policies
  assert _jax.jax_policy_names(cp.save_only_these_names("a", "b")) == {"a", "b"}
  assert _jax.jax_policy_names(cp.save_and_offload_only_these_names(
      names_which_can_be_saved=["s"], names_which_can_be_offloaded=["o"],
      offload_src="device", offload_dst="pinned_host")) == {"s", "o"}
