"""What the installed JAX computes differently from older versions, read from JAX itself
(not from its version number), for the tests' hand-worked numbers."""

import jax
import jax.numpy as jnp

# tanh's derivative keeps `1 - y**2` as a `sub` of the output (JAX 0.10) or as one
# `one_minus_square` of it (0.11 on): one saved tensor instead of two.
TANH_DERIVATIVE = ("one_minus_square"
                   if "one_minus_square" in str(jax.make_jaxpr(jax.grad(jnp.tanh))(1.0))
                   else "sub")
