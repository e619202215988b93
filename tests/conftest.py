"""Strict JAX settings for the whole suite; remat_kit's pytest plugin for `remat_impl`."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The CUDA plugin and libtpu are installed for deviceless compiles; tests run on CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_configure(config):
  """The `remat_impl` fixture comes from remat_kit's pytest plugin (the `pytest11` entry
  point); load it by hand where the package is on the path but not installed."""
  if not config.pluginmanager.has_plugin("remat_kit"):
    config.pluginmanager.import_plugin("remat_kit.pytest_plugin")
