"""remat_kit._jax: what the JAX boundary finds in the installed JAX."""

import jax
import jax.numpy as jnp
import pytest

from remat_kit import _jax


def test_version_gate_and_report():
  assert _jax.JAX_VERSION >= _jax.MIN_JAX
  rep = _jax.version_report()
  assert rep["jax"] == jax.__version__


def test_the_remat3_flag_is_reported_where_it_changes_what_checkpoint_binds():
  """Behaviour, not the boundary's own test: with the flag, jax.checkpoint binds another
  primitive; without it, there is nothing to switch."""
  f = lambda x: jnp.sin(x).sum()
  bound = lambda: jax.make_jaxpr(jax.checkpoint(f))(jnp.ones(3)).jaxpr.eqns[0].primitive.name
  flag = _jax.version_report()["jax_remat3 flag"]
  assert flag == _jax.has_remat3()
  if not flag:
    with pytest.raises(Exception):  # noqa: B017 - whatever JAX raises for an unknown flag
      jax.config.update("jax_remat3", True)
    return
  with _jax.remat3(False):
    classic = bound()
  with _jax.remat3(True):
    assert bound() != classic


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


@pytest.mark.skipif(not hasattr(jax.ad_checkpoint, "checkpoint_name_fwd"),
                    reason="JAX 0.10 has no checkpoint_name_fwd")
def test_checkpoint_name_fwd_is_a_tag_under_both_implementations(remat_impl):
  f = lambda x: jnp.sin(jax.ad_checkpoint.checkpoint_name_fwd(jnp.cos(x), "fwd"))
  eqns = jax.make_jaxpr(f)(jnp.ones(3)).jaxpr.eqns
  assert [_jax.checkpoint_name_of(e.primitive, e.params) for e in eqns] == [None, "fwd", None]


def test_remat3_consulted_is_what_remat3_asks_a_callable_about():
  consulted = _jax.remat3_consulted()
  if not _jax.has_remat3():
    assert consulted == frozenset()
    return
  assert consulted <= {_jax.name_primitive_name(), "dot_general", "conv_general_dilated"}
  # a policy that saves at tags is honoured by remat3 exactly where the tag is consulted
  seen = []
  pol = lambda prim, *_, **params: seen.append(prim.name) or prim.name == "name"
  with _jax.remat3(True):
    jax.make_jaxpr(jax.grad(jax.checkpoint(lambda x: _f(x).sum(), policy=pol)))(jnp.ones(3))
  assert set(seen) == consulted - {"dot_general", "conv_general_dilated"}


def test_remat3_decided_at():
  if not _jax.has_remat3():
    pytest.skip("this JAX has no jax_remat3")
  when = _jax.remat3_decided_at()
  assert when in ("built", "called")
  with _jax.remat3(False):
    ck = jax.checkpoint(lambda x: x * 2.0)
  with _jax.remat3(True):
    (eqn,) = jax.make_jaxpr(ck)(1.0).jaxpr.eqns
  assert _jax.remat_uses_remat3(eqn) == (when == "called")


def test_memory_fields_read_every_field_and_refuse_an_unknown_object():
  compiled = jax.jit(lambda x: jnp.sin(x) @ x).lower(jnp.ones((8, 8))).compile()
  fields = _jax.memory_fields(compiled.memory_analysis())
  assert fields["argument_size"] == 8 * 8 * 4 and fields["output_size"] == 8 * 8 * 4
  assert set(fields) <= set(_jax.MEMORY_FIELDS)
  with pytest.raises(_jax.UnknownJaxStructure, match=r"jax \d.*temp_size_in_bytes"):
    _jax.memory_fields(object())
