"""remat_kit._xla: the XLA text parsers, on golden dumps from the oldest and newest JAX.

``tests/fixtures/xla/jax-<version>-<target>/`` holds what ``record.py`` there wrote:
the dumps ``explain_peak`` reads, ``compiled.as_text()`` and the compiler's memory
figures, for CPU, ``tpu:v5e:2x2`` and ``gpu:h100`` compiles of one tagged layer scan
on JAX 0.10.0 and 0.12.0.1. The parsers are checked against the compiler's own figures,
not against themselves.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

from remat_kit import _jaxpr, _xla, targets
from remat_kit.report import compiled, peak

FIXTURES = sorted(p for p in (pathlib.Path(__file__).parent / "fixtures" / "xla").iterdir()
                  if p.is_dir())


def _read(d, name):
  return (d / name).read_text()


@pytest.fixture(params=FIXTURES, ids=lambda p: p.name)
def dump(request):
  d = request.param
  return d, json.loads(_read(d, "memory.json"))


def test_the_fixtures_cover_both_ends_and_three_compilers():
  names = {p.name for p in FIXTURES}
  for version in ("0.10.0", "0.12.0.1"):
    for target in ("cpu", "tpu-v5e-2x2", "gpu-h100"):
      assert f"jax-{version}-{target}" in names


def test_allocations_add_up_to_the_compilers_figures(dump):
  d, mem = dump
  allocs = _xla.allocations(_read(d, "after_optimizations-buffer-assignment.txt"))
  device = [a for a in allocs if a.color == 0]
  assert sum(a.size for a in device if a.parameter is not None) == mem["argument_size"]
  outputs = [a for a in device if a.resident and a.parameter is None and not a.constant]
  assert sum(a.size for a in outputs) == mem["output_size"]
  if "tpu" not in d.name:  # the TPU compiler reports its temp as 0 and sizes it elsewhere
    assert sum(a.size for a in device if not a.resident) == mem["temp_size"]


def test_every_temp_value_has_a_live_range(dump):
  d, _ = dump
  allocs = _xla.allocations(_read(d, "after_optimizations-buffer-assignment.txt"))
  ranges, horizon = _xla.live_ranges(_read(d, "after_optimizations-live-range.txt"))
  values = [v for a in allocs if not a.resident and a.color >= 0 for v, _, _ in a.values]
  assert values and all(v in ranges for v in values)
  assert all(0 <= s <= e <= horizon for s, e in ranges.values())


def test_the_program_keeps_op_names_and_source_lines(dump):
  d, _ = dump
  prog = _xla.Program(_read(d, "after_optimizations.txt"))
  assert prog.root
  tagged = [(op, src) for op, name, src in prog.info.values() if "rkn0" in name]
  assert tagged, "the `checkpoint_name` scope reached no op_name"
  assert any(src and "record.py" in src for _, src in tagged)


def test_bytes_moved_counts_at_least_the_arguments_and_outputs(dump):
  d, mem = dump
  hbm, host = _xla.bytes_moved(_read(d, "compiled.txt"))
  assert host == 0  # nothing offloaded
  assert hbm >= mem["argument_size"] + mem["output_size"]
  assert targets.bytes_moved is _xla.bytes_moved


def _loss():
  import importlib.util
  spec = importlib.util.spec_from_file_location("record", FIXTURES[0].parent / "record.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.loss


def test_explain_peak_reads_each_compilers_dumps_and_reconciles(dump):
  """The whole explain_peak pipeline on each recorded compile: the saved `pre` per layer
  is found, and the total agrees with the compiler's figures (else it raises)."""
  d, mem = dump
  args = (jax.ShapeDtypeStruct((4, 128, 128), jnp.float32),
          jax.ShapeDtypeStruct((256, 128), jnp.float32))
  run, marks, leaves = _jaxpr.marked(_loss(), *args)
  jax.eval_shape(jax.grad(run), *leaves)  # the trace that numbers the scopes
  compiler = {k: v for k, v in mem.items() if isinstance(v, int)}
  c = compiled.from_dumps(
      _read(d, "after_optimizations.txt"), _read(d, "after_optimizations-buffer-assignment.txt"),
      _read(d, "after_optimizations-live-range.txt"), marks,
      ["parameter", "input"], ["ws", "x"], ["gradient"], mem["target"], compiler)
  rep = peak._explain(c, 20)
  peak._reconcile(rep, targets.parse_target(mem["target"]))
  assert rep.by_kind.get("saved residual", 0) >= 4 * 256 * 128 * 4  # `pre`, one per layer
  # a compiler that says it holds ten times as much: the report is short, and says so
  bad = dict(rep.compiler, argument_size=rep.compiler["argument_size"] + 10 * rep.peak_bytes)
  if "total_allocation" in bad:
    bad["total_allocation"] += 10 * rep.peak_bytes
  with pytest.raises(RuntimeError, match="`explain_peak`.*memory analysis says"):
    peak._reconcile(peak.PeakReport(rep.peak_bytes, rep.rows, rep.target, rep.at, bad,
                                    rep.by_kind, rep.live_bytes, rep.by_memory),
                    targets.parse_target(mem["target"]))
