"""rk.pipeline: equal to the sequential stages (values and gradients), schedules, errors.

The equivalence checks run on 4 and 8 simulated CPU devices in a subprocess
(``--xla_force_host_platform_device_count``), against a reference written here
by hand: every microbatch (rows ``m, m + M, ...``) through pieces ``0 .. S*R-1``
in order, piece ``v = r * S + s`` at ``stage_params[s]`` (GPipe) or
``stage_params[s, r]`` (circular), dropout key ``fold_in(fold_in(key, v), m)``.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import remat_kit as rk
from remat_kit.pipelining import schedule_info

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
  import json, sys
  import jax, jax.numpy as jnp, numpy as np
  jax.config.update("jax_numpy_rank_promotion", "raise")
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  from jax.sharding import NamedSharding, PartitionSpec as P
  import remat_kit as rk

  n = jax.device_count()
  D = 8

  def stage(w, x, key=None):
    y = jnp.tanh(x @ w["w"] + w["b"][None])
    if key is not None:  # dropout: a different mask for every (piece, microbatch)
      keep = jax.random.bernoulli(key, 0.75, y.shape)
      y = jnp.where(keep, y / 0.75, jnp.zeros_like(y))
    return y

  def reference(params, x, keys, S, R, M, circular):
    """Pieces 0 .. S*R-1 in order (a scan), each on all microbatches at once."""
    pieces = jax.tree_util.tree_map(lambda a: jnp.stack(
        [a[v % S, v // S] if circular else a[v] for v in range(S * R)]), params)
    h = jnp.stack([x[m::M] for m in range(M)])  # microbatch m: rows m, m + M, ...

    def piece(h, pk):
      p, k = pk
      if keys is None:
        return jax.vmap(lambda hm: stage(p, hm))(h), None
      return jax.vmap(lambda hm, km: stage(p, hm, km))(h, k), None

    h = jax.lax.scan(piece, h, (pieces, keys))[0]
    return jnp.swapaxes(h, 0, 1).reshape(x.shape)  # row m + i*M is h[m, i]

  def case(schedule, M, R=None, policy=None, key=False, data=1, **kw):
    S = n // data
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(data, S), ("data", "stage"))
    run = rk.pipeline(stage, mesh=mesh, microbatches=M, policy=policy, schedule=schedule,
                      layers_per_stage=R, **kw)
    lead = (S,) if R is None else (S, R)
    ks = jax.random.split(jax.random.key(0), 4)
    params = {"w": jax.random.normal(ks[0], lead + (D, D)) * 0.6,
              "b": jax.random.normal(ks[1], lead + (D,)) * 0.1}
    params = jax.device_put(params, NamedSharding(mesh, P("stage")))
    B = 2 * M * data
    x = jax.device_put(jax.random.normal(ks[2], (B, D)), NamedSharding(mesh, P("data")))
    c = jax.random.normal(ks[3], (B, D))
    k = jax.random.key(7) if key else None
    kwargs = {"key": k} if key else {}
    fold = lambda v, m: jax.random.fold_in(jax.random.fold_in(k, v), m)
    pieces_by_mb = jnp.arange(S * (R or 1))[:, None], jnp.arange(M)[None, :]
    keys = None if k is None else jax.jit(jnp.vectorize(fold))(*pieces_by_mb)  # [v, m]
    ref = lambda p, x: reference(p, x, keys, S, R or 1, M, schedule == "circular")
    def both(f):  # one compile for the value and the gradient
      loss = lambda p, x: (jnp.sum(f(p, x) * c), f(p, x))
      return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)[::-1]
    (y, g), (y0, g0) = both(lambda p, x: run(p, x, **kwargs)), both(ref)
    err = lambda a, b: max(float(jnp.max(jnp.abs(u - v)))
                           for u, v in zip(jax.tree_util.tree_leaves(a),
                                           jax.tree_util.tree_leaves(b)))
    return {"name": f"{schedule} M={M} R={R} policy={policy} key={key} data={data} {kw}",
            "forward": err(y, y0), "grad": err(g, g0),
            "scale": float(jnp.max(jnp.abs(g0[0]["w"]))),
            "bubble": run.bubble_fraction, "iterations": run.info.iterations}

  cases = [  # M < S, M = S and M > S (for circular: microbatches wait between rounds)
      case("gpipe", M=n),
      case("circular", M=n + 2, R=2, key=True),
      case("gpipe", M=2, data=2, policy="full", key=True),
  ]
  if n == 4:  # the rest once, on the smaller mesh
    cases += [
        case("gpipe", M=n, key=True, iteration_policy="offload:iteration_input"),
        case("circular", M=2, R=2, policy=True, iteration_policy=None),
    ]
  print(json.dumps(cases))
''')


@pytest.fixture(scope="module", params=[4, 8], ids=lambda n: f"{n}dev")
def equivalence(request):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={request.param}")
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-4000:]
  return request.param, json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_forward_and_gradients_equal_the_sequential_stages(equivalence):
  """GPipe and circular, with and without remat (in the stage and around each
  iteration, saved or offloaded), dropout keys per microbatch and piece, and a data
  axis composing on the mesh: values and gradients match the hand-written program."""
  n, cases = equivalence
  bad = [c for c in cases if c["forward"] > 1e-4 or c["grad"] > 1e-4 * max(1.0, c["scale"])]
  assert not bad, bad
  assert {c["name"].split()[0] for c in cases} == {"gpipe", "circular"}


@pytest.mark.slow
def test_subprocess_reports_the_schedule(equivalence):
  n, cases = equivalence
  gpipe = cases[0]  # S = n stages, M = n microbatches
  assert gpipe["iterations"] == 2 * n - 1
  assert gpipe["bubble"] == pytest.approx((n - 1) / (2 * n - 1))


# ---- schedules ---------------------------------------------------------------------------
@pytest.mark.parametrize("stages", [1, 2, 4, 8])
@pytest.mark.parametrize("microbatches", [1, 3, 4, 16])
def test_gpipe_bubble_is_the_formula(stages, microbatches):
  info = schedule_info("gpipe", stages=stages, microbatches=microbatches)
  assert info.iterations == microbatches + stages - 1
  assert info.bubble_fraction == pytest.approx((stages - 1) / (microbatches + stages - 1))


@pytest.mark.parametrize("stages,microbatches,rounds", [(4, 4, 2), (4, 8, 3), (8, 16, 2),
                                                        (2, 5, 4), (4, 2, 2), (8, 1, 3)])
def test_circular_bubble_is_the_formula(stages, microbatches, rounds):
  info = schedule_info("circular", stages=stages, microbatches=microbatches, rounds=rounds)
  if microbatches >= stages:  # no waiting between rounds
    assert info.bubble_fraction == pytest.approx(
        (stages - 1) / (rounds * microbatches + stages - 1))
  else:  # a round cannot start before the previous one has left the ring: period S
    assert info.iterations == (rounds - 1) * stages + microbatches + stages - 1
  assert info.bubble_fraction == pytest.approx(
      1 - rounds * microbatches / info.iterations)


@pytest.mark.parametrize("schedule,stages,microbatches,rounds",
                         [("gpipe", 4, 6, 1), ("circular", 4, 6, 2), ("circular", 4, 2, 3)])
def test_slot_table_is_a_valid_schedule(schedule, stages, microbatches, rounds):
  """Each (microbatch, round) visits every stage once, stage s one iteration after
  stage s - 1, and round r + 1 starts at stage 0 after round r left the last stage."""
  table = schedule_info(schedule, stages=stages, microbatches=microbatches,
                        rounds=rounds).table()
  when = {}
  for t, row in enumerate(table):
    for s, slot in enumerate(row):
      if slot is not None:
        assert (slot, s) not in when
        when[slot, s] = t
  assert len(when) == stages * microbatches * rounds
  for (m, r), s in [(k, s) for k, s in when if s > 0]:
    assert when[(m, r), s] == when[(m, r), s - 1] + 1
  for m in range(microbatches):
    for r in range(1, rounds):
      assert when[(m, r), 0] > when[(m, r - 1), stages - 1]


# ---- in-process: the pytest process has 8 CPU devices ----------------------------------
def _mesh(shape=(4,), axes=("stage",)):
  n = int(np.prod(shape))
  return jax.sharding.Mesh(np.array(jax.devices()[:n]).reshape(shape), axes)


def _stage(w, x):
  return jnp.tanh(x @ w)


def test_jit_and_no_retrace():
  traces = []

  def stage(w, x):
    traces.append(1)
    return jnp.tanh(x @ w)

  run = rk.pipeline(stage, mesh=_mesh(), microbatches=4)
  w, x = jnp.stack([jnp.eye(3) * 0.5] * 4), jnp.ones((8, 3))
  first = run(w, x)
  n = len(traces)
  again = run(w, x)
  jitted = jax.jit(run)(w, x)
  assert len(traces) == n  # checked once per signature; the inner jit is cached, traced once
  np.testing.assert_allclose(first, again)
  np.testing.assert_allclose(first, jitted, rtol=1e-6)
  np.testing.assert_allclose(first, run.sequential(w, x), rtol=1e-6)


def test_gpt_blocks_through_the_pipeline():
  """The docs' example: GPT blocks scanned with rk.remat_scan inside each stage."""
  block = rk.models.GPTBlock(d_model=16, num_heads=2, dropout_rate=0.0)
  x = jax.random.normal(jax.random.key(0), (8, 4, 16))
  one = block.init(jax.random.key(1), x[:1], train=False)["params"]
  stack = lambda n: jax.tree_util.tree_map(lambda a: jnp.stack([a * (1 + 0.1 * i)
                                                                 for i in range(n)]), one)
  params = jax.tree_util.tree_map(lambda a: a.reshape((4, 2) + a.shape[1:]), stack(8))

  def stage_fn(p, h):  # two layers per stage
    body = lambda c, q: (block.apply({"params": q}, c, train=False), None)
    return rk.remat_scan(body, h, p, policy="save_dots_no_batch")[0]

  run = rk.pipeline(stage_fn, mesh=_mesh(), microbatches=4, policy=None)
  y = run(params, x)
  h = x
  for layer in range(8):
    h = block.apply({"params": jax.tree_util.tree_map(lambda a, i=layer: a[i], stack(8))}, h,
                    train=False)
  np.testing.assert_allclose(y, h, rtol=2e-4, atol=2e-4)


# ---- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(mesh="4 chips"), TypeError, ["`mesh`", "'4 chips'", "jax.sharding.Mesh"]),
    (dict(axis="pipe"), ValueError, ["`axis`='pipe'", "['stage']", "Pass `axis=`"]),
    (dict(schedule="1f1b"), ValueError, ["`schedule`", "'1f1b'", "'gpipe', 'circular'"]),
    (dict(microbatches=0), ValueError, ["`microbatches`", "got 0"]),
    (dict(microbatches=2.0), ValueError, ["`microbatches`", "got 2.0"]),
    (dict(layers_per_stage=2), ValueError, ["`layers_per_stage`=2", "schedule='circular'"]),
    (dict(schedule="circular"), ValueError, ["`layers_per_stage`", "circular"]),
])
def test_bad_arguments_are_clear_errors(kwargs, exc, words):
  args = dict(mesh=_mesh(), microbatches=4) | kwargs
  with pytest.raises(exc) as e:
    rk.pipeline(_stage, **args)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


def test_mesh_with_other_axes_names_them():
  with pytest.raises(ValueError, match=r"axes are \['data', 'model'\].*'data': 2"):
    rk.pipeline(_stage, mesh=_mesh((2, 4), ("data", "model")), microbatches=2)


def test_microbatches_must_divide_the_batch():
  run = rk.pipeline(_stage, mesh=_mesh(), microbatches=3)
  with pytest.raises(ValueError) as e:
    run(jnp.stack([jnp.eye(2)] * 4), jnp.ones((8, 2)))
  msg = str(e.value)
  assert "`microbatches`=3" in msg and "batch of 8" in msg and "[1, 2, 4, 8]" in msg


def test_stage_fn_that_changes_shape_is_a_clear_error():
  run = rk.pipeline(lambda w, x: x @ w, mesh=_mesh(), microbatches=2)
  with pytest.raises(ValueError) as e:
    run(jnp.ones((4, 3, 5)), jnp.ones((4, 3)))
  msg = str(e.value)
  assert "`stage_fn`" in msg and "(2, 3)" in msg and "(2, 5)" in msg and "outside `run`" in msg


def test_stage_params_without_the_stage_axis():
  run = rk.pipeline(_stage, mesh=_mesh(), microbatches=2)
  with pytest.raises(ValueError, match=r"stage_params.*\(3, 3\).*leading axes \(4,\)"):
    run(jnp.eye(3), jnp.ones((4, 3)))
  circ = rk.pipeline(_stage, mesh=_mesh(), microbatches=2, schedule="circular",
                     layers_per_stage=2)
  with pytest.raises(ValueError, match=r"\(4, 2\).*`layers_per_stage`"):
    circ(jnp.ones((4, 3, 3)), jnp.ones((4, 3)))


def test_key_needs_a_stage_fn_that_takes_one():
  run = rk.pipeline(_stage, mesh=_mesh(), microbatches=2)
  with pytest.raises(TypeError, match="Add a `key` parameter"):
    run(jnp.stack([jnp.eye(3)] * 4), jnp.ones((4, 3)), key=jax.random.key(0))
