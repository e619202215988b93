"""`make lock`: resolve the newest JAX and write the lock of every test leg.

Run with any Python 3 (standard library only); it drives uv, which `make` installs
pinned in `.uv/`. Each leg's lock (`locks/<leg>.txt`) lists the exact version of
every package its venv gets, transitive ones included; `make` installs a venv
with `uv pip sync`, so the venv holds what its lock lists and nothing else.

For the newest JAX each Python gets, it picks the deviceless compilers:

* TPU: the libtpu that `jax[tpu]==V` pins, if the index has it; else the newest
  libtpu below that pin whose TPU tests pass against that JAX (tried newest first).
* GPU: `jax-cuda12-plugin==V` if the index has it, else `jax-cuda13-plugin==V`.

What it had to substitute, or could not get, is printed, written into the
lock's header and into `remat_kit/_published.json` (which `python -m remat_kit
versions` and the targets' install hints read). Unless `--no-record`, it then
re-records the golden compiler dumps (`tests/fixtures/xla/record.py`, in the newest
leg's venv), and unless `--no-test` runs `make test` on the new locks.

Usage: python3 .ci/lock.py [--uv PATH] [--no-test] [--no-record] [--jax VERSION]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "locks"
PUBLISHED = ROOT / "remat_kit" / "_published.json"
# The fixed legs: (lock name, Python, JAX, extras).
FIXED = [("jax-0.11.2", "3.12", "0.11.2", ["dev"]), ("jax-0.10.0", "3.11", "0.10.0", ["dev"])]
# The newest leg, one lock per Python that can run it (`make` picks by the Python it finds).
NEWEST_PYTHONS = ["3.13", "3.12", "3.11"]
NEWEST_EXTRAS = ["dev", "docs", "bench"]
# In every venv too, pinned: pip, so that `.venv/bin/python -m pip freeze` works there.
INSTALLERS = ["pip"]
# Tested candidates for a substituted libtpu, newest first; more is rarely useful.
MAX_LIBTPU_TRIES = 3
# What "works with that JAX" means for a libtpu: these pass with it (deviceless compiles).
TPU_TESTS = ["tests/test_targets.py", "tests/test_pipelining_plan.py"]


def say(msg: str) -> None:
  print(f"lock: {msg}", flush=True)


class Uv:
  def __init__(self, exe: str):
    self.exe = exe

  def run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([self.exe, *args], text=True, capture_output=True, env=env,
                          check=check, **kw)

  def compile(self, python: str, requirements: list[str], *, project_extras: list[str] | None = None,
              out: Path | None = None) -> tuple[dict[str, str] | None, str]:
    """Resolves ``requirements`` (plus the project's dependencies with ``project_extras``
    when given) for ``python``; returns ({name: version}, uv's text) or (None, error)."""
    with tempfile.TemporaryDirectory() as tmp:
      req = Path(tmp) / "requirements.in"
      req.write_text("\n".join(requirements) + "\n")
      args = ["pip", "compile", "--python", python, "--no-header", "--annotation-style", "line",
              "--quiet", str(req)]
      if project_extras is not None:
        args += [str(ROOT / "pyproject.toml"), *(a for e in project_extras for a in ("--extra", e))]
      dest = out or Path(tmp) / "out.txt"
      r = self.run(*args, "-o", str(dest), check=False)
      if r.returncode != 0:
        return None, (r.stderr or r.stdout).strip()
      text = dest.read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", text, flags=re.M))
    return {k.lower().replace("_", "-"): v for k, v in pins.items()}, text


def uv_version(uv: Uv) -> str:
  return uv.run("--version").stdout.split()[1]


def find_python(minor: str) -> str | None:
  r = subprocess.run([str(ROOT / ".ci" / "pick-python"), minor], text=True, capture_output=True)
  return r.stdout.strip() or None


def newest_jax(uv: Uv, python: str, pinned: str | None) -> str:
  pins, err = uv.compile(python, [f"jax=={pinned}" if pinned else "jax"])
  if pins is None:
    raise SystemExit(f"lock: cannot resolve jax for {python}:\n{err}")
  return pins["jax"]


def libtpu_pin(uv: Uv, python: str, jax_version: str) -> str | None:
  """The libtpu requirement `jax[tpu]==V` declares (from jax's metadata), e.g. '==0.0.53.*'."""
  with tempfile.TemporaryDirectory() as tmp:
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                        "--python-version", python_version_of(python), "--only-binary=:all:",
                        f"jax=={jax_version}"], text=True, capture_output=True)
    if r.returncode != 0:
      return None
    import zipfile

    wheel = next(Path(tmp).glob("jax-*.whl"))
    with zipfile.ZipFile(wheel) as z:
      meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
      text = z.read(meta).decode()
  m = re.search(r"^Requires-Dist: libtpu\s*([^;]+);\s*extra == \"tpu\"", text, flags=re.M)
  return m.group(1).strip().replace(" ", "") if m else None


def python_version_of(python: str) -> str:
  return subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                        text=True, capture_output=True, check=True).stdout.strip()


def tpu_tests_pass(uv: Uv, python: str, requirements: list[str], extras: list[str]) -> tuple[bool, str]:
  """Builds a scratch venv with ``requirements`` and runs the TPU tests in it."""
  with tempfile.TemporaryDirectory() as tmp:
    lock = Path(tmp) / "lock.txt"
    pins, err = uv.compile(python, requirements, project_extras=extras, out=lock)
    if pins is None:
      return False, err.splitlines()[-1] if err else "does not resolve"
    venv = Path(tmp) / "venv"
    uv.run("venv", "-q", "--python", python, str(venv))
    vpy = str(venv / "bin" / "python")
    uv.run("pip", "sync", "-q", "--python", vpy, str(lock))
    uv.run("pip", "install", "-q", "--python", vpy, "--no-deps", "-e", str(ROOT))
    env = {**os.environ, "REMAT_KIT_REQUIRE_TARGETS": "tpu", "JAX_PLATFORMS": "cpu"}
    # TPU tests must run, not skip; GPU ones skip (no CUDA plugin in this venv).
    r = subprocess.run([vpy, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TPU_TESTS],
                       cwd=ROOT, text=True, capture_output=True, env=env)
    last = (r.stdout.strip().splitlines() or ["no output"])[-1]
    return r.returncode == 0, last


def pick_compilers(uv: Uv, python: str, jax_version: str, extras: list[str]) -> dict:
  """The compiler requirements for ``jax_version`` on ``python``, and what was substituted."""
  base = [f"jax=={jax_version}", f"jaxlib=={jax_version}"]
  found: dict = {"requirements": [], "notes": [], "targets": []}
  # TPU.
  pin = libtpu_pin(uv, python, jax_version)
  pins, err = uv.compile(python, base + [f"jax[tpu]=={jax_version}"])
  if pins is not None and "libtpu" in pins:
    found["requirements"].append(f"libtpu=={pins['libtpu']}")
    found["tpu"] = f"libtpu=={pins['libtpu']}"
    found["targets"].append("tpu")
  else:
    say(f"jax[tpu]=={jax_version} pins libtpu{pin or '?'}, which the index does not have")
    bound = (pin or "").lstrip("=").rstrip(".*")
    tried = []
    for _ in range(MAX_LIBTPU_TRIES):
      spec = f"libtpu<{bound}" if bound else "libtpu"
      cand, _ = uv.compile(python, [spec])
      if cand is None or "libtpu" not in cand:
        break
      version = cand["libtpu"]
      say(f"  trying libtpu=={version}: building a venv and running the TPU tests ...")
      ok, last = tpu_tests_pass(uv, python, base + [f"libtpu=={version}"], extras)
      tried.append(f"libtpu=={version}: {'passed' if ok else 'failed'} ({last})")
      say(f"  {tried[-1]}")
      if ok:
        found["requirements"].append(f"libtpu=={version}")
        found["tpu"] = f"libtpu=={version}"
        found["targets"].append("tpu")
        found["notes"].append(
            f"libtpu=={version} instead of jax[tpu]=={jax_version}'s libtpu{pin} "
            f"(not on the index); the TPU tests passed with it")
        break
      bound = version
    if "tpu" not in found:
      found["notes"].append(f"no TPU compiler: jax[tpu]=={jax_version}'s libtpu{pin} is not on "
                            f"the index and no earlier libtpu passed the TPU tests ({tried})")
  # GPU.
  for pkg in ("jax-cuda12-plugin", "jax-cuda13-plugin"):
    pins, err = uv.compile(python, base + [f"{pkg}=={jax_version}"])
    if pins is not None:
      found["requirements"].append(f"{pkg}=={jax_version}")
      found["gpu"] = f"{pkg}=={jax_version}"
      found["targets"].append("gpu")
      if pkg != "jax-cuda12-plugin":
        found["notes"].append(f"{pkg}=={jax_version}: jax-cuda12-plugin=={jax_version} is not "
                              "on the index")
      break
  else:
    found["notes"].append(f"no GPU compiler: neither jax-cuda12-plugin nor jax-cuda13-plugin "
                          f"=={jax_version} is on the index")
  return found


def write_lock(uv: Uv, name: str, python: str, requirements: list[str], extras: list[str],
               header: list[str]) -> dict[str, str]:
  path = LOCKS / f"{name}.txt"
  pins, text = uv.compile(python, requirements, project_extras=extras, out=path)
  if pins is None:
    raise SystemExit(f"lock: {name} does not resolve:\n{text}")
  # The requirements file was a temporary one: name the command that wrote it instead.
  body = re.sub(r"-r \S*requirements\.in", "make lock", path.read_text())
  header = [*header[:1], f"resolved on {datetime.date.today()} by uv {uv_version(uv)}", *header[1:]]
  path.write_text("".join(f"# {h}\n" for h in header) + body)
  say(f"wrote {path.relative_to(ROOT)} ({len(pins)} packages: jax {pins.get('jax')}, "
      f"flax {pins.get('flax')})")
  return pins


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--uv", default=str(ROOT / ".uv" / "bin" / "uv"))
  parser.add_argument("--no-test", action="store_true", help="write the locks; run no tests")
  parser.add_argument("--jax", help="lock this JAX instead of the newest")
  parser.add_argument("--no-record", action="store_true",
                      help="keep tests/fixtures/xla as it is (not re-recorded)")
  args = parser.parse_args()
  if not Path(args.uv).exists() and not shutil.which(args.uv):
    raise SystemExit(f"lock: no uv at {args.uv}; run `make lock`, which installs it")
  uv = Uv(args.uv)
  LOCKS.mkdir(exist_ok=True)
  published = json.loads(PUBLISHED.read_text()) if PUBLISHED.exists() else {}
  summary: list[str] = []
  for minor in NEWEST_PYTHONS:
    python = find_python(minor)
    if python is None:
      say(f"no Python {minor} here: locks/newest-py{minor}.txt left as it is")
      continue
    version = newest_jax(uv, python, args.jax if minor != "3.11" else None)
    say(f"Python {minor}: newest jax is {version}")
    comp = pick_compilers(uv, python, version, NEWEST_EXTRAS)
    reqs = [f"jax=={version}", f"jaxlib=={version}", *comp["requirements"], *INSTALLERS]
    header = [f"leg: newest (Python {minor}), written by `make lock`",
              f"targets: {' '.join(comp['targets']) or 'none'}",
              *[f"substituted: {n}" for n in comp["notes"]]]
    write_lock(uv, f"newest-py{minor}", python, reqs, NEWEST_EXTRAS, header)
    published_entry = {k: comp[k] for k in ("tpu", "gpu") if k in comp}
    published_entry["notes"] = comp["notes"]
    published[version] = published_entry
    summary += [f"newest-py{minor}: jax {version}; " + "; ".join(
        [f"{k} {comp[k]}" for k in ("tpu", "gpu") if k in comp] + comp["notes"])]
  for name, minor, version, extras in FIXED:
    python = find_python(minor)
    if python is None:
      say(f"no Python {minor} here: locks/{name}.txt left as it is")
      continue
    write_lock(uv, name, python, [f"jax=={version}", f"jaxlib=={version}", *INSTALLERS], extras,
               [f"leg: JAX {version} (Python {minor}), written by `make lock`", "targets: none"])
  PUBLISHED.write_text(json.dumps(dict(sorted(published.items())), indent=1) + "\n")
  say("summary:")
  for line in summary:
    print(f"  {line}")
  if not args.no_record:
    # The golden dumps tests/test__xla.py reads follow the locked compilers.
    say("re-recording tests/fixtures/xla with the newest lock's compilers")
    for cmd in (["make", "install"], [str(ROOT / ".venv" / "bin" / "python"),
                                      "tests/fixtures/xla/record.py"]):
      if subprocess.run(cmd, cwd=ROOT).returncode:
        raise SystemExit(f"lock: `{' '.join(cmd)}` failed: the fixtures were not re-recorded")
  if args.no_test:
    return 0
  say("running `make test` on the new locks")
  return subprocess.run(["make", "test"], cwd=ROOT).returncode


if __name__ == "__main__":
  sys.exit(main())
