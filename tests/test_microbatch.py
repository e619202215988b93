"""rk.microbatched_value_and_grad: the batch's gradient from slices, in less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import remat_kit as rk

W = {"a": jax.random.normal(jax.random.key(0), (32, 256)) * 0.1,
     "b": jax.random.normal(jax.random.key(1), (256, 4)) * 0.1}
X = jax.random.normal(jax.random.key(2), (64, 32))
Y = jax.random.normal(jax.random.key(3), (64, 4))


def loss(w, x, y, key=None):
  h = jax.nn.relu(x @ w["a"])
  if key is not None:
    h = jnp.where(jax.random.bernoulli(key, 0.9, h.shape), h / 0.9, 0.0)
  return jnp.mean((h @ w["b"] - y) ** 2)


def test_the_slices_give_the_batch_gradient():
  value, grads = jax.value_and_grad(loss)(W, X, Y)
  for k in (1, 2, 8):
    v, g = jax.jit(rk.microbatched_value_and_grad(loss, k, batch_argnums=(1, 2)))(W, X, Y)
    np.testing.assert_allclose(v, value, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g, grads)


def test_each_slice_draws_with_its_own_key():
  key = jax.random.key(7)
  v, g = rk.microbatched_value_and_grad(loss, 4, batch_argnums=(1, 2), key_argnums=3)(
      W, X, Y, key)
  keys = jax.random.split(key, 4)
  parts = [jax.value_and_grad(loss)(W, X[i * 16:(i + 1) * 16], Y[i * 16:(i + 1) * 16], keys[i])
           for i in range(4)]
  np.testing.assert_allclose(v, np.mean([p[0] for p in parts]), rtol=1e-5)
  want = jax.tree.map(lambda *gs: sum(gs) / 4, *[p[1] for p in parts])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g, want)


def test_the_compiled_gradient_holds_one_slice_of_activations():
  big_x = jnp.zeros((8192, 32))
  big_y = jnp.zeros((8192, 4))

  def temp(k):
    fn = rk.microbatched_value_and_grad(loss, k, batch_argnums=(1, 2))
    return jax.jit(fn).lower(W, big_x, big_y).compile().memory_analysis().temp_size_in_bytes

  whole, eighth = temp(1), temp(8)
  assert eighth < 0.3 * whole, (whole, eighth)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match=r"`microbatches` must be an int >= 1, got 0"):
    rk.microbatched_value_and_grad(loss, 0)
  with pytest.raises(ValueError, match=r"argument\(s\) \[1\] appear in more than one"):
    rk.microbatched_value_and_grad(loss, 2, batch_argnums=1, key_argnums=1)
  with pytest.raises(ValueError, match=r"argument 1 has a leaf of shape \(64, 32\).*"
                                       r"not divisible by `microbatches`=5"):
    rk.microbatched_value_and_grad(loss, 5, batch_argnums=(1, 2))(W, X, Y)
  with pytest.raises(ValueError, match=r"argument number\(s\) \[3\] out of range"):
    rk.microbatched_value_and_grad(loss, 2, batch_argnums=(1, 2), key_argnums=3)(W, X, Y)
