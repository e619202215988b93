"""@remat_policy for Linen: same parameters, masks and gradients; less memory; clear errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import remat_kit as rk
from remat_kit.flax import remat_policy
from remat_kit.models import CheckpointedMLP, HiddenLayer
from remat_kit.report import saved_residuals

POLICIES = ["full", "save_dots", "save:relu", {"dense": "save", "*": "recompute"}]


class Stack(nn.Module):
  """Auto-named blocks (Block_0, Block_1): the case nn.remat renames."""

  block: type
  n: int = 3

  @nn.compact
  def __call__(self, x, train: bool):
    for _ in range(self.n):
      x = self.block(16)(x, train)
    return x


def _x():
  return jax.random.normal(jax.random.key(7), (8, 12))


def _init(model, x):
  return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, True)


def _loss(model):
  def loss(variables, x, key):
    out = model.apply(variables, x, True, rngs={"dropout": key})
    return jnp.mean(out ** 2)
  return loss


def _activation_bytes(fn, *args):
  return sum(r.bytes for r in saved_residuals(fn, *args) if r.kind == "activation")


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_decorated_stack_is_identical_but_saves_less(policy, remat_impl):
  x, key = _x(), jax.random.key(3)
  plain = Stack(HiddenLayer)
  remat = Stack(remat_policy(policy, static_argnames="train")(HiddenLayer))
  v_plain, v_remat = _init(plain, x), _init(remat, x)
  # same tree: structure, names, values
  assert jax.tree_util.tree_structure(v_plain) == jax.tree_util.tree_structure(v_remat)
  assert "HiddenLayer_0" in v_remat["params"]
  chex.assert_trees_all_equal(v_plain, v_remat)
  # same outputs (dropout masks included), loss and gradients
  out_p = plain.apply(v_plain, x, True, rngs={"dropout": key})
  out_r = remat.apply(v_plain, x, True, rngs={"dropout": key})
  chex.assert_trees_all_close(out_p, out_r, rtol=1e-6)
  lp, gp = jax.value_and_grad(_loss(plain))(v_plain, x, key)
  lr, gr = jax.value_and_grad(_loss(remat))(v_plain, x, key)
  chex.assert_trees_all_close((lp, gp), (lr, gr), rtol=1e-6, atol=1e-7)
  gj = jax.jit(jax.grad(_loss(remat)))(v_plain, x, key)
  chex.assert_trees_all_close(gj, gp, rtol=1e-6, atol=1e-7)
  # and less saved memory
  assert _activation_bytes(_loss(remat), v_plain, x, key) < _activation_bytes(
      _loss(plain), v_plain, x, key)


def test_dropout_masks_are_equal():
  x = _x()
  plain, remat = HiddenLayer(16, 0.5), remat_policy("full", static_argnames="train")(
      HiddenLayer)(16, 0.5)
  v = _init(plain, x)
  for seed in range(3):
    key = jax.random.key(seed)
    a = plain.apply(v, x, True, rngs={"dropout": key})
    b = remat.apply(v, x, True, rngs={"dropout": key})
    chex.assert_trees_all_equal(a == 0, b == 0)
    assert 0 < int((a == 0).sum()) < a.size


def test_bare_decorator_and_keyword_static_argument():
  @remat_policy
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, mode: str = "eval"):  # a str is static without being named
      return nn.Dropout(0.5, deterministic=mode == "eval")(nn.Dense(4)(x))

  assert Block.__name__ == "Block" and Block.__remat_policy__ == rk.policies.SaveNothing()
  x = _x()
  v = Block().init(jax.random.key(0), x)
  out = Block().apply(v, x, mode="eval")
  assert out.shape == (8, 4)


def test_a_bool_flag_is_traced_unless_named_as_in_jax_checkpoint():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
      return nn.Dropout(0.5, deterministic=deterministic)(nn.Dense(4)(x))

  x = _x()
  v = Block().init(jax.random.key(0), x)
  with pytest.raises(TypeError, match=r"`deterministic`.*static_argnames=\('deterministic',\)"):
    remat_policy("full")(Block)().apply(v, x, deterministic=True)
  named = remat_policy("full", static_argnames="deterministic")(Block)
  assert named().apply(v, x, deterministic=True).shape == (8, 4)


def test_reference_mlp_checkpoint_on_and_off():
  x = _x()
  on = CheckpointedMLP(width=32, num_outputs=3, checkpoint=True)
  off = CheckpointedMLP(width=32, num_outputs=3, checkpoint=False)
  v_on, v_off = _init(on, x), _init(off, x)
  chex.assert_trees_all_equal(v_on, v_off)
  assert set(v_on["params"]) == {"input", "hidden_0", "hidden_1", "hidden_2", "hidden_3",
                                 "output"}
  key = jax.random.key(5)
  g_on = jax.grad(_loss(on))(v_on, x, key)
  g_off = jax.grad(_loss(off))(v_on, x, key)
  chex.assert_trees_all_close(g_on, g_off, rtol=1e-6, atol=1e-7)
  saved_on = _activation_bytes(_loss(on), v_on, x, key)
  saved_off = _activation_bytes(_loss(off), v_on, x, key)
  print(f"\nCheckpointedMLP saved activations: {saved_on} B with remat, {saved_off} B "
        f"without, ratio {saved_on / saved_off:.3f}")
  assert saved_on < saved_off


def test_not_a_module_is_an_error():
  with pytest.raises(TypeError, match="expected a flax.linen.Module or flax.nnx.Module subclass, got <function"):
    remat_policy("full")(lambda x: x)
  with pytest.raises(TypeError, match="expected a flax.linen.Module or flax.nnx.Module subclass"):
    remat_policy("full")(HiddenLayer(3))


def test_unknown_static_argument_name_is_an_error():
  with pytest.raises(ValueError, match=r"`static_argnames` \['trian'\] are not parameters"):
    remat_policy("full", static_argnames="trian")(HiddenLayer)


def test_policy_name_never_tagged_is_an_error():
  x = _x()
  m = remat_policy("save:attn_out", static_argnames="train")(HiddenLayer)(16)
  v = _init(HiddenLayer(16), x)
  with pytest.raises(ValueError, match=r"\['attn_out'\].*Names it tags: \['dense', 'dropout', "
                                       r"'relu'\]"):
    m.apply(v, x, True, rngs={"dropout": jax.random.key(0)})


def test_unhashable_static_argument_is_an_error():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, sizes):
      return nn.Dense(sizes[0])(x)

  m = remat_policy("full", static_argnames="sizes")(Block)()
  with pytest.raises(TypeError, match=r"static argument `sizes`.*list \[4\].*not hashable"):
    m.init(jax.random.key(0), _x(), [4])


# --------------------------------------------------------------------------
# Misuse and double application
# --------------------------------------------------------------------------
def test_remat_policy_on_a_method_is_a_type_error_naming_the_fix():
  with pytest.raises(TypeError, match=r"decorates a Module class, not a method.*above the `class`"):
    class Block(nn.Module):  # noqa: F841
      @remat_policy
      def __call__(self, x):
        return x


def test_remat_policy_of_a_module_instance_is_a_type_error():
  with pytest.raises(TypeError, match=r"module instance Dense.*decorates a Module \*class\*"):
    remat_policy(nn.Dense(2))


class _Inner(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="c1")(jnp.sin(x))


def _remat_sites(cls, x):
  model = cls()
  v = model.init(jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(jax.grad(lambda v: model.apply(v, x).sum()))(v).jaxpr
  from remat_kit import _jaxpr
  return v, sum(1 for _ in _jaxpr.remat_equations(jaxpr))


@pytest.mark.parametrize("how", ["twice", "subclass", "other policy"])
def test_applying_remat_policy_again_is_one_level(how):
  once = remat_policy("full")(_Inner)
  if how == "twice":
    again = remat_policy("full")(once)
  elif how == "subclass":
    class Sub(once):
      pass
    again = remat_policy("full")(Sub)
  else:
    again = remat_policy("save_dots")(once)
  x = jnp.ones((2, 3))
  v1, n1 = _remat_sites(once, x)
  v2, n2 = _remat_sites(again, x)
  assert n1 == n2 == 1  # one checkpoint, not one per application
  assert jax.tree_util.tree_structure(v1) == jax.tree_util.tree_structure(v2)
  assert list(v2["params"]) == ["c1"]
  chex.assert_trees_all_close(again().apply(v2, x), _Inner().apply(v2, x))
