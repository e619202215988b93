"""@remat_policy on NNX modules: same params, dropout and gradients; less memory."""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import remat_kit as rk
from remat_kit.flax import remat_policy
from remat_kit.report import saved_residuals


class Block(nnx.Module):
  def __init__(self, din: int, dout: int, rngs: nnx.Rngs):
    self.lin1 = nnx.Linear(din, dout, rngs=rngs)
    self.lin2 = nnx.Linear(dout, din, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x, train: bool = True):
    h = rk.checkpoint_name(nnx.relu(self.lin1(x)), "hidden")
    h = self.drop(h, deterministic=not train)
    return self.lin2(h)


def _pair(policy):
  rematted = remat_policy(policy, static_argnames="train")(Block)
  return Block(8, 32, nnx.Rngs(0, dropout=1)), rematted(8, 32, nnx.Rngs(0, dropout=1))


def _loss(m, x):
  return jnp.mean(m(x, True) ** 2)


@pytest.mark.parametrize("policy", ["full", "save_dots", "save:hidden"])
def test_nnx_decorated_module_is_identical(policy, remat_impl):
  x = jax.random.normal(jax.random.key(2), (4, 8))
  plain, rem = _pair(policy)
  assert type(rem).__name__ == "Block"
  chex.assert_trees_all_equal(nnx.state(plain, nnx.Param), nnx.state(rem, nnx.Param))
  for _ in range(2):  # the dropout stream advances identically
    lp, gp = nnx.value_and_grad(_loss)(plain, x)
    lr, gr = nnx.value_and_grad(_loss)(rem, x)
    chex.assert_trees_all_close((lp, gp), (lr, gr), rtol=1e-6, atol=1e-7)


def test_nnx_remat_saves_less():
  x = jnp.ones((4, 8))
  plain, rem = _pair("full")

  def acts(m):
    graphdef, state = nnx.split(m)
    f = lambda state, x: _loss(nnx.merge(graphdef, state), x)
    return sum(r.bytes for r in saved_residuals(f, state, x) if r.kind == "activation")

  assert acts(rem) < acts(plain)


def test_nnx_policy_name_never_tagged_is_an_error():
  _, rem = _pair("save:hiden")
  with pytest.raises(ValueError, match=r"\['hiden'\].*Names it tags: \['hidden'\]"):
    rem(jnp.ones((4, 8)))
