"""pytest plugin (registered as ``remat_kit`` through the ``pytest11`` entry point).

* ``remat_impl``: a fixture that runs the test once per remat implementation
  this JAX has (``"classic"``, ``"remat3"``), like ``chex.variants``.
* ``--remat-update-fingerprints``: rewrite the JSON files that
  :func:`remat_kit.testing.assert_fingerprint` compares against.

JAX is imported only when a test asks for these, so a suite's ``conftest.py``
can still set ``JAX_PLATFORMS`` or ``XLA_FLAGS`` first.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

UPDATE_ENV = "REMAT_KIT_UPDATE_FINGERPRINTS"  # the same as remat_kit.testing.UPDATE_ENV


def pytest_addoption(parser: Any) -> None:
  group = parser.getgroup("remat_kit")
  group.addoption("--remat-update-fingerprints", action="store_true", default=False,
                  help="rewrite the fingerprints assert_fingerprint compares against")


def pytest_configure(config: Any) -> None:
  if config.getoption("--remat-update-fingerprints", default=False):
    os.environ[UPDATE_ENV] = "1"


def pytest_generate_tests(metafunc: Any) -> None:
  if "remat_impl" in metafunc.fixturenames:
    from remat_kit import testing
    metafunc.parametrize("remat_impl", testing.implementations(), indirect=True)


@pytest.fixture
def remat_impl(request: Any) -> Iterator[str]:
  """The remat implementation this test runs under: "classic" or "remat3"."""
  from remat_kit import testing
  with testing.remat_implementation(request.param):
    yield request.param
