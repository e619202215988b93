"""remat_kit.targets: deviceless TPU and GPU compiles through the readouts."""

import importlib.metadata
import json
import re

import jax
import jax.numpy as jnp
import pytest

import remat_kit as rk
from remat_kit import targets
from remat_kit.report.estimate import estimate_seconds

# The size of the targets issue: 8 layers of 1024 x 1024 at batch 4096, never allocated.
WS = [jax.ShapeDtypeStruct((1024, 1024), jnp.float32)] * 8
X = jax.ShapeDtypeStruct((4096, 1024), jnp.float32)


def _layer(w, x):
  h = jnp.tanh(x @ w)
  h = jnp.sin(h @ w)
  return jnp.cos(h @ w)


def _loss(policy):
  step = _layer if policy is None else rk.remat(_layer, policy=policy)

  def loss(ws, x):
    for w in ws:
      x = step(w, x)
    return jnp.sum(x)

  return loss


# A target whose compiler is not installed skips with the reason targets.compiler gives
# (the root conftest.py), or fails where the lock installs it (REMAT_KIT_REQUIRE_TARGETS).
@pytest.mark.parametrize("target", ["tpu:v5e:2x2", "gpu:h100"])
@pytest.mark.slow
def test_report_matches_a_direct_deviceless_compile(target):
  none = rk.memory_report(_loss(None), WS, X, target=target, label="none")
  full = rk.memory_report(_loss("full"), WS, X, target=target, label="full")
  # The same gradient compiled by hand on the same compile-only device.
  t = targets.parse_target(target)
  direct = jax.jit(jax.grad(_loss("full"))).lower(*targets.place((WS, X), t)).compile()
  ma = direct.memory_analysis()
  assert full.compiled["temp_size"] == pytest.approx(ma.temp_size_in_bytes, rel=0.01)
  assert full.to_dict()["target"] == target and full.backend == t.platform
  # The accelerator keeps loop remat, which the local CPU compiler would undo.
  assert full.compiled["temp_size"] < 0.5 * none.compiled["temp_size"]
  for rep in (none, full):
    assert isinstance(rep.estimated_seconds, float) and rep.estimated_seconds > 0
    assert rep.to_dict()["estimated_seconds"] == rep.estimated_seconds
    assert "roofline" in rep.estimate_source
  assert full.estimated_seconds > none.estimated_seconds  # recompute costs time
  assert full.live_peak_bytes is None and "nothing runs" in full.live_peak_note


def test_local_target_is_todays_behaviour():
  rep = rk.memory_report(_loss("full"), [jnp.eye(8)] * 2, jnp.ones((4, 8)), target="cpu")
  assert rep.target == "cpu" and rep.estimated_seconds is None
  assert "timed, not estimated" in rep.estimate_source


@pytest.mark.parametrize("bad, match", [
    ("tpu:v9z:2x2", "unknown TPU generation"),
    ("tpu:v5e", r"'tpu:<generation>:<topology>'"),
    ("gpu:rtx", "a GPU target is 'gpu:<model>'"),
    ("npu", "unknown target"),
    (3, "must be a str"),
])
def test_bad_targets_list_working_examples(bad, match):
  with pytest.raises(ValueError, match=match) as e:
    targets.parse_target(bad)
  assert "'tpu:v5e:2x2'" in str(e.value) and "'gpu:h100'" in str(e.value)


def test_hbm_bytes_count_loop_bodies_per_trip():
  hlo = """HloModule m

%body (p: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %p = (s32[], f32[4,4]) parameter(0)
  %g = f32[4,4]{1,0} get-tuple-element(%p), index=1
  %f = f32[4,4]{1,0} fusion(%g), kind=kLoop, calls=%fc
  ROOT %t = (s32[], f32[4,4]) tuple(%i, %f)
}

ENTRY %main (a: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %c = f32[4,4]{1,0} copy(%a)
  %w = (s32[], f32[4,4]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %r = f32[4,4]{1,0} get-tuple-element(%w), index=1
}
"""
  # copy: 64 in + 64 out; loop fusion: (64 in + 64 out) x 5 trips.
  assert targets.hbm_bytes_moved(hlo) == 128 + 5 * 128


def test_hbm_bytes_count_a_sliced_stack_by_its_slice():
  """A fusion reading one layer of a stacked buffer through a dynamic-slice reads that
  layer, not the stack; a fused in-place update writes only the update."""
  hlo = """HloModule m

%fs (p0: f32[8,4,4], p1: s32[]) -> f32[1,4,4] {
  %p0 = f32[8,4,4]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[1,4,4]{2,1,0} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,4,4}
}

%fu (q0: f32[8,4,4], q1: f32[1,4,4], q2: s32[]) -> f32[8,4,4] {
  %q0 = f32[8,4,4]{2,1,0} parameter(0)
  %q1 = f32[1,4,4]{2,1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = f32[8,4,4]{2,1,0} dynamic-update-slice(%q0, %q1, %q2, %z, %z)
}

ENTRY %main (a: f32[8,4,4], i: s32[], u: f32[1,4,4]) -> f32[8,4,4] {
  %a = f32[8,4,4]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %u = f32[1,4,4]{2,1,0} parameter(2)
  %s = f32[1,4,4]{2,1,0} fusion(%a, %i), kind=kLoop, calls=%fs
  ROOT %w = f32[8,4,4]{2,1,0} fusion(%a, %u, %i), kind=kLoop, calls=%fu
}
"""
  # slice fusion: reads 64 of the stack + 4 (index), writes 64; update fusion: reads the
  # 64-byte update + 4 (index), writes nothing beyond it in place.
  assert targets.hbm_bytes_moved(hlo) == (64 + 4 + 64) + (0 + 64 + 4)


def test_host_copies_count_on_the_host_link_once():
  """An offloaded value's copy out (``S(5)``) and back moves its bytes once over the host
  link and once in HBM, not the copy-start tuple's three arrays."""
  hlo = """HloModule m

ENTRY %main (a: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %out = (f32[4,4]{1,0:S(5)}, f32[4,4]{1,0}, u32[]) copy-start(%a)
  %h = f32[4,4]{1,0:S(5)} copy-done(%out)
  %back = (f32[4,4]{1,0}, f32[4,4]{1,0:S(5)}, u32[]) copy-start(%h)
  ROOT %d = f32[4,4]{1,0} copy-done(%back)
}
"""
  assert targets.bytes_moved(hlo) == (64 + 64, 64 + 64)
  assert targets.hbm_bytes_moved(hlo) == 128


def test_estimate_charges_host_bytes_at_the_host_link():
  chip = targets.CHIPS["v5e"]
  fields = {"hbm_bytes_moved": 0, "host_bytes_moved": 3e9}
  seconds, source = estimate_seconds(0, fields, "tpu:v5e:2x2")
  assert seconds == pytest.approx(3e9 / chip.host_bandwidth)
  assert chip.host_bandwidth < chip.hbm_bandwidth / 10 and "host-link" in source
  # Rates passed by hand carry no host bandwidth: say so rather than leave the term out.
  seconds, source = estimate_seconds(0, fields, "tpu:v5e:2x2", rates=(1e12, 1e11, "given"))
  assert seconds is None and "host" in source


def _tpu7x_known() -> bool:
  if not targets.compiler("tpu").available:
    return True  # the test runs into CompilerMissing: skipped with its reason
  try:
    targets.parse_target("tpu:tpu7x:2x2x1").devices()
  except ValueError:  # an older libtpu refuses the topology
    return False
  return True


@pytest.mark.slow
@pytest.mark.skipif(not _tpu7x_known(), reason="this libtpu has no tpu7x (JAX 0.12's has)")
def test_tpu7x_compiles_deviceless_with_per_device_figures():
  t = targets.parse_target("tpu:tpu7x:2x2x1")
  assert len(t.devices()) == 8  # four chips, two TensorCores each
  rep = rk.memory_report(_loss("full"), WS, X, target=t)
  assert rep.compiled["temp_size"] >= 0 and rep.estimated_seconds > 0
  assert t.chip.hbm_bytes == 96 * 2**30 and "TensorCore" in t.chip.source


def test_compiler_finds_whichever_cuda_plugin_is_installed_and_names_the_one_that_exists(
    monkeypatch):
  gpu = targets.compiler("gpu")
  if gpu.available:  # CUDA 12 or 13, whichever this venv has
    assert (gpu.module, gpu.package) in targets._CUDA_PLUGINS
    assert importlib.metadata.version(gpu.package) == gpu.version
  # Without one, the error names the package the index has for this JAX, as `make lock`
  # found it (jax-cuda13-plugin for JAX 0.12.1, which has no CUDA 12 plugin).
  published = json.loads(targets._PUBLISHED.read_text()).get(jax.__version__, {})
  monkeypatch.setattr(targets, "_CUDA_PLUGINS", (("jax_plugins.no_such_plugin", "nope"),))
  targets._topology.cache_clear()
  try:
    missing = targets.compiler("gpu")
    assert not missing.available and missing.missing
    if published:
      assert missing.install == published["gpu"]
    if jax.__version__ == "0.12.1":
      assert missing.install == "jax-cuda13-plugin==0.12.1"
    with pytest.raises(targets.CompilerMissing, match=re.escape(missing.install)) as e:
      targets.parse_target("gpu:h100").devices()
    assert e.value.platform == "gpu"
  finally:
    targets._topology.cache_clear()


def test_a_substituted_libtpu_is_reported_with_the_reason():
  tpu = targets.compiler("tpu")
  published = json.loads(targets._PUBLISHED.read_text()).get(jax.__version__, {})
  if tpu.available and published.get("tpu") == f"libtpu=={tpu.version}" and any(
      n.startswith("libtpu") for n in published.get("notes", ())):
    assert tpu.note and tpu.version in tpu.note and "jax[tpu]" in tpu.note
  with pytest.raises(ValueError, match="platform must be 'tpu' or 'gpu'"):
    targets.compiler("rocm")
