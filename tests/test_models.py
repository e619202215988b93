"""Reference models, Linen and NNX: remat changes memory and nothing else.

For each model: parameters identical with and without `remat_policy`;
outputs (dropout masks included), loss and gradients equal under several
policies, under jit, grad and value_and_grad; scanned and nested-scanned
stacks equal the unrolled stack; the remat version keeps fewer bytes.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from remat_kit import models
from remat_kit import testing as rkt
from remat_kit.flax import LayerStack, remat_policy
from remat_kit.flax import linen as rk_linen
from remat_kit.flax.nnx import stack_layers, unstack_layers
from remat_kit.report import compiled_memory

TOL = {"rtol": 1e-5, "atol": 1e-6}
SCAN_TOL = {"rtol": 1e-4, "atol": 1e-5}  # scan vs loop: XLA may reassociate sums
KEYS = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
KEY = jax.random.key(3)

# name -> (Linen block class, ctor kwargs, input shape, takes `train`, policies)
LINEN_BLOCKS = {
    "mlp": (models.HiddenLayer, {"width": 16, "dropout_rate": 0.5}, (4, 16), True,
            ["full", "save_dots", "save:relu"]),
    "gpt": (models.GPTBlock, {"d_model": 16, "num_heads": 2, "dropout_rate": 0.3}, (2, 8, 16),
            True, ["full", "save_dots", "save_qkv_attn_out"]),
    "cnn": (models.ResBlock, {"features": 8, "norm_groups": 2}, (2, 6, 6, 8), False,
            ["full", "save_dots", "save:norm1"]),
    "rnn": (models.ChunkedGRU, {"hidden": 8, "num_outputs": 3, "chunk": 4}, (2, 8, 5), False,
            ["full", "save_dots", "save:hidden"]),
}


class Chain(nn.Module):
  """Auto-named copies of a block (Block_0, Block_1): the case nn.remat renames."""

  block: type
  kwargs: tuple
  n: int
  train: bool

  @nn.compact
  def __call__(self, x):
    for _ in range(self.n):
      blk = self.block(**dict(self.kwargs))
      x = blk(x, True) if self.train else blk(x)
    return x


def _chain(name, policy=None):
  cls, kwargs, shape, train, _ = LINEN_BLOCKS[name]
  if policy is not None:
    cls = remat_policy(policy, static_argnames="train" if train else ())(cls)
  return Chain(cls, tuple(kwargs.items()), 1 if name == "rnn" else 2, train), shape


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LINEN_BLOCKS))
def test_linen_decorated_model_is_identical(name, remat_impl):
  """Parameters, outputs (dropout masks included) and gradients equal the undecorated
  block's under each policy (remat_kit.testing, the reference computed once); auto-named
  copies keep their names under the decorator."""
  cls, kwargs, shape, train, policies = LINEN_BLOCKS[name]
  x = jax.random.normal(jax.random.key(2), shape)
  rkt.assert_remat_equivalent(cls(**kwargs), x, *((True,) if train else ()), policies=policies,
                              static_argnames=("train",) if train else (),
                              impls=[remat_impl], rngs=KEYS,
                              jit=(False, True) if name == "mlp" else (True,), **TOL)
  for policy in policies:
    (plain, _), (rem, _) = _chain(name), _chain(name, policy)
    v, v_rem = jax.jit(plain.init)(KEYS, x), jax.jit(rem.init)(KEYS, x)
    chex.assert_trees_all_equal(v, v_rem)  # names and values: Block_0, Block_1


# name -> (NNX block factory, input shape, takes `train`, policies)
NNX_BLOCKS = {
    "mlp": (lambda cls, r: cls(16, 16, 0.5, rngs=r), models.nnx.HiddenLayer, (4, 16), True,
            ["full", "save_dots", "save:relu"]),
    "gpt": (lambda cls, r: cls(16, 2, 4, 0.3, rngs=r), models.nnx.GPTBlock, (2, 8, 16), True,
            ["full", "save_dots", "save_qkv_attn_out"]),
    "cnn": (lambda cls, r: cls(8, 2, rngs=r), models.nnx.ResBlock, (2, 6, 6, 8), False,
            ["full", "save_dots", "save:norm1"]),
    "rnn": (lambda cls, r: cls(5, 8, 3, chunk=4, rngs=r), models.nnx.ChunkedGRU, (2, 8, 5),
            False, ["full", "save_dots", "save:hidden"]),
}
NNX_CASES = [(name, pol) for name, spec in NNX_BLOCKS.items() for pol in spec[4]]


@pytest.mark.parametrize(("name", "policy"), NNX_CASES)
def test_nnx_decorated_model_is_identical(name, policy, remat_impl):
  make, cls, shape, train, _ = NNX_BLOCKS[name]
  rcls = remat_policy(policy, static_argnames="train" if train else ())(cls)
  plain, rem = make(cls, nnx.Rngs(0, dropout=1)), make(rcls, nnx.Rngs(0, dropout=1))
  assert type(rem).__name__ == type(plain).__name__
  chex.assert_trees_all_equal(nnx.state(plain), nnx.state(rem))
  x = jax.random.normal(jax.random.key(2), shape)

  def loss(m, x):
    out = m(x)
    return jnp.mean(out ** 2), out

  step = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
  for _ in range(2):  # the dropout streams advance identically
    (lp, out_p), gp = step(plain, x)
    (lr, out_r), gr = step(rem, x)
    chex.assert_trees_all_equal(out_p == 0, out_r == 0)
    chex.assert_trees_all_close((lp, out_p, gp), (lr, out_r, gr), **TOL)
  if name == "mlp":  # and without jit
    chex.assert_trees_all_close(nnx.grad(lambda m: loss(m, x)[0])(rem),
                                nnx.grad(lambda m: loss(m, x)[0])(plain), **TOL)


STACKS = {
    "mlp": (models.HiddenLayer(16, 0.5), (4, 16), (True,)),
    "gpt": (models.GPTBlock(16, 2, dropout_rate=0.3), (2, 8, 16), (True,)),
    "cnn": (models.ResBlock(8, 2), (2, 6, 6, 8), ()),
}


def _stack_loss(model, x, args):
  return lambda p, key: jnp.mean(model.apply({"params": p}, x, *args, rngs={"dropout": key}) ** 2)


@functools.cache
def _unrolled_reference(name):
  block, shape, args = STACKS[name]
  unrolled = LayerStack(block, 6, policy=False, scan=False)
  x = jax.random.normal(jax.random.key(2), shape)
  vu = jax.jit(lambda k, x: unrolled.init(k, x, *args))(KEYS, x)["params"]
  return x, vu, jax.jit(jax.value_and_grad(_stack_loss(unrolled, x, args)))(vu, KEY)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STACKS))
@pytest.mark.parametrize(("policy", "levels"), [(True, None), ("save_dots", 2), (True, (3, 2)),
                                                 (False, None)])
def test_linen_scanned_stack_equals_unrolled(name, policy, levels):
  block, _, args = STACKS[name]
  x, vu, (lu, gu) = _unrolled_reference(name)
  scanned = LayerStack(block, 6, policy=policy, levels=levels)
  v = jax.jit(lambda k, x: scanned.init(k, x, *args))(KEYS, x)["params"]
  # Same init, converted. Equal to float rounding only: XLA may compile the initializers'
  # arithmetic differently inside the init scan (JAX 0.12: 7e-9 in one of 576 kernel
  # entries of the CNN).
  chex.assert_trees_all_close(rk_linen.unstack_layers(v), vu, rtol=1e-6, atol=1e-8)
  chex.assert_trees_all_close(rk_linen.stack_layers(vu), v, rtol=1e-6, atol=1e-8)
  ls, gs = jax.jit(jax.value_and_grad(_stack_loss(scanned, x, args)))(v, KEY)
  chex.assert_trees_all_close(ls, lu, **SCAN_TOL)
  chex.assert_trees_all_close(rk_linen.unstack_layers(gs), gu, **SCAN_TOL)


def _nnx_gpt(**kw):
  return models.nnx.GPT(32, 8, 16, 2, 6, dropout_rate=0.3, rngs=nnx.Rngs(0, dropout=1), **kw)


def _nnx_loss(m, t, unrolled=False):
  return jnp.mean(m(t, unrolled=unrolled) ** 2)


TOKENS = jax.random.randint(jax.random.key(2), (2, 8), 0, 32)


@functools.cache
def _nnx_unrolled_reference():
  """Two steps of the unrolled GPT without remat (the dropout stream advances)."""
  m = _nnx_gpt(policy=False)
  step = nnx.jit(nnx.value_and_grad(functools.partial(_nnx_loss, unrolled=True)))
  return [step(m, TOKENS) for _ in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("levels", [None, 2, (3, 2)])
def test_nnx_scanned_stack_equals_unrolled(levels):
  a = _nnx_gpt(levels=levels)
  step = nnx.jit(nnx.value_and_grad(_nnx_loss))
  for ref in _nnx_unrolled_reference():
    chex.assert_trees_all_close(step(a, TOKENS), ref, **SCAN_TOL)
  layers = unstack_layers(a.blocks.layers)  # the layer count read from the arrays
  assert len(layers) == 6 and layers[0].qkv.kernel.shape == (16, 48)
  with pytest.raises(ValueError, match="leading axis 5"):
    unstack_layers(a.blocks.layers, 5)
  chex.assert_trees_all_equal(nnx.state(stack_layers(layers)), nnx.state(a.blocks.layers))


@pytest.mark.slow
def test_nnx_resnet_and_gru_scanned_equal_unrolled():
  img = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
  r = models.nnx.ResNet(3, 8, 4, norm_groups=2, levels=2, rngs=nnx.Rngs(0))
  ga = nnx.jit(nnx.grad(lambda m: jnp.mean(m(img) ** 2)))(r)
  gb = nnx.jit(nnx.grad(lambda m: jnp.mean(m(img, unrolled=True) ** 2)))(r)
  chex.assert_trees_all_close(ga, gb, **SCAN_TOL)
  xs = jax.random.normal(jax.random.key(2), (2, 12, 5))
  g4 = models.nnx.ChunkedGRU(5, 8, chunk=4, rngs=nnx.Rngs(0))
  gn = models.nnx.ChunkedGRU(5, 8, chunk=None, rngs=nnx.Rngs(0))
  grad = nnx.jit(nnx.grad(lambda m: jnp.sum(m(xs))))
  chex.assert_trees_all_close(grad(g4), grad(gn), **SCAN_TOL)


def test_linen_gru_chunks_equal_plain_scan():
  xs = jax.random.normal(jax.random.key(2), (2, 12, 5))
  plain = models.ChunkedGRU(8, 3, chunk=None)
  v = jax.jit(plain.init)(jax.random.key(0), xs)
  g = jax.jit(jax.grad(lambda v, m: jnp.sum(m.apply(v, xs)), argnums=0), static_argnums=1)
  for chunk in (3, 4, 12):
    chex.assert_trees_all_close(g(v, models.ChunkedGRU(8, 3, chunk=chunk)), g(v, plain),
                                **SCAN_TOL)
  with pytest.raises(ValueError, match=r"`chunk` must be a positive int dividing .* 12, got 5"):
    models.ChunkedGRU(8, 3, chunk=5).apply(v, xs)


def _temp(model, v, *args):
  def loss(p):
    return jnp.mean(model.apply({"params": p}, *args, rngs={"dropout": jax.random.key(0)}) ** 2)
  return compiled_memory(jax.grad(loss), v["params"])["temp_size"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_remat_stack_uses_less_compiled_memory(name):
  """CPU XLA memory analysis of the scanned stacks: remat keeps fewer bytes."""
  if name == "gpt":
    make = lambda **kw: models.GPT(64, 64, 64, 4, 8, **kw)
    args = (jax.random.randint(jax.random.key(1), (8, 64), 0, 64),)
  else:
    make = lambda **kw: LayerStack(models.HiddenLayer(128, 0.1), 8, **kw)
    args = (jnp.ones((2048, 128)), True)
  plain = make(policy=False)
  v = jax.jit(lambda k: plain.init(k, *args))(KEYS)
  t_plain = _temp(plain, v, *args)
  ratios = {}
  for label, kw in {"full": {"policy": True}, "save_dots": {"policy": "save_dots"},
                    "nested": {"policy": True, "levels": 2}}.items():
    ratios[label] = _temp(make(**kw), v, *args) / t_plain
  print(f"\n{name}: temp bytes relative to no remat ({t_plain / 2**20:.1f} MiB): "
        + ", ".join(f"{k} {r:.3f}" for k, r in ratios.items()))
  assert ratios["full"] < 1 and ratios["nested"] < 1
  if name == "gpt":
    assert ratios["save_dots"] < 1
  # The MLP layer's only dot is its float32 input to ReLU; without remat the
  # layer keeps two bool masks (ReLU, dropout) instead, so save_dots keeps more.


def test_layer_stack_errors():
  x = jnp.ones((2, 4))
  with pytest.raises(TypeError, match="`block` must be an .*Module instance.*not the class"):
    LayerStack(models.HiddenLayer, 2).init(KEYS, x, True)
  with pytest.raises(ValueError, match=r"`length` must be an int >= 1, got 0"):
    LayerStack(models.HiddenLayer(4), 0).init(KEYS, x, True)
  with pytest.raises(ValueError, match=r"`levels`=2 nests a scan, but `scan=False`"):
    LayerStack(models.HiddenLayer(4), 4, levels=2, scan=False).init(KEYS, x, True)

  class BN(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=False)(x)

  with pytest.raises(ValueError, match=r"\['batch_stats'\] besides `params`.*GroupNorm"):
    LayerStack(BN(), 2).init(KEYS, x)
  with pytest.raises(ValueError, match=r"\['attn_out'\].*Names it tags: \['dense'"):
    LayerStack(models.HiddenLayer(4), 2, policy="save_attn_out").init(KEYS, x, True)
  with pytest.raises(ValueError, match=r"layer indices \[0, 2\]"):
    rk_linen.stack_layers({"layers_0": {"w": x}, "layers_2": {"w": x}})
  from remat_kit.flax.nnx import LayerStack as NNXStack

  with pytest.raises(TypeError, match="`make_block` must be a function"):
    NNXStack(models.nnx.GPTBlock(4, 2, rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(0))
