"""Strict JAX settings for the whole suite; remat_kit's pytest plugin for `remat_impl`."""

# JAX_PLATFORMS and XLA_FLAGS are set by the repository's root conftest.py.
import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_configure(config):
  """The `remat_impl` fixture comes from remat_kit's pytest plugin (the `pytest11` entry
  point); load it by hand where the package is on the path but not installed."""
  if not config.pluginmanager.has_plugin("remat_kit"):  # pragma: no cover
    config.pluginmanager.import_plugin("pytest_remat_kit")
