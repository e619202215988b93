"""The timeline page in a real browser: headless Chromium (Debian's ``chromium``), driven
over the DevTools protocol on ``--remote-debugging-pipe`` with the standard library only.

Skips, with the command that installs it, where Chromium is missing. Screenshots go to
``$RK_SCREENSHOTS`` when it is set (for a person to look at), else to the test's tmp dir.
"""

import base64
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import pytest

import remat_kit as rk

INSTALL = "apt-get install -y chromium chromium-driver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe", "--window-size=1600,1000"]


def _chromium():
  for name in ("chromium", "chromium-browser", "google-chrome"):
    if path := shutil.which(name):
      return path
  if os.environ.get("RK_INSTALL_CHROMIUM") and shutil.which("apt-get"):
    subprocess.run(INSTALL.split(), check=False, capture_output=True, timeout=600)
    return shutil.which("chromium")
  return None


_TRAMPOLINE = (
    "import os, sys\n"
    "r, w = (os.dup(int(x)) for x in sys.argv[1:3])\n"
    "r, w = os.dup2(r, 3 + 7), os.dup2(w, 4 + 7)\n"
    "os.dup2(r, 3); os.dup2(w, 4); os.close(r); os.close(w)\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n")


class Browser:
  """A headless Chromium and one page, over the DevTools pipe (fd 3 in, fd 4 out)."""

  def __init__(self, exe, profile):
    to_chrome_r, self._w = os.pipe()
    self._r, from_chrome_w = os.pipe()
    # A Python trampoline moves the pipe ends onto fds 3 and 4, where Chromium looks.
    r, w = to_chrome_r, from_chrome_w
    self.proc = subprocess.Popen(
        [sys.executable, "-c", _TRAMPOLINE, str(r), str(w), exe, *FLAGS,
         f"--user-data-dir={profile}", "about:blank"],
        pass_fds=(r, w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    self._buf, self._id, self.events = b"", 0, []
    target = self.call("Target.createTarget", url="about:blank")["targetId"]
    self.session = self.call("Target.attachToTarget", targetId=target,
                             flatten=True)["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
      self.call(f"{domain}.enable", session=True)
    self.call("Emulation.setDeviceMetricsOverride", session=True, width=1600, height=1000,
              deviceScaleFactor=1, mobile=False)

  def call(self, method, session=False, timeout=30, **params):
    self._id += 1
    msg = {"id": self._id, "method": method, "params": params}
    if session:
      msg["sessionId"] = self.session
    os.write(self._w, json.dumps(msg).encode() + b"\0")
    deadline = time.time() + timeout
    while time.time() < deadline:
      m = self._next(deadline)
      if m.get("id") == self._id:
        if "error" in m:
          raise RuntimeError(f"{method}: {m['error']}")
        return m.get("result", {})
      self.events.append(m)
    raise TimeoutError(method)

  def _next(self, deadline):
    while b"\0" not in self._buf:
      if time.time() > deadline:
        raise TimeoutError("DevTools pipe")
      chunk = os.read(self._r, 1 << 20)
      if not chunk:
        raise RuntimeError("Chromium closed the DevTools pipe")
      self._buf += chunk
    raw, self._buf = self._buf.split(b"\0", 1)
    return json.loads(raw)

  def eval(self, expr):
    r = self.call("Runtime.evaluate", session=True, expression=expr, returnByValue=True,
                  awaitPromise=True)
    if "exceptionDetails" in r:
      raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
    return r["result"].get("value")

  def open(self, url):
    self.call("Page.navigate", session=True, url=url)
    deadline = time.time() + 30
    while self.eval("document.readyState") != "complete":
      if time.time() > deadline:
        raise TimeoutError(url)
      time.sleep(0.05)

  def move(self, x, y):
    self.call("Input.dispatchMouseEvent", session=True, type="mouseMoved", x=x, y=y)

  def click(self, x, y):
    for kind in ("mousePressed", "mouseReleased"):
      self.call("Input.dispatchMouseEvent", session=True, type=kind, x=x, y=y,
                button="left", clickCount=1)

  def screenshot(self, path):
    data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
    pathlib.Path(path).write_bytes(base64.b64decode(data))

  def errors(self):
    out = []
    for m in self.events:
      p = m.get("params", {})
      if m.get("method") == "Runtime.exceptionThrown":
        d = p["exceptionDetails"]
        out.append(d.get("exception", {}).get("description") or d.get("text"))
      elif m.get("method") == "Runtime.consoleAPICalled" and p.get("type") == "error":
        out.append(p["args"])
      elif m.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
        out.append(p["entry"]["text"])
    return out

  def close(self):
    try:
      self.call("Browser.close", timeout=5)
    except (RuntimeError, TimeoutError, OSError):
      pass
    try:
      self.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.proc.kill()
    os.close(self._w)
    os.close(self._r)


def _loss(w, x, policy=False):
  def layer(h, wi):
    return jnp.tanh(rk.checkpoint_name(jnp.sin(h @ wi), "pre")), None
  h, _ = jax.lax.scan(rk.remat(layer, policy=policy, prevent_cse=False), x, w)
  return jnp.sum(h ** 2)


W = jax.ShapeDtypeStruct((4, 256, 256), jnp.float32)
X = jax.ShapeDtypeStruct((128, 256), jnp.float32)
TARGET = "gpu:h100"


@pytest.fixture(scope="module")
def page():
  exe = _chromium()
  if exe is None:
    pytest.skip(f"Chromium is not installed; install it with `{INSTALL}` (Debian), or set "
                "RK_INSTALL_CHROMIUM=1 to let this test run apt-get.")
  tl = rk.memory_timeline(_loss, W, X, target=TARGET,
                          policies={"none": False, "full": True})
  shots = os.environ.get("RK_SCREENSHOTS") or tempfile.mkdtemp(prefix="rk_shots_")
  os.makedirs(shots, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="rk_chromium_") as profile:
    html = pathlib.Path(profile) / "timeline.html"
    tl.to_html(str(html))
    b = Browser(exe, os.path.join(profile, "profile"))
    try:
      b.open(html.as_uri())
      yield b, tl, shots
    finally:
      b.close()


def test_loads_without_console_errors(page):
  b, _, shots = page
  b.screenshot(os.path.join(shots, "timeline_loaded.png"))
  assert b.errors() == []
  assert b.eval("document.querySelectorAll('#chart path.band').length") > 3


def test_peak_shown_is_explain_peaks(page):
  b, tl, _ = page
  want = rk.explain_peak(functools.partial(_loss, policy=False), W, X, target=TARGET)
  assert int(b.eval("document.getElementById('peak-label').dataset.bytes")) == \
      want.peak_bytes
  assert f"{want.peak_bytes:,}" in b.eval("document.getElementById('peak-label').textContent")
  assert tl["none"].peak_bytes == want.peak_bytes


def test_hover_top_band_at_peak_lists_largest_buffer(page):
  b, tl, shots = page
  t = tl["none"]
  # The top band at the peak that holds buffers (above it lies only the packing), of
  # those thick enough to point at (2% of the peak).
  kind = [k for k, v in t.by_kind.items()
          if v[t.peak_point] > 0.02 * t.peak_bytes and k != "packing"][-1]
  largest = t.live_at(t.peak_point, kind)[0]
  at = b.eval(f"rkTimeline.bandCenter({t.peak_point}, {json.dumps(kind)})")
  b.move(at["x"], at["y"])
  b.screenshot(os.path.join(shots, "timeline_hover_peak.png"))
  first = b.eval("document.querySelector('#details tr.buf .bname').textContent")
  assert first == (largest.name or largest.op)
  assert "(the peak)" in b.eval("document.getElementById('details').textContent")
  assert b.errors() == []


def test_policy_switch_changes_chart(page):
  b, tl, shots = page
  before = b.eval("document.querySelector('#chart').innerHTML")
  at = b.eval("(r => ({x: r.left + r.width / 2, y: r.top + r.height / 2}))("
              "document.querySelector('#switch button[data-index=\"1\"]')"
              ".getBoundingClientRect())")
  b.click(at["x"], at["y"])
  after = b.eval("document.querySelector('#chart').innerHTML")
  assert after != before
  assert b.eval("document.getElementById('chart').dataset.policy") == "full"
  assert int(b.eval("document.getElementById('peak-label').dataset.bytes")) == \
      tl["full"].peak_bytes != tl["none"].peak_bytes
  b.screenshot(os.path.join(shots, "timeline_full.png"))
  assert b.errors() == []
