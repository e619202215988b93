"""Benchmarks, demos and results.

`make test`/`make bench` install the CUDA plugin and libtpu into `.venv` for
deviceless compiles (`remat_kit.targets`). On a machine with no accelerator,
the plugin would print a CUDA traceback at every JAX start; the experiments
then pick the CPU backend explicitly (an explicit `JAX_PLATFORMS` wins).
"""

import glob
import os

if "JAX_PLATFORMS" not in os.environ and not glob.glob("/dev/nvidia[0-9]*") \
    and not glob.glob("/dev/accel[0-9]*") and not glob.glob("/dev/vfio/[0-9]*"):
  os.environ["JAX_PLATFORMS"] = "cpu"

# libtpu guards a real TPU with a process lock file; deviceless compiles have no TPU to
# guard, and the bench's worker processes would otherwise refuse each other.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
