"""A quiet JAX start in remat_kit's venvs, on machines with no accelerator.

The venvs carry the deviceless compilers: libtpu and the CUDA plugin. When JAX
starts without ``JAX_PLATFORMS``, it initialises every plugin it finds. On a
machine with no GPU the CUDA plugin then prints a traceback ("Unable to load
cuDNN") and libtpu warns about its TPU hosts, before the user's program says
anything, although nothing is wrong: JAX goes on with the CPU.

``make`` copies this file into each venv's site-packages as
``_remat_kit_quiet_start.py``, with a ``.pth`` line that imports it when the
venv's Python starts (``.venv/bin/python`` directly, no activate script). It
sets ``JAX_PLATFORMS=cpu`` only when all of these hold:

* ``JAX_PLATFORMS`` is not set (a user's choice always wins);
* the machine has no GPU (``/dev/nvidia<N>``, ``/dev/kfd``) and no TPU
  (``/dev/accel<N>``, ``/dev/vfio/<N>``): where one exists, JAX uses it, and a
  broken CUDA install still shows its error;
* ``REMAT_KIT_QUIET_START`` is not ``0`` (set it to ``0`` to turn this off).

Deviceless compiles still work: ``target="gpu:h100"`` and ``"tpu:v5e:2x2"``
need the plugins installed, not initialised as the default backend.

Run as a script: ``python .ci/quiet_start.py --install VENV`` installs it.
"""

from __future__ import annotations

import glob
import os
import sys

_ACCELERATORS = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def has_accelerator() -> bool:
  """Whether this machine shows a GPU or TPU device node."""
  return any(glob.glob(pattern) for pattern in _ACCELERATORS)


def apply(environ: dict[str, str] | os._Environ = os.environ) -> bool:
  """Sets JAX_PLATFORMS=cpu where the rules above say so; returns whether it did."""
  if environ.get("REMAT_KIT_QUIET_START", "1") == "0" or "JAX_PLATFORMS" in environ:
    return False
  if has_accelerator():
    return False
  environ["JAX_PLATFORMS"] = "cpu"
  return True


def install(venv: str) -> str:
  """Copies this module into ``venv``'s site-packages with the .pth line that runs it."""
  import shutil
  import subprocess

  site = subprocess.run(
      [os.path.join(venv, "bin", "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      text=True, capture_output=True, check=True, env={**os.environ, "REMAT_KIT_QUIET_START": "0"},
  ).stdout.strip()
  shutil.copyfile(__file__, os.path.join(site, "_remat_kit_quiet_start.py"))
  with open(os.path.join(site, "_remat_kit_quiet_start.pth"), "w") as f:
    f.write("import _remat_kit_quiet_start\n")
  return site


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--install":
    print(f"quiet start: installed in {install(sys.argv[2])}")
  else:
    raise SystemExit("usage: python .ci/quiet_start.py --install VENV")
else:
  apply()
