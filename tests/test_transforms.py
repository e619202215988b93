"""remat, remat_sequential and remat_scan: same values, promised residuals, no retrace."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _facts import TANH_DERIVATIVE
from jax import lax

import remat_kit as rk
from remat_kit import _jax
from remat_kit import policies as P
from remat_kit.report import compiled_memory, saved_residuals

B, D, H = 4, 8, 16
F32 = 4


def mlp(w1, w2, x):
  h = rk.checkpoint_name(x @ w1, "proj")        # (B, H)
  a = rk.checkpoint_name(jnp.tanh(h), "act")    # (B, H)
  out = a @ w2                                  # (B, D)
  return jnp.sum(jnp.sin(out))


def _args(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k1, (D, H)) / 3, jax.random.normal(k2, (H, D)) / 4,
          jax.random.normal(k3, (B, D)))


BH, BD = B * H * F32, B * D * F32
TANH_D = TANH_DERIVATIVE  # what JAX saves for tanh's derivative
# What each policy promises to keep of `mlp`, as (label, bytes) of the saved
# activations: the tag for named values, the producing primitive otherwise.
# Worked out by hand from the function: the two dots are (B,H) and (B,D); the
# backward pass of tanh needs its output and of sin needs cos(out). The tanh
# output *is* `act`: one buffer, counted once.
PROMISES = {
    "no remat": (False, [("act", BH), ("cos", BD), (TANH_D, BH)]),
    "full": (True, []),
    "save_dots": ("save_dots", [("dot_general", BD), ("dot_general", BH)]),
    "minimal": ("minimal", [("dot_general", BD), ("dot_general", BH)]),
    "save act": ("save:act", [("act", BH)]),
    "save proj,act": ("save:proj,act", [("act", BH), ("proj", BH)]),
    "dict plan": ({"act": "save", "*": "recompute"}, [("act", BH)]),
    "names but act": ("names_but:act", [("proj", BH)]),
    "except act": ("except:act", [("cos", BD), ("proj", BH), (TANH_D, BH)]),
    "prims tanh": ("prims:tanh", [("tanh", BH)]),
    "size <= BD": (P.save_by_size(max_bytes=BD), [("cos", BD)]),
    "union": ("save:act | save_dots", [("act", BH), ("dot_general", BD), ("dot_general", BH)]),
    "intersection": (P.dots_saveable() & P.save_by_size(max_bytes=BD), [("dot_general", BD)]),
    "jax policy": (jax.checkpoint_policies.save_only_these_names("act"), [("act", BH)]),
}


def _activations(fn, *args):
  return sorted((r.label, r.bytes) for r in saved_residuals(fn, *args) if r.kind == "activation")


@pytest.mark.parametrize("case", list(PROMISES))
def test_policy_saves_what_it_promises(case, remat_impl):
  policy, promised = PROMISES[case]
  args = _args()
  f = rk.remat(mlp, policy=policy)
  # (b) what is saved, by name and bytes
  assert _activations(f, *args) == sorted(promised)
  # (a) values and gradients equal those without remat
  chex.assert_trees_all_close(f(*args), mlp(*args), rtol=1e-6)
  g_ref = jax.grad(mlp, argnums=(0, 1, 2))(*args)
  g = jax.grad(f, argnums=(0, 1, 2))(*args)
  chex.assert_trees_all_close(g, g_ref, rtol=1e-6, atol=1e-7)
  # (c) jitted and not agree
  g_jit = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*args)
  chex.assert_trees_all_close(g_jit, g, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["full", "save act", "except act", "union"])
def test_second_call_does_not_retrace(case):
  policy, _ = PROMISES[case]
  traces = []

  def counted(w1, w2, x):
    traces.append(1)
    return mlp(w1, w2, x)

  step = jax.jit(jax.grad(rk.remat(counted, policy=policy)))
  step(*_args(0))
  first = len(traces)
  step(*_args(1))
  assert len(traces) == first, f"retraced: {first} traces, then {len(traces)}"


def test_offload_plan_keeps_the_tensor_on_host():
  rows = saved_residuals(rk.remat(mlp, policy="offload:act"), *_args())
  act = [r for r in rows if r.kind == "activation"]
  assert [(r.name, r.memory, r.bytes) for r in act] == [("act", "host", BH)]


def test_everything_saves_what_no_remat_saves(remat_impl):
  args = _args()
  assert _activations(rk.remat(mlp, policy="no_remat"), *args) == _activations(mlp, *args)


def test_except_really_drops_the_tensor(remat_impl):
  """JAX's own save_anything_except_these_names keeps everything (classic) or, being a
  plain callable, whatever remat3 asks it about, the name included (nothing at all on
  JAX 0.10.2, which asks no callable); ours drops just the name."""
  args = _args()
  ours = {lbl for lbl, _ in _activations(rk.remat(mlp, policy="except:act"), *args)}
  assert "act" not in ours and "tanh" not in ours and "proj" in ours
  theirs = jax.checkpoint(mlp, policy=jax.checkpoint_policies.save_anything_except_these_names(
      "act"))
  theirs_saved = {lbl for lbl, _ in _activations(theirs, *args)}
  if remat_impl == "classic":
    assert theirs_saved & {"act", "tanh"}  # the same tensor, named or not by JAX version
  elif "name" in _jax.remat3_consulted():
    assert "act" in theirs_saved
  else:
    assert theirs_saved == set()


def test_misspelled_name_is_an_error_listing_the_tags():
  with pytest.raises(ValueError) as e:
    rk.remat(mlp, policy="save:atc")(*_args())
  msg = str(e.value)
  assert "['atc']" in msg and "['act', 'proj']" in msg


def test_unknown_primitive_is_an_error():
  with pytest.raises(ValueError, match=r"primitives \['exp'\].*never uses"):
    rk.remat(mlp, policy="prims:exp")(*_args())


def test_check_names_can_be_turned_off():
  out = rk.remat(mlp, policy="save:atc", check_names=False)(*_args())
  chex.assert_trees_all_close(out, mlp(*_args()), rtol=1e-6)


def test_bare_and_with_arguments():
  @rk.remat
  def f(x):
    return jnp.sin(jnp.sin(x))

  @rk.remat(policy="save_dots")
  def g(x):
    return jnp.sin(x @ x)

  x = jnp.eye(3)
  chex.assert_trees_all_close(jax.grad(lambda x: f(x).sum())(x),
                              jax.grad(lambda x: jnp.sin(jnp.sin(x)).sum())(x))
  assert g.policy == P.SaveDots(False)
  assert _activations(lambda x: g(x).sum(), x) == [("dot_general", 36)]


def _dropout_layer(w, x, key, train):
  y = jnp.tanh(x @ w)
  if train:
    keep = jax.random.bernoulli(key, 0.9, y.shape)
    y = jnp.where(keep, y / 0.9, jnp.zeros_like(y))
  return y


@pytest.mark.parametrize("how", ["argnums", "argnames", "keyword"])
def test_static_arguments(how):
  w, x, _ = _args()
  w = w.T[:D, :D]
  key = jax.random.key(1)
  if how == "argnums":
    f = rk.remat(_dropout_layer, static_argnums=3)
    call = lambda w: f(w, x, key, True).sum()
  elif how == "argnames":
    f = rk.remat(_dropout_layer, static_argnames="train")
    call = lambda w: f(w, x, key, True).sum()
  else:
    f = rk.remat(_dropout_layer, static_argnames=("train",))
    call = lambda w: f(w, x, key, train=True).sum()
  ref = lambda w: _dropout_layer(w, x, key, True).sum()
  chex.assert_trees_all_close(jax.grad(call)(w), jax.grad(ref)(w), rtol=1e-6)


def test_an_unhashable_static_argument_works_as_in_jax_checkpoint():
  """jax.checkpoint closes over an unhashable static value; so does rk.remat (it cannot
  key a cache, so each call traces anew)."""
  traces = []

  def f(x, cfg):
    traces.append(1)
    return x * cfg["scale"]

  ours, theirs = rk.remat(f, static_argnums=1), jax.checkpoint(f, static_argnums=1)
  g = lambda h: jax.grad(lambda x: h(x, {"scale": 2.0}).sum())(jnp.ones(2))
  chex.assert_trees_all_close(g(ours), g(theirs))
  n = len(traces)
  g(ours)
  assert len(traces) > n  # traced again: nothing cached on an unhashable key


def test_bad_static_arguments():
  with pytest.raises(ValueError, match=r"`static_argnames` \['trian'\] are not parameters"):
    rk.remat(_dropout_layer, static_argnames="trian")
  with pytest.raises(ValueError, match="called with 1 positional"):
    rk.remat(lambda x: x, static_argnums=2)(jnp.ones(2))
  with pytest.raises(TypeError, match="`static_argnums` must be a int"):
    rk.remat(lambda x: x, static_argnums="0")
  with pytest.raises(TypeError, match="`fn` must be callable"):
    rk.remat(3)


# --------------------------------------------------------------------------
# remat_sequential
# --------------------------------------------------------------------------


def _layers(n, seed=0):
  ws = jax.random.normal(jax.random.key(seed), (n, D, D)) / 3
  return [lambda x, w=w: jnp.tanh(x @ w) for w in ws]


@pytest.mark.parametrize("n, segments", [(8, 1), (8, 2), (8, 3), (7, 7)])
def test_remat_sequential_matches_and_saves_less(n, segments, remat_impl):
  fns = _layers(n)
  x = jax.random.normal(jax.random.key(9), (B, D))
  seq = rk.remat_sequential(fns, segments)

  def plain(x):
    for f in fns:
      x = f(x)
    return x

  chex.assert_trees_all_close(seq(x), plain(x), rtol=1e-6)
  chex.assert_trees_all_close(jax.grad(lambda x: seq(x).sum())(x),
                              jax.grad(lambda x: plain(x).sum())(x), rtol=1e-6)
  saved = sum(b for _, b in _activations(lambda x: seq(x).sum(), x))
  # Segments 2..k each keep only their input (one (B, D) tensor); the last
  # segment, run normally, keeps what it keeps on its own.
  start = round((segments - 1) * n / segments)
  x_last = x
  for f in fns[:start]:
    x_last = f(x_last)

  def last(x):
    for f in fns[start:]:
      x = f(x)
    return x.sum()

  last_alone = sum(b for _, b in _activations(last, x_last))
  assert last_alone <= saved <= (segments - 1) * BD + last_alone
  if segments > 1:
    assert saved < sum(b for _, b in _activations(lambda x: plain(x).sum(), x))


def test_remat_sequential_errors():
  with pytest.raises(ValueError, match=r"`segments` must be an int in \[1, 3\].*got 4"):
    rk.remat_sequential(_layers(3), 4)
  with pytest.raises(ValueError, match="`fns` is empty"):
    rk.remat_sequential([], 1)


# --------------------------------------------------------------------------
# remat_scan
# --------------------------------------------------------------------------


def _layer(c, w):
  h = rk.checkpoint_name(c @ w, "h")
  return jnp.tanh(h), jnp.mean(h)


def _scan_case(n, seed=0):
  ws = jax.random.normal(jax.random.key(seed), (n, D, D)) / 3
  return ws, jax.random.normal(jax.random.key(seed + 1), (B, D))


def _plain_scan(ws, x):
  c, ys = lax.scan(_layer, x, ws)
  return c.sum() + ys.sum()


@pytest.mark.parametrize("n", [8, 37])
@pytest.mark.parametrize("levels", [None, 2, 3])
@pytest.mark.parametrize("policy", ["full", "save:h"])
def test_remat_scan_matches_plain_scan(n, levels, policy, remat_impl):
  ws, x = _scan_case(n)

  def f(ws, x):
    c, ys = rk.remat_scan(_layer, x, ws, policy=policy, levels=levels)
    return c.sum() + ys.sum()

  chex.assert_trees_all_close(f(ws, x), _plain_scan(ws, x), rtol=1e-6)
  chex.assert_trees_all_close(jax.grad(f, argnums=(0, 1))(ws, x),
                              jax.grad(_plain_scan, argnums=(0, 1))(ws, x), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.jit(jax.grad(f))(ws, x), jax.grad(f)(ws, x), rtol=1e-6, atol=1e-7)


def test_remat_scan_explicit_levels_and_errors():
  ws, x = _scan_case(12)
  c, _ = rk.remat_scan(_layer, x, ws, levels=(3, 4))
  c_ref, _ = lax.scan(_layer, x, ws)
  chex.assert_trees_all_close(c, c_ref, rtol=1e-6)
  with pytest.raises(ValueError, match=r"multiply to 10, not the 12 layers"):
    rk.remat_scan(_layer, x, ws, levels=(2, 5))
  with pytest.raises(ValueError, match=r"`length`=5 but `xs` has 12"):
    rk.remat_scan(_layer, x, ws, length=5)
  with pytest.raises(ValueError, match="pass `length=`"):
    rk.remat_scan(lambda c, _: (c, None), x, None)


def test_remat_scan_without_xs():
  x = jnp.ones((B, D))
  c, _ = rk.remat_scan(lambda c, _: (jnp.sin(c), None), x, None, length=10, levels=2)
  chex.assert_trees_all_close(c, lax.scan(lambda c, _: (jnp.sin(c), None), x, None,
                                          length=10)[0])


def test_plan_groups():
  assert rk.level_lengths(64, 2) == (8, 8)
  assert rk.level_lengths(37, 2) == (7, 6)
  assert rk.level_lengths(64, 3) == (4, 4, 4)
  assert rk.level_lengths(16, 3) == (3, 2, 3)  # 7 carries; (2, 2, 4) keeps 8
  assert np.prod(rk.level_lengths(1000, 3)) == 1000
  assert np.prod(rk.level_lengths(9973, 2)) >= 9973  # a prime: remainder path
  assert rk.level_lengths(4, 2) == (4,)  # nesting would keep as many carries: flat
  with pytest.raises(ValueError, match="`levels` must be an int >= 1"):
    rk.level_lengths(8, 0)


def test_nesting_never_keeps_more_carries_than_a_flat_scan():
  from remat_kit.transforms import scan_carries
  for n in range(1, 160):
    for d in (2, 3, 4):
      assert scan_carries(n, rk.level_lengths(n, d)) <= n, (n, d)
  # Uneven: 61 layers in 3 levels keep fewer carries than in 2 (the old plan kept 16 vs 12).
  assert scan_carries(61, rk.level_lengths(61, 3)) < scan_carries(61, rk.level_lengths(61, 2)) < 61


def test_uneven_nesting_saves_compiled_memory_and_keeps_gradients():
  """61 layers, carry-dominated (8192x32 carry, 32x32 weights): CPU compiled temp."""
  ws = jnp.ones((61, 32, 32)) / 32
  x = jnp.linspace(-1, 1, 8192 * 32).reshape(8192, 32)

  def grad(levels):
    def f(ws, x):
      c, _ = rk.remat_scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws, levels=levels)
      return c.sum()
    return jax.jit(jax.grad(f, argnums=(0, 1)))

  temps = {g: grad(g).lower(ws, x).compile().memory_analysis().temp_size_in_bytes
           for g in (None, 2, 3)}
  assert temps[3] < temps[2] < 0.5 * temps[None], temps
  chex.assert_trees_all_close(grad(3)(ws, x), grad(None)(ws, x), rtol=1e-5, atol=1e-6)


def test_nested_scan_uses_less_memory_than_flat_at_64_layers():
  """(d): at L=64, nested levels beat a flat rematerialized scan (CPU XLA analysis)."""
  n, width = 64, 128
  ws = jnp.ones((n, width, width)) / width
  x = jnp.ones((64, width))

  def loss(levels):
    def f(ws, x):
      c, _ = rk.remat_scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws, levels=levels)
      return c.sum()
    return jax.grad(f)

  flat = compiled_memory(loss(None), ws, x)["temp_size"]
  nested = compiled_memory(loss(2), ws, x)["temp_size"]
  print(f"\nL=64 temp bytes: flat remat scan {flat / 2**20:.2f} MiB, nested (8x8) "
        f"{nested / 2**20:.2f} MiB, ratio nested/flat = {nested / flat:.3f}")
  assert nested < flat
