"""remat_kit._jaxpr: equation layouts of every admitted JAX, and the walkers."""

import jax
import jax.numpy as jnp
import pytest

import remat_kit as rk
from remat_kit import _jax, _jaxpr


def _eqn(f, *args, prim):
  return next(e for e in _jaxpr.walk(jax.make_jaxpr(f)(*args).jaxpr) if e.primitive.name == prim)


def test_scan_layout_on_this_jax():
  def f(c, k, xs):
    return jax.lax.scan(lambda c, x: (c * x + k, (c, x)), c, xs)
  eqn = _eqn(f, 1.0, 2.0, jnp.ones(5), prim="scan")
  scan = _jaxpr.scan_layout(eqn)
  assert (scan.length, scan.num_consts, scan.num_carry) == (5, 1, 1)
  # JAX 0.11+ forwards `x` (a ys output equal to an input) around the scan
  assert len(scan.body.invars) == len(eqn.invars) == 3
  assert len(scan.body.outvars) == len(eqn.outvars) in (2, 3)


def test_while_and_cond_layouts():
  w = _eqn(lambda x: jax.lax.while_loop(lambda c: c < x, lambda c: c + x, 0.0), 1.0,
           prim="while")
  loop = _jaxpr.while_layout(w)
  assert (loop.cond_nconsts, loop.body_nconsts) == (1, 1)
  c = _eqn(lambda x: jax.lax.cond(x > 0, jnp.sin, jnp.cos, x), 1.0, prim="cond")
  assert [e.primitive.name for b in _jaxpr.cond_branches(c) for e in b.eqns] == ["cos", "sin"]


def test_call_bodies_of_jit_and_custom_rules():
  @jax.custom_jvp
  def g(x):
    return jnp.sin(x)
  g.defjvp(lambda p, t: (g(p[0]), t[0] * jnp.cos(p[0])))
  jaxpr = jax.make_jaxpr(lambda x: jax.jit(g)(x))(1.0).jaxpr
  (jit,) = jaxpr.eqns
  assert _jaxpr.is_jit(jit)
  (custom,) = _jaxpr.call_body(jit).eqns
  assert [e.primitive.name for e in _jaxpr.call_body(custom).eqns] == ["sin"]


class _Eqn:
  def __init__(self, name, params):
    self.primitive = type("P", (), {"name": name})()
    self.params = params
    self.invars = []


@pytest.mark.parametrize("fn, name, params", [
    (_jaxpr.scan_layout, "scan", {"length": 2, "jaxpr": None}),
    (_jaxpr.while_layout, "while", {"body_jaxpr": None}),
    (_jaxpr.cond_branches, "cond", {}),
    (_jaxpr.call_body, "jit", {"call": None}),
])
def test_an_unknown_layout_raises_naming_the_version_and_what_was_expected(fn, name, params):
  with pytest.raises(_jax.UnknownJaxStructure, match=rf"jax {jax.__version__}.*expected"):
    fn(_Eqn(name, params))


def test_closed_parts_of_either_jaxpr_type():
  closed = jax.make_jaxpr(lambda x: x + jnp.arange(3.0))(jnp.ones(3))
  jaxpr, consts = _jaxpr.closed_parts(closed)
  assert len(consts) == len(jaxpr.constvars)
  with pytest.raises(_jax.UnknownJaxStructure, match="jaxpr type"):
    _jaxpr.closed_parts("not a jaxpr")


def test_remat_equations_count_scan_trips(remat_impl):
  f = lambda ws, x: rk.remat_scan(lambda c, w: (jnp.sin(c @ w), None), x, ws, policy="full")[0]
  jaxpr = jax.make_jaxpr(f)(jnp.ones((3, 4, 4)), jnp.ones((2, 4))).jaxpr
  assert [n for _, n in _jaxpr.remat_equations(jaxpr)] == [3]
