"""remat_kit._xla: the XLA text parsers, on golden dumps from the oldest and newest JAX.

``tests/fixtures/xla/jax-<version>-<target>/`` holds what ``record.py`` there wrote
(``make lock`` re-records the newest): the dumps ``explain_peak`` reads,
``compiled.as_text()`` and the compiler's memory figures, for CPU, ``tpu:v5e:2x2`` and
``gpu:h100`` compiles of one tagged layer scan on the oldest JAX we support and the one
the newest lock pins, and for the newest, two more cases (``small/``, ``save_h/``). The
parsers are checked against the compiler's own figures and against tensors worked out by
hand, not against themselves.
"""

import inspect
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

from remat_kit import _jaxpr, _xla, targets
from remat_kit.report import compiled, peak, tensor

ROOT = pathlib.Path(__file__).parent / "fixtures" / "xla"
FIXTURES = sorted(p for p in ROOT.iterdir() if p.is_dir())


def _locked_jax(lock):
  text = (pathlib.Path(__file__).parents[1] / "locks" / lock).read_text()
  return re.search(r"^jax==(\S+)", text, re.M).group(1)


def _read(d, name):
  return (d / name).read_text()


@pytest.fixture(params=FIXTURES, ids=lambda p: p.name)
def dump(request):
  d = request.param
  return d, json.loads(_read(d, "memory.json"))


def test_the_fixtures_cover_both_ends_and_three_compilers():
  """The oldest JAX we support and the newest lock's, each for three compilers: a lock
  that moves JAX without re-recording (``make lock`` does) fails here."""
  names = {p.name for p in FIXTURES}
  for version in (_locked_jax("jax-0.10.0.txt"), _locked_jax("newest-py3.13.txt")):
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


def _record():
  import importlib.util
  spec = importlib.util.spec_from_file_location("record", ROOT / "record.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _loss():
  return _record().loss


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
  assert rep.by_kind.get("activation", 0) >= 4 * 256 * 128 * 4  # `pre`, one per layer
  # a compiler that says it holds ten times as much: the report is short, and says so
  bad = dict(rep.compiler, argument_size=rep.compiler["argument_size"] + 10 * rep.peak_bytes)
  if "total_allocation" in bad:
    bad["total_allocation"] += 10 * rep.peak_bytes
  with pytest.raises(RuntimeError, match="`explain_peak`.*memory analysis says"):
    peak._reconcile(peak.PeakReport(rep.peak_bytes, rep.rows, rep.target, rep.at, bad,
                                    rep.by_kind, rep.live_bytes, rep.by_memory),
                    targets.parse_target(mem["target"]))


# --------------------------------------------------------------------------
# Rows that name their tensors, on the newest compilers' dumps
# --------------------------------------------------------------------------
CASE_DIRS = [d / case for d in FIXTURES for case in ("small", "save_h") if (d / case).is_dir()]


def _from_fixture(d):
  """The recorded compile in folder ``d``, read as `compilation` reads a fresh one."""
  rec = _record()
  fn, args, argnum = rec.CASES[d.name]
  run, marks, leaves = _jaxpr.marked(fn, *args)
  jax.eval_shape(jax.grad(run, argnums=argnum), *leaves)  # the trace that numbers scopes
  mem = json.loads(_read(d, "memory.json"))
  compiler = {k: v for k, v in mem.items() if isinstance(v, int)}
  names = list(inspect.signature(fn).parameters)
  kinds = ["parameter" if i == argnum else "input" for i in range(len(args))]
  return compiled.from_dumps(
      _read(d, "after_optimizations.txt"), _read(d, "after_optimizations-buffer-assignment.txt"),
      _read(d, "after_optimizations-live-range.txt"), marks, kinds, names, ["gradient"],
      mem["target"], compiler), mem["target"]


def test_the_newest_dumps_have_the_named_cases():
  newest = _locked_jax("newest-py3.13.txt")
  for target in ("cpu", "tpu-v5e-2x2", "gpu-h100"):
    for case in ("small", "save_h"):
      assert (ROOT / f"jax-{newest}-{target}" / case / "memory.json").is_file()


@pytest.mark.parametrize("d", [d for d in CASE_DIRS if d.name == "small"],
                         ids=lambda d: d.parent.name)
def test_small_case_carries_one_512k_tensor_named_by_its_producer(d):
  """sum(tanh(x @ w) ** 2), x 256x512: the backward reads x @ w or its tanh (256x512
  float32, 512 KiB) and w. Where the compiled program carries a tensor across, it is
  that one, named by the op that made it and the recording script's line; a matmul's split-K
  partial sums or a workspace are rows of their own kinds, never activations. XLA:TPU
  may fuse the forward matmul into the gradient's kernel and carry nothing."""
  c, target = _from_fixture(d)
  rows = c.residuals()
  acts = [r for r in rows if r.kind == "activation"]
  assert len(acts) == (len(acts) if target.startswith("tpu") else 1) <= 1
  for r in acts:
    assert (r.bytes, r.shape, r.dtype) == (256 * 512 * 4, (256, 512), "float32")
    assert r.primitive in ("dot_general", "tanh")
    assert r.source.startswith("record.py:")
  assert all(r.kind in tensor.KINDS for r in rows)
  assert not [n for r in rows for n in r.names]  # no checkpoint_name: no name
  for r in rows:
    if r.kind == "split-K partials":  # a whole number of the tensor's partial sums
      assert r.bytes % (256 * 512 * 4) == 0 and r.primitive == "dot_general"
  # nothing dropped: the rows are the carried buffers, byte for byte
  carried = [b for b in c.buffers + c._in_outputs() if c.carried(b)]
  assert sum(r.bytes for r in rows) == sum(b.size for b in carried)


@pytest.mark.parametrize("d", [d for d in CASE_DIRS if d.name == "save_h"],
                         ids=lambda d: d.parent.name)
def test_save_h_credits_h_with_its_stacked_bytes(d):
  """A 6-layer scanned body under save:h, h 64x32 float32: the compiled program keeps
  h for every layer (6 x 64 x 32 x 4 bytes, more where a TPU pads it to its tiles),
  and the scan carry: each row names its op and layer."""
  c, target = _from_fixture(d)
  rows = c.residuals()
  h = [r for r in rows if r.name == "h"]
  assert len(h) == 1
  stacked = 6 * 64 * 32 * 4
  assert h[0].bytes == stacked if not target.startswith("tpu") else h[0].bytes >= stacked
  assert (h[0].layers, h[0].shape, h[0].primitive) == (6, (6, 64, 32), "sin")
  assert h[0].source.startswith("record.py:") and "scan body" in h[0].layer
  carry = [r for r in rows if r.primitive == "scan carry"]
  assert carry and carry[0].layers == 6 and carry[0].shape == (6, 64, 32)
