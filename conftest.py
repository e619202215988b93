"""Set before JAX is imported, for every test path (README.md and the doctests in
remat_kit/ too): 8 CPU devices, and JAX on CPU only. The CUDA plugin and libtpu are
installed for deviceless compiles; with JAX_PLATFORMS=cpu the CUDA plugin skips its
check for CUDA libraries this machine does not have, and registers for them.

A test (or doctest) that compiles for a deviceless target whose compiler is not
installed is skipped with the reason `remat_kit.targets` gives, unless the platform is
listed in ``REMAT_KIT_REQUIRE_TARGETS`` (``make test`` lists those its lock installs):
there it fails, so a leg that should compile for a TPU or GPU never skips quietly."""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu's process lock guards a real TPU; deviceless compiles in parallel test workers
# (pytest-xdist) have none to guard.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# mkdocs' helper (it imports griffe, from the `docs` extra), not a test module.
collect_ignore = ["docs/_griffe_examples.py"]

REQUIRED = {p for p in os.environ.get("REMAT_KIT_REQUIRE_TARGETS", "").split(",") if p}


def _missing_compiler(exc: BaseException | None) -> BaseException | None:
  """The `CompilerMissing` behind ``exc`` (directly, or inside a doctest's failure)."""
  from remat_kit.targets import CompilerMissing

  seen = 0
  while exc is not None and seen < 8:
    if isinstance(exc, CompilerMissing):
      return exc
    failures = getattr(exc, "failures", None)  # pytest's MultipleDoctestFailures
    if failures:
      exc = getattr(failures[0], "exc_info", (None, None))[1]
    else:
      exc = getattr(exc, "exc_info", (None, None))[1] or exc.__cause__ or exc.__context__
    seen += 1
  return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
  try:
    return (yield)
  except BaseException as e:
    missing = _missing_compiler(e)
    if missing is None or missing.platform in REQUIRED:
      raise
    pytest.skip(str(missing))
