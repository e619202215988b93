"""Strict JAX settings for the whole suite, and a fixture for both remat implementations."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The CUDA plugin and libtpu are installed for deviceless compiles; tests run on CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from remat_kit import _jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

IMPLEMENTATIONS = ["classic", "remat3"] if _jax.has_remat3() else ["classic"]


@pytest.fixture(params=IMPLEMENTATIONS)
def remat_impl(request):
  """Runs the test under JAX's classic remat and, where JAX has it, under jax_remat3."""
  if not _jax.has_remat3():
    yield request.param
    return
  old = jax.config.jax_remat3
  jax.config.update("jax_remat3", request.param == "remat3")
  try:
    yield request.param
  finally:
    jax.config.update("jax_remat3", old)
