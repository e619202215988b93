"""What the installed JAX computes differently from older versions, read from JAX itself
(not from its version number), for the tests' hand-worked numbers."""

import contextlib
import io
import math
import re

import jax
import jax.numpy as jnp
from jax import ad_checkpoint

# tanh's derivative keeps `1 - y**2` as a `sub` of the output (JAX 0.10) or as one
# `one_minus_square` of it (0.11 on): one saved tensor instead of two.
TANH_DERIVATIVE = ("one_minus_square"
                   if "one_minus_square" in str(jax.make_jaxpr(jax.grad(jnp.tanh))(1.0))
                   else "sub")


def _softmax_extra_bytes_per_row() -> int:
  """Bytes `jax.nn.softmax` keeps for its backward per bf16 row beyond its output: two
  bf16 normalizers (4 bytes) through JAX 0.12.0, none from 0.12.1 on (only the output).
  Read from JAX's own `print_saved_residuals` (its `saved_residuals` is private)."""
  rows, cols = 8, 16
  x = jnp.ones((rows, cols), jnp.bfloat16)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    ad_checkpoint.print_saved_residuals(
        lambda x: jnp.sum(jax.nn.softmax(x, axis=-1).astype(jnp.float32)), x)
  total = 0
  for dtype, dims in re.findall(r"^(\w+)\[([\d,]*)\]", out.getvalue(), flags=re.M):
    bits = re.search(r"\d+", dtype)  # JAX's short names: bf16, f32, ...; bool is one byte
    total += math.prod(int(d) for d in dims.split(",") if d) * (int(bits.group()) // 8 if bits else 1)
  return (total - rows * cols * 2) // rows


SOFTMAX_EXTRA_BYTES_PER_ROW = _softmax_extra_bytes_per_row()
