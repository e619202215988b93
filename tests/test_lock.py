"""The venvs `make` builds: each holds exactly its lock, and JAX starts quietly in them.

These tests read the venv the suite runs in. Outside a venv that `make` built (no
`.lock` file beside its Python), they skip and say so.
"""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARK = Path(sys.prefix, ".lock")
needs_make_venv = pytest.mark.skipif(not MARK.is_file(),
                                     reason=f"not a venv `make` built ({MARK} is missing)")
# Left out of the comparison: the project itself, and the installers (pip is locked, but
# `pip freeze` leaves pip, setuptools and wheel out, as this test does).
NOT_LOCKED = {"remat-kit", "pip", "setuptools", "wheel"}


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> tuple[Path, dict[str, str]]:
  path = ROOT / MARK.read_text().strip()
  pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", path.read_text(), flags=re.M))
  return path, {_norm(k): v for k, v in pins.items() if _norm(k) not in NOT_LOCKED}


@needs_make_venv
def test_the_venv_holds_exactly_its_lock():
  path, locked = _lock()
  installed = {_norm(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
  installed = {k: v for k, v in installed.items() if k not in NOT_LOCKED}
  extra = sorted(f"{k}=={v}" for k, v in installed.items() if k not in locked)
  missing = sorted(f"{k}=={v}" for k, v in locked.items() if k not in installed)
  differ = sorted(f"{k}: {installed[k]} installed, {v} locked" for k, v in locked.items()
                  if k in installed and installed[k] != v)
  assert not (extra or missing or differ), (
      f"{sys.prefix} does not match {path.name}: not in the lock {extra}; missing {missing}; "
      f"other versions {differ}. Rebuild it: rm -rf {sys.prefix} && make test")


@needs_make_venv
def test_the_lock_names_the_targets_it_installs_compilers_for():
  from remat_kit import targets

  path, locked = _lock()
  header = re.search(r"^# targets: (.*)$", path.read_text(), flags=re.M)
  assert header, f"{path.name} has no '# targets:' line (written by `make lock`)"
  named = set(header.group(1).split()) - {"none"}
  for platform in ("tpu", "gpu"):
    c = targets.compiler(platform)
    assert c.available == (platform in named), (platform, c, named)
    if c.available:
      assert locked[_norm(c.package)] == c.version


@needs_make_venv
@pytest.mark.skipif(sys.platform != "linux", reason="the hook looks for Linux device nodes")
def test_jax_starts_quietly_where_there_is_no_accelerator():
  """`.venv/bin/python` run directly, with JAX_PLATFORMS unset: nothing on stderr from the
  CUDA plugin or libtpu on a machine without a GPU or TPU (the startup hook)."""
  sys.path.insert(0, str(ROOT / ".ci"))
  try:
    import quiet_start  # its apply() is a no-op here: conftest.py set JAX_PLATFORMS
  finally:
    sys.path.pop(0)
  if quiet_start.has_accelerator():
    pytest.skip("this machine has a GPU or TPU: JAX must use it, so the hook does nothing")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  r = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"],
                     capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == "cpu" and r.stderr == "", r.stderr[-2000:]
  # A user's own JAX_PLATFORMS wins, and the hook can be turned off.
  r = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('JAX_PLATFORMS'))"],
                     capture_output=True, text=True, env={**env, "REMAT_KIT_QUIET_START": "0"})
  assert r.stdout.strip() == "None"
  r = subprocess.run([sys.executable, "-c", "import os; print(os.environ['JAX_PLATFORMS'])"],
                     capture_output=True, text=True, env={**env, "JAX_PLATFORMS": "cpu,tpu"})
  assert r.stdout.strip() == "cpu,tpu"
