"""remat_kit._dispatch: classic remat or jax_remat3, decided in one place."""

import jax
import jax.numpy as jnp
import pytest

import remat_kit as rk
from remat_kit import _dispatch, _jax
from remat_kit import policies as P
from remat_kit.report import activation_bytes

NEEDS_REMAT3 = pytest.mark.skipif(not _jax.has_remat3(), reason="this JAX has no jax_remat3")


@pytest.mark.parametrize("policy, kind", [
    (P.everything_saveable(), "skip"),
    (P.nothing_saveable(), "full"),
    (P.save_these_primitives("sin"), "classic"),
    (P.save_anything_except_these_names("h"), "classic"),
])
def test_plan_independent_of_jax_classes(policy, kind):
  for remat3 in (False, True):
    assert _dispatch.plan(policy, remat3=remat3).kind == kind


@NEEDS_REMAT3
@pytest.mark.parametrize("policy", [P.save_only_these_names("h"), P.dots_saveable(),
                                    P.save_any_names_but_these("h")], ids=repr)
def test_native_forms_under_remat3(policy):
  assert _dispatch.plan(policy, remat3=False) == ("classic", policy)
  kind, native = _dispatch.plan(policy, remat3=True)
  assert kind == "native" and type(native).__module__.startswith("jax")


def _loss(x):
  h = rk.checkpoint_name(jnp.sin(x @ x), "h")
  return jnp.sum(jnp.cos(h) @ x)


X = jnp.linspace(0.1, 1.0, 64).reshape(8, 8)


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
  assert raw == full  # silently "save nothing"
  assert converted == ours > full


def test_to_jax_policy_special_cases_and_errors():
  assert rk.to_jax_policy("full") is None
  assert rk.to_jax_policy(False) is jax.checkpoint_policies.everything_saveable
  with pytest.raises(ValueError, match=r"`to_jax_policy`.*SavePrimitives.*remat_kit.remat"):
    rk.to_jax_policy(P.save_these_primitives("sin"))


def test_checkpoint_skips_save_everything():
  f = _dispatch.checkpoint(_loss, P.everything_saveable())
  assert f is _loss
