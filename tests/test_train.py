"""Training with remat: same losses as without; a sharded step equals the single-device one."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from experiments import train


@pytest.fixture(scope="module")
def data():
  return train.batches(train.corpus(), 16, 32, seed=0)


def test_corpus_is_real_text():
  text = train.corpus()
  assert len(text) > 100_000 and "def " in bytes(text[:5000].astype(np.uint8)).decode()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt", "mlp"])
def test_training_is_the_same_with_and_without_remat(name, data):
  if name == "gpt":
    make = lambda remat: train.gpt_loss(train.gpt_model("save_dots" if remat else False,
                                                        layers=2))
    params = train.init(train.gpt_model(False, layers=2), jnp.asarray(data(0))[:, :-1],
                        jax.random.key(0))
  else:
    make = lambda remat: train.mlp_loss(train.mlp_model(remat))
    params = train.init(train.mlp_model(False), jnp.zeros((16, train.WINDOW * train.VOCAB)),
                        jax.random.key(0))
  off = train.train(make(False), params, data, 6, "no remat")
  on = train.train(make(True), params, data, 6, "remat")
  print(f"\n{name}: losses without remat {np.round(off, 5).tolist()}, max |diff| with remat "
        f"{max(abs(a - b) for a, b in zip(off, on)):.2e}")
  np.testing.assert_allclose(on, off, rtol=1e-5)
  assert off[-1] < off[0]  # it learns


@pytest.mark.slow
def test_sharded_step_equals_single_device(data):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  model = train.gpt_model("save_dots", layers=2)
  loss = train.gpt_loss(model)
  chunk = jnp.asarray(data(0))
  params = train.init(model, chunk[:, :-1], jax.random.key(0))
  # SGD: the update is the gradient, scaled. (Adam divides by sqrt(v) and so blows up
  # float noise in gradients that are zero in exact arithmetic, such as the key bias's.)
  opt = optax.sgd(0.1, momentum=0.9)
  state = opt.init(params)
  single = jax.jit(train.train_step(loss, opt))(params, state, chunk, jax.random.key(1))
  step = train.sharded_train_step(loss, opt, mesh, params, state)
  sharded = step(params, state, chunk, jax.random.key(1))
  chex.assert_trees_all_close(sharded, single, rtol=1e-5, atol=1e-6)
  # parameters really are split: a sharded kernel holds 1/2 of its rows per device
  kernel = sharded[0]["blocks"]["layers"]["Dense_0"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  shard = kernel.addressable_shards[0].data
  assert shard.size * 2 == kernel.size
  mem = step.lower(params, state, chunk, jax.random.key(1)).compile().memory_analysis()
  print(f"\nper-device compiled memory: temp {mem.temp_size_in_bytes / 2**20:.2f} MiB, "
        f"arguments {mem.argument_size_in_bytes / 2**20:.2f} MiB")
  assert mem.argument_size_in_bytes < sum(x.nbytes for x in jax.tree_util.tree_leaves(
      (params, state)))
