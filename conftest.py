"""Set before JAX is imported, for every test path (README.md and the doctests in
remat_kit/ too): 8 CPU devices, and JAX on CPU only. The CUDA plugin and libtpu are
installed for deviceless compiles; with JAX_PLATFORMS=cpu the CUDA plugin skips its
check for CUDA libraries this machine does not have, and registers for them."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu's process lock guards a real TPU; deviceless compiles in parallel test workers
# (pytest-xdist) have none to guard.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# mkdocs' helper (it imports griffe, from the `docs` extra), not a test module.
collect_ignore = ["docs/_griffe_examples.py"]
