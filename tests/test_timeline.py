"""memory_timeline: the compiled schedule's memory at every point, by kind, its peak
explain_peak's, its outputs (dict, HTML page, PNG) and the command line."""

import functools
import json

import jax
import jax.numpy as jnp
import pytest

import remat_kit as rk
from remat_kit.__main__ import main
from remat_kit.report.timeline import MemoryTimeline, scope_of


def _loss(w, x, policy=False):
  """Three scanned layers, each remat'd with ``policy``: a hump of saved residuals."""
  def layer(h, wi):
    h = rk.checkpoint_name(jnp.sin(h @ wi), "pre")
    return jnp.tanh(h), None
  h, _ = jax.lax.scan(rk.remat(layer, policy=policy, prevent_cse=False), x, w)
  return jnp.sum(h ** 2)


W = jax.ShapeDtypeStruct((3, 128, 128), jnp.float32)
X = jax.ShapeDtypeStruct((64, 128), jnp.float32)
POLICIES = {"none": False, "full": True}


@pytest.fixture(scope="module")
def timelines():
  return {t: rk.memory_timeline(_loss, W, X, target=t, policies=POLICIES)
          for t in ("cpu", "tpu:v5e:2x2", "gpu:h100")}


@pytest.mark.parametrize("target", ["cpu", "tpu:v5e:2x2", "gpu:h100"])
def test_peak_is_explain_peaks(timelines, target):
  tl = timelines[target]
  for label, policy in POLICIES.items():
    t = tl[label]
    want = rk.explain_peak(functools.partial(_loss, policy=policy), W, X, target=target)
    assert t.peak_bytes == want.peak_bytes
    assert t.total[t.peak_point] == want.peak_bytes
    at = {k: v[t.peak_point] for k, v in t.by_kind.items() if v[t.peak_point]}
    assert at == want.by_kind
    assert max(t.live) == t.live[t.peak_point]  # the peak is where the live bytes peak
  assert tl["full"].peak_bytes <= tl["none"].peak_bytes


@pytest.mark.parametrize("target", ["cpu", "tpu:v5e:2x2", "gpu:h100"])
def test_kinds_add_up_at_every_point(timelines, target):
  for t in timelines[target].timelines.values():
    assert all(len(v) == t.points for v in t.by_kind.values())
    for p in range(t.points):
      bufs = sum(b.bytes for b in t.buffers if b.start <= p <= b.end)
      assert bufs + t.by_kind.get("packing", [0] * t.points)[p] == t.total[p]
      for k, v in t.by_kind.items():
        if k != "packing":
          assert v[p] == sum(b.bytes for b in t.live_at(p, k)), (p, k)


def test_buffers_carry_what_the_page_shows(timelines):
  t = timelines["gpu:h100"]["none"]
  saved = t.live_at(t.peak_point, "activation")
  assert saved and all(b.op for b in saved)
  b = max(saved, key=lambda b: b.bytes)
  assert b.shape[0] == 3  # a scan's stacked residual: one slice per layer
  assert b.shape and b.dtype == "float32" and b.source and "test_timeline.py" in b.source
  assert b.start <= t.backward <= b.end
  assert {k for _, _, k in t.regions} >= {"forward · (scan body)", "backward · (scan body)"}


def test_capacity_is_the_chips(timelines):
  assert timelines["gpu:h100"].capacity_bytes == 80 * 10**9
  assert timelines["tpu:v5e:2x2"].capacity_bytes == 16 * 2**30
  assert timelines["cpu"].capacity_bytes is None


def test_to_dict_round_trips(timelines):
  tl = timelines["tpu:v5e:2x2"]
  d = json.loads(tl.to_json())
  assert MemoryTimeline.from_dict(d) == tl
  assert d["timelines"]["none"]["peak_bytes"] == tl.peaks["none"]


@pytest.mark.parametrize("target", ["cpu", "tpu:v5e:2x2", "gpu:h100"])
def test_png_and_html_written(timelines, target, tmp_path):
  tl = timelines[target]
  png = tl.to_png(str(tmp_path / "t.png"))
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  page = tl.to_html(str(tmp_path / "t.html"))
  assert (tmp_path / "t.html").read_text() == page
  assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
  assert "https://" not in page and "<script src" not in page
  assert str(tl.peaks["none"]) in page


def test_dict_of_functions_and_errors():
  fns = {"a": lambda w, x: _loss(w, x, policy=False), "b": lambda w, x: _loss(w, x, True)}
  tl = rk.memory_timeline(fns, W, X)
  assert list(tl.timelines) == ["a", "b"]
  with pytest.raises(TypeError, match="`policies`"):
    rk.memory_timeline(_loss, W, X, policies=[True])
  with pytest.raises(TypeError, match="not both"):
    rk.memory_timeline(fns, W, X, policies=POLICIES)
  with pytest.raises(TypeError, match="fn_kwargs"):
    rk.memory_timeline(_loss, W, X, policy=True)


def test_scope_of_reads_phase_and_scan():
  assert scope_of("jit(run)/transpose(jvp(GPT))/blocks/while/body/eval_jaxpr/GPTBlock/"
                  "Dense_0/rkn0/reduce_sum") == (
      "backward", "blocks (scan body)", "blocks (scan body)/GPTBlock/Dense_0")
  assert scope_of("jit(run)/jvp(GPT)/LayerNorm_0/add") == ("forward", "LayerNorm_0",
                                                          "LayerNorm_0")
  assert scope_of("") == ("", "", "")


def test_cli(tmp_path, capsys):
  case = tmp_path / "case.py"
  case.write_text(
      "import jax, jax.numpy as jnp\n"
      "def case():\n"
      "  loss = lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)\n"
      "  return ({'plain': loss}, (jax.ShapeDtypeStruct((64, 64), jnp.float32),\n"
      "          jax.ShapeDtypeStruct((8, 64), jnp.float32)))\n")
  out, png = tmp_path / "t.html", tmp_path / "t.png"
  assert main(["timeline", f"{case}:case", "--out", str(out), "--png", str(png)]) == 0
  assert out.read_text().startswith("<!doctype html>") and png.stat().st_size > 1000
  assert "plain" in capsys.readouterr().out
