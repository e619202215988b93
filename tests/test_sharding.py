"""LayerStack's layer axis in partition metadata: a stacked GPT sharded on 8 CPU devices.

The run needs 8 simulated devices, which must be set before JAX starts, so it
runs in a subprocess.
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import chex, jax, jax.numpy as jnp, flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P
    from remat_kit.models import GPT

    assert jax.device_count() == 8, jax.devices()
    model = GPT(vocab_size=64, max_len=16, d_model=32, num_heads=4, num_layers=4,
                policy="save_dots", levels=2, logical_axes=True)
    tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, 64)
    key = jax.random.key(1)
    v = jax.jit(model.init)({"params": key, "dropout": key}, tokens)
    specs = nn.get_partition_spec(v)["params"]
    assert specs["blocks"]["layers"]["Dense_2"]["kernel"] == P("layers", "embed", "mlp"), specs
    assert specs["blocks"]["layers"]["LayerNorm_0"]["scale"] == P("layers", "embed")
    assert specs["Embed_0"]["embedding"] == P("vocab", "embed")
    params = nn.unbox(v)

    def loss(p, tokens, key):
        logits = model.apply(p, tokens, rngs={"dropout": key})
        onehot = jax.nn.one_hot(jnp.roll(tokens, -1, axis=1), 64)
        return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1))

    grad = jax.grad(loss)
    want = jax.jit(grad)(params, tokens, key)  # one device
    mesh = jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    for layers_to in ("data",):  # the layer axis sharded too: 2 layers per device row
        rules = (("batch", "data"), ("layers", layers_to), ("embed", None),
                 ("heads", "model"), ("mlp", "model"), ("vocab", "model"))
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(v), mesh, rules)
        got = jax.jit(grad, out_shardings=shardings)(
            jax.device_put(params, shardings), jax.device_put(tokens, NamedSharding(mesh, P("data"))),
            key)
        k = got["params"]["blocks"]["layers"]["Dense_2"]["kernel"]
        assert k.sharding.spec == P(layers_to, None, "model"), k.sharding.spec
        shard = k.addressable_shards[0].data.shape
        assert shard == (2, 32, 32), shard
        chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-6)
        print("ok", layers_to, shard)
''')


@pytest.mark.slow
def test_a_stacked_gpt_shards_by_its_logical_axes_on_8_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
  run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-4000:]
  assert run.stdout.split() == ["ok", "data", "(2,", "32,", "32)"]
