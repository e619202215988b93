"""remat_kit._dispatch: classic remat or jax_remat3, decided in one place."""

import jax
import jax.numpy as jnp
import pytest
from _util import activation_bytes

import remat_kit as rk
from remat_kit import _dispatch, _jax
from remat_kit import policies as P

NEEDS_REMAT3 = pytest.mark.skipif(not _jax.has_remat3(), reason="this JAX has no jax_remat3")


@pytest.mark.parametrize("policy, kind", [
    (P.everything_saveable(), "skip"),
    (P.nothing_saveable(), "full"),
    (P.save_these_primitives("sin"), "classic"),
    (P.save_anything_except_these_names("h"), "classic"),
])
def test_plan_independent_of_jax_classes(policy, kind):
  for remat3 in (False, True):
    assert _dispatch.route(policy, remat3=remat3).kind == kind


def _loss(x):
  h = rk.checkpoint_name(jnp.sin(x @ x), "h")
  return jnp.sum(jnp.cos(h) @ x)


X = jnp.linspace(0.1, 1.0, 64).reshape(8, 8)


@NEEDS_REMAT3
@pytest.mark.parametrize("policy", [P.save_only_these_names("h"), P.dots_saveable(),
                                    P.save_any_names_but_these("other")], ids=repr)
def test_native_forms_under_remat3(policy):
  """The native form is JAX's class (0.10.2, 0.11) or the policy itself where remat3
  consults callables at every primitive it saves at (0.12); either way, handed to
  jax.checkpoint under remat3 it saves what the classic implementation saves."""
  assert _dispatch.route(policy, remat3=False) == ("classic", policy)
  kind, native = _dispatch.route(policy, remat3=True)
  assert kind == "native"
  if native is policy:
    assert policy.saving_primitives() <= _jax.remat3_consulted()
  else:
    assert type(native).__module__.startswith("jax")
  with _jax.remat3(False):
    classic = activation_bytes(jax.checkpoint(_loss, policy=policy), X)
  with _jax.remat3(True):
    assert activation_bytes(jax.checkpoint(_loss, policy=native), X) == classic > 0


@NEEDS_REMAT3
def test_third_party_wrappers_need_to_jax_policy():
  """Under jax_remat3, a remat_kit policy handed to jax.checkpoint saves nothing; the
  converted one saves what rk.remat saves."""
  pol = P.save_only_these_names("h")
  with _jax.remat3(True):
    raw = activation_bytes(jax.checkpoint(_loss, policy=pol), X)
    converted = activation_bytes(jax.checkpoint(_loss, policy=rk.to_jax_policy(pol)), X)
    ours = activation_bytes(rk.remat(_loss, policy=pol), X)
    full = activation_bytes(jax.checkpoint(_loss, policy=None), X)
  assert converted == ours > full
  if "name" in _jax.remat3_consulted():
    assert raw == ours  # JAX 0.11+: remat3 calls a callable at tags
  else:
    assert raw == full  # JAX 0.10.2: silently "save nothing"


@NEEDS_REMAT3
@pytest.mark.parametrize("policy", ["prims:sin", P.save_by_size(max_bytes=1024)], ids=repr)
def test_a_policy_remat3_does_not_consult_runs_classic_under_remat3(policy):
  """A policy that saves at primitives remat3 never asks about (sin, sizes) runs on the
  classic implementation, selected when the wrapper is built *and* when it is called."""
  pol = P.from_config(policy)
  assert _dispatch.route(pol, remat3=True).kind == "classic"
  with _jax.remat3(False):
    classic = activation_bytes(rk.remat(_loss, policy=pol), X)
  built = rk.remat(_loss, policy=pol)
  with _jax.remat3(True):
    called_under_remat3 = activation_bytes(built, X)
    full = activation_bytes(jax.checkpoint(_loss, policy=None), X)
  assert called_under_remat3 == classic > full


@NEEDS_REMAT3
def test_classic_remat_context_covers_build_and_call():
  """`classic_remat()` around a third-party wrapper's construction and call applies a
  policy remat3 ignores, on every JAX (0.11 decides at build, 0.12 at call)."""
  pol = P.save_these_primitives("sin")
  with _jax.remat3(False):
    want = activation_bytes(rk.remat(_loss, policy=pol), X)
  with _jax.remat3(True):
    with rk.classic_remat():
      ck = jax.checkpoint(_loss, policy=pol)
      got = activation_bytes(ck, X)
    full = activation_bytes(jax.checkpoint(_loss, policy=None), X)
  assert got == want > full


def test_to_jax_policy_special_cases_and_errors():
  assert rk.to_jax_policy("full") is None
  assert rk.to_jax_policy(False) is jax.checkpoint_policies.everything_saveable
  if _jax.has_remat3():
    with pytest.raises(ValueError, match=r"`to_jax_policy`.*SavePrimitives.*remat_kit.remat"):
      rk.to_jax_policy(P.save_these_primitives("sin"))
  else:  # no remat3: every callable is honoured as is
    assert rk.to_jax_policy("prims:sin") == P.save_these_primitives("sin")


def test_checkpoint_skips_save_everything_but_still_traces_its_inputs():
  f = _dispatch.checkpoint(_loss, P.everything_saveable())
  jaxpr = jax.make_jaxpr(f)(X).jaxpr
  assert not any(_jax.is_remat(e) for e in jaxpr.eqns)  # no boundary: no remat at all
  out = _dispatch.checkpoint(lambda x: x.sum(), P.everything_saveable())(3.0)
  assert isinstance(out, jax.Array) and float(out) == 3.0  # a float in, as jax.checkpoint
