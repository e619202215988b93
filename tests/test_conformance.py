"""rk.remat as a drop-in for jax.checkpoint: the semantics JAX's RematTest checks, written
here, run under both remat implementations on every JAX leg.

Each test runs the same function through `jax.checkpoint` and `rk.remat` and compares
values, gradients and what is saved. The one deliberate difference: a policy naming a
tag the function never makes raises in `rk.remat` (JAX saves nothing, silently).
"""

import gc
import weakref

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import remat_kit as rk
from remat_kit import _jax
from remat_kit.report import saved_residuals

CP = jax.checkpoint_policies


def _acts(f, *args):
  return sorted((r.shape, r.dtype) for r in saved_residuals(f, *args) if r.kind == "activation")


def _both(fn, **kw):
  return jax.checkpoint(fn, **kw), rk.remat(fn, **kw)


# --------------------------------------------------------------------------
# Kinds of function
# --------------------------------------------------------------------------
def _sin_sin(x):
  return jnp.sin(jnp.sin(x))


def test_python_and_numpy_inputs_are_traced_like_jax_checkpoint(remat_impl):
  for policy in (None, CP.everything_saveable, False, CP.dots_saveable):
    theirs, ours = _both(lambda x: x.sum(), policy=policy) if policy is not False else (
        jax.checkpoint(lambda x: x.sum(), policy=CP.everything_saveable),
        rk.remat(lambda x: x.sum(), policy=False))
    for x in (3.0, np.ones(3, np.float32)):
      got, want = ours(x), theirs(x)
      assert isinstance(got, jax.Array) and isinstance(want, jax.Array)
      chex.assert_trees_all_close(got, want)


def test_pytrees_in_and_out_and_keyword_arguments(remat_impl):
  def f(tree, *, scale):
    a, b = tree["a"], tree["b"]
    return {"y": jnp.sin(a) * b * scale, "z": (jnp.cos(b),)}

  tree = {"a": jnp.arange(3.0), "b": jnp.ones(3)}
  theirs, ours = _both(f)
  chex.assert_trees_all_close(ours(tree, scale=2.0), theirs(tree, scale=2.0))
  loss = lambda g: lambda t: jnp.sum(g(t, scale=2.0)["y"]) + jnp.sum(g(t, scale=2.0)["z"][0])
  chex.assert_trees_all_close(jax.grad(loss(ours))(tree), jax.grad(loss(theirs))(tree))


@pytest.mark.parametrize("transform", ["grad", "vjp", "jvp", "linearize", "vmap", "hessian"])
def test_under_every_transformation(transform, remat_impl):
  theirs, ours = _both(_sin_sin)
  x = jnp.linspace(0.1, 1.0, 4)
  run = {
      "grad": lambda f: jax.grad(lambda x: f(x).sum())(x),
      "vjp": lambda f: jax.vjp(f, x)[1](jnp.ones(4)),
      "jvp": lambda f: jax.jvp(f, (x,), (jnp.ones(4),)),
      "linearize": lambda f: jax.linearize(f, x)[1](jnp.ones(4)),
      "vmap": lambda f: jax.vmap(jax.grad(lambda v: f(v).sum()))(x.reshape(2, 2)),
      "hessian": lambda f: jax.hessian(lambda x: f(x).sum())(x),
  }[transform]
  chex.assert_trees_all_close(run(ours), run(theirs), rtol=1e-6)


def test_jit_inside_and_outside(remat_impl):
  inner = lambda x: jax.jit(_sin_sin)(x) * 2
  theirs, ours = _both(inner)
  x = jnp.ones(3)
  g = lambda f: jax.jit(jax.grad(lambda x: f(x).sum()))(x)
  chex.assert_trees_all_close(g(ours), g(theirs))
  assert _acts(ours, x) == _acts(theirs, x)


@pytest.mark.parametrize("control", ["scan", "cond", "while", "fori"])
def test_control_flow_inside_remat(control, remat_impl):
  def f(x):
    if control == "scan":
      return lax.scan(lambda c, _: (jnp.sin(c), None), x, None, length=3)[0]
    if control == "cond":
      return lax.cond(x.sum() > 0, jnp.sin, jnp.cos, x)
    if control == "fori":
      return lax.fori_loop(0, 3, lambda i, c: jnp.sin(c), x)
    return lax.while_loop(lambda c: c.sum() < 10.0, lambda c: c * 2.0, x)

  theirs, ours = _both(f)
  x = jnp.linspace(0.5, 1.0, 3)
  chex.assert_trees_all_close(ours(x), theirs(x))
  if control != "while":  # while loops are not reverse-differentiable
    g = lambda h: jax.grad(lambda x: h(x).sum())(x)
    chex.assert_trees_all_close(g(ours), g(theirs), rtol=1e-6)


def test_remat_of_remat_and_of_a_scan_body(remat_impl):
  nested = rk.remat(lambda x: rk.remat(_sin_sin)(x) * 2)
  ref = jax.checkpoint(lambda x: jax.checkpoint(_sin_sin)(x) * 2)
  x = jnp.ones(3)
  chex.assert_trees_all_close(jax.grad(lambda x: nested(x).sum())(x),
                              jax.grad(lambda x: ref(x).sum())(x))
  body = rk.remat(lambda c, w: (jnp.sin(c @ w), None), prevent_cse=False)
  ws = jnp.ones((4, 3, 3)) / 3
  loss = lambda ws: lax.scan(body, x, ws)[0].sum()
  ref_body = jax.checkpoint(lambda c, w: (jnp.sin(c @ w), None), prevent_cse=False)
  ref_loss = lambda ws: lax.scan(ref_body, x, ws)[0].sum()
  chex.assert_trees_all_close(jax.grad(loss)(ws), jax.grad(ref_loss)(ws))
  assert _acts(loss, ws) == _acts(ref_loss, ws)


# --------------------------------------------------------------------------
# Policies: what is saved
# --------------------------------------------------------------------------
def _mlp(w, x):
  h = rk.checkpoint_name(jnp.sin(x @ w), "h")
  return jnp.sum(jnp.cos(h @ w))


@pytest.mark.parametrize("policy", [None, CP.everything_saveable, CP.nothing_saveable,
                                    CP.dots_saveable, CP.dots_with_no_batch_dims_saveable,
                                    CP.save_only_these_names("h"),
                                    CP.save_any_names_but_these("h")],
                         ids=["None", "everything", "nothing", "dots", "dots_no_batch",
                              "names", "names_but"])
def test_jax_policies_save_what_jax_checkpoint_saves_classically(policy, remat_impl):
  """Under classic remat JAX honours every policy: rk.remat saves the same tensors."""
  w, x = jnp.ones((8, 8)) / 8, jnp.ones((4, 8))
  with _jax.remat3(False):
    want = _acts(jax.checkpoint(_mlp, policy=policy), w, x)
  assert _acts(rk.remat(_mlp, policy=policy), w, x) == want


def _attention_like(w, x):
  """An unbatched matmul (tagged h), a batched one (tagged g) and one more batched one."""
  h = rk.checkpoint_name(jnp.sin(x @ w), "h")
  g = rk.checkpoint_name(jnp.tanh(jnp.einsum("bij,bkj->bik", h, h)), "g")
  return jnp.sum(jnp.cos(jnp.einsum("bik,bkj->bij", g, h)))


def _rows(f, *args):
  return sorted((r.shape, str(r.dtype), r.memory) for r in saved_residuals(f, *args)
                if r.kind == "activation")


OFFLOAD = dict(offload_src="device", offload_dst="pinned_host")
JAX_NAMES = {  # JAX's newer names: JAX's own policy, and ours called the same way
    "checkpoint_dots": (CP.checkpoint_dots, rk.policies.checkpoint_dots),
    "checkpoint_dots_with_no_batch_dims": (CP.checkpoint_dots_with_no_batch_dims,
                                           rk.policies.checkpoint_dots_with_no_batch_dims),
    "offload_dot_with_no_batch_dims": (
        CP.offload_dot_with_no_batch_dims("device", "pinned_host"),
        rk.policies.offload_dot_with_no_batch_dims("device", "pinned_host")),
    "save_and_offload_only_these_names": (
        CP.save_and_offload_only_these_names(names_which_can_be_saved=["h"],
                                             names_which_can_be_offloaded=["g"], **OFFLOAD),
        rk.policies.save_and_offload_only_these_names(
            names_which_can_be_saved=["h"], names_which_can_be_offloaded=["g"], **OFFLOAD)),
}


@pytest.mark.parametrize("name", sorted(JAX_NAMES))
def test_jax_newer_policy_names_save_what_jax_saves(name, remat_impl):
  """`remat_kit.policies` has JAX's names with JAX's signatures, and each saves (or
  offloads) exactly the residuals JAX's own policy does under classic `jax.checkpoint`,
  under either implementation; JAX's own object handed to rk.remat does the same."""
  theirs, ours = JAX_NAMES[name]
  w, x = jnp.ones((8, 8)) / 8, jnp.ones((2, 4, 8))
  with _jax.remat3(False):
    want = _rows(jax.checkpoint(_attention_like, policy=theirs), w, x)
  assert want and _rows(rk.remat(_attention_like, policy=ours), w, x) == want
  assert _rows(rk.remat(_attention_like, policy=theirs), w, x) == want
  assert getattr(rk.policies, name) is not None and name in rk.policies.__all__


def test_jax_names_keep_jaxs_checks_and_our_factories_may_go_uncalled():
  with pytest.raises(ValueError, match=r"The names should be exclusive.*\['h'\] in both"):
    rk.policies.save_and_offload_only_these_names(
        names_which_can_be_saved=["h"], names_which_can_be_offloaded=["h"], **OFFLOAD)
  # JAX passes its policies as values: ours may be passed uncalled too.
  assert rk.policies.from_config(rk.policies.dots_saveable) == rk.policies.checkpoint_dots


def test_offload_policies_mark_residuals_for_the_host(remat_impl):
  w, x = jnp.ones((8, 8)) / 8, jnp.ones((4, 8))
  f = rk.remat(_mlp, policy={"h": "offload"})
  rows = [r for r in saved_residuals(f, w, x) if r.kind == "activation"]
  assert [r.memory for r in rows if r.name == "h"] == ["host"]
  chex.assert_trees_all_close(jax.grad(f)(w, x), jax.grad(_mlp)(w, x))


def test_a_misspelled_name_is_the_one_deliberate_difference():
  w, x = jnp.ones((8, 8)) / 8, jnp.ones((4, 8))
  saved = _acts(jax.checkpoint(_mlp, policy=CP.save_only_these_names("hh")), w, x)
  with _jax.remat3(False):
    assert saved == _acts(jax.checkpoint(_mlp, policy=None), w, x)  # silently nothing
  with pytest.raises(ValueError, match=r"never tags.*'h'"):
    rk.remat(_mlp, policy=CP.save_only_these_names("hh"))(w, x)


# --------------------------------------------------------------------------
# Static arguments
# --------------------------------------------------------------------------
def _branchy(x, n, mode="sin"):
  for _ in range(n):
    x = jnp.sin(x) if mode == "sin" else jnp.cos(x)
  return x


@pytest.mark.parametrize("kw, calls", [
    (dict(static_argnums=1), [((2,), {}), ((3,), {})]),
    (dict(static_argnums=(1, 2)), [((2, "sin"), {}), ((3, "cos"), {})]),
    (dict(static_argnames="n"), [((), {"n": 2}), ((2,), {})]),
    (dict(static_argnames=("n", "mode")), [((), {"n": 2, "mode": "cos"}), ((3, "sin"), {})]),
], ids=["argnums", "two argnums", "argnames", "two argnames"])
def test_static_arguments(kw, calls, remat_impl):
  """Values and gradients equal the function's own; with `static_argnums`, also
  `jax.checkpoint`'s (JAX's classic remat reads no `static_argnames`)."""
  ours = rk.remat(_branchy, **kw)
  x = jnp.linspace(0.1, 1.0, 3)
  for rest, kwargs in calls:
    g = lambda f: jax.grad(lambda x: f(x, *rest, **kwargs).sum())(x)
    chex.assert_trees_all_close(ours(x, *rest, **kwargs), _branchy(x, *rest, **kwargs))
    chex.assert_trees_all_close(g(ours), g(_branchy), rtol=1e-6)
    if "static_argnums" in kw and not kwargs:
      theirs = jax.checkpoint(_branchy, **kw)
      chex.assert_trees_all_close(g(ours), g(theirs))


def test_an_unhashable_static_argument_is_closed_over_like_jax(remat_impl):
  f = lambda x, d: x * d["scale"]
  ours, theirs = rk.remat(f, static_argnums=1), jax.checkpoint(f, static_argnums=1)
  g = lambda h: jax.grad(lambda x: h(x, {"scale": 2.0}))(1.0)
  assert float(g(ours)) == float(g(theirs)) == 2.0


def test_prevent_cse_tuple_forms_match_a_dict_by_children_as_under_remat3(remat_impl):
  layer = rk.remat(lambda d: d["x"] @ d["W"], prevent_cse=((False, True),))
  g = jax.grad(lambda W: layer(dict(W=W, x=jnp.ones(3))).sum())(jnp.ones((3, 3)))
  chex.assert_trees_all_close(g, jnp.ones((3, 3)))


def test_a_traced_static_argument_says_it_is_traced():
  f = rk.remat(_branchy, static_argnums=1)
  with pytest.raises(TypeError, match=r"static argument 1 is a traced.*enclosing"):
    jax.jit(lambda x, n: f(x, n))(jnp.ones(3), 2)


# --------------------------------------------------------------------------
# CSE prevention
# --------------------------------------------------------------------------
def _barriers(f, *args):
  """Optimization barriers in the lowered gradient (JAX inserts them where remat lowers)."""
  return jax.jit(jax.grad(f)).lower(*args).as_text().count("optimization_barrier")


def test_prevent_cse_adds_barriers_only_when_asked():
  f = lambda x: jnp.sin(jnp.sin(x)).sum()
  with _jax.remat3(False):
    assert _barriers(rk.remat(f), 1.0) == _barriers(jax.checkpoint(f), 1.0) > 0
    assert _barriers(rk.remat(f, prevent_cse=False), 1.0) == 0


@pytest.mark.parametrize("prevent_cse", [[False, True], (True, False), {"a": True, "b": False}])
def test_prevent_cse_takes_a_pytree_prefix_like_jax(prevent_cse):
  if isinstance(prevent_cse, dict):
    h = lambda d: jnp.sin(jnp.sin(d["a"])) * d["b"]
    args = ({"a": jnp.ones(3), "b": jnp.ones(3)},)
    prevent = (prevent_cse,)
  else:
    h = lambda a, b: jnp.sin(jnp.sin(a)) * b
    args = (jnp.ones(3), jnp.ones(3))
    prevent = prevent_cse
  with _jax.remat3(False):
    theirs = jax.checkpoint(h, prevent_cse=prevent)
    ours = rk.remat(h, prevent_cse=prevent)
    loss = lambda f: lambda *a: f(*a).sum()
    assert _barriers(loss(ours), *args) == _barriers(loss(theirs), *args)
    chex.assert_trees_all_close(jax.grad(loss(ours))(*args), jax.grad(loss(theirs))(*args))


def test_a_bad_prevent_cse_is_a_clear_error():
  with pytest.raises(TypeError, match=r"`remat`: `prevent_cse` must be a bool or a pytree"):
    rk.remat(jnp.sin, prevent_cse="yes")
  f = rk.remat(lambda a, b: a * b, prevent_cse=[True, False, True])
  with pytest.raises(ValueError, match=r"`prevent_cse`.*prefix of the arguments"):
    f(jnp.ones(2), jnp.ones(2))


# --------------------------------------------------------------------------
# Custom rules
# --------------------------------------------------------------------------
@jax.custom_vjp
def _op(x):
  return jnp.sin(x)


def _op_fwd(x):
  res = rk.checkpoint_name(jnp.cos(x), "op_res")
  return jnp.sin(x), res


_op.defvjp(_op_fwd, lambda res, g: (g * res,))


@jax.custom_jvp
def _softplus(x):
  return jnp.logaddexp(x, 0.0)


_softplus.defjvp(lambda p, t: (_softplus(p[0]), t[0] * jax.nn.sigmoid(p[0])))


def test_custom_vjp_and_custom_jvp_inside_remat(remat_impl):
  f = lambda x: jnp.sum(_softplus(_op(x) * 2.0))
  theirs, ours = _both(f)
  x = jnp.linspace(0.1, 1.0, 5)
  chex.assert_trees_all_close(jax.grad(ours)(x), jax.grad(theirs)(x), rtol=1e-6)


def test_a_name_tagged_only_in_a_custom_vjp_forward_counts(remat_impl):
  f = lambda x: jnp.sum(_op(x) ** 2)
  x = jnp.linspace(0.1, 1.0, 5)
  ours = rk.remat(f, policy="save:op_res")  # no "never tags" error
  chex.assert_trees_all_close(jax.grad(ours)(x), jax.grad(f)(x), rtol=1e-6)
  with _jax.remat3(False):
    theirs = jax.checkpoint(f, policy=CP.save_only_these_names("op_res"))
    assert _acts(rk.remat(f, policy="save:op_res"), x) == _acts(theirs, x)


@jax.custom_jvp
def _tagged_in_jvp(x):
  return jnp.sin(x)


def _tagged_jvp(p, t):
  (x,), (dx,) = p, t
  return _tagged_in_jvp(x), dx * rk.checkpoint_name(jnp.cos(x), "jvp_cos")


_tagged_in_jvp.defjvp(_tagged_jvp)


def test_a_name_tagged_only_in_a_custom_jvp_rule_counts(remat_impl):
  f = lambda x: jnp.sum(_tagged_in_jvp(x) ** 2)
  x = jnp.linspace(0.1, 1.0, 5)
  ours = rk.remat(f, policy="save:jvp_cos")  # no "never tags" error
  chex.assert_trees_all_close(jax.grad(ours)(x), jax.grad(f)(x), rtol=1e-6)
  with pytest.raises(ValueError, match="never tags"):  # a real misspelling still raises
    rk.remat(f, policy="save:jvp_coss")(x)


# --------------------------------------------------------------------------
# Leaks, retention and retracing
# --------------------------------------------------------------------------
def test_no_tracer_leaks():
  with jax.checking_leaks():
    jax.jit(lambda x: rk.remat(lambda y: jnp.sin(y * x))(x))(1.0)
    jax.jit(lambda x: rk.remat(lambda y, n: jnp.sin(y * x) * n, static_argnums=1)(x, 2))(1.0)
    jax.jit(lambda x: rk.remat(lambda y: rk.checkpoint_name(y * x, "a"),
                               policy="save:a")(x))(1.0)


@pytest.mark.parametrize("statics", [False, True])
def test_closures_do_not_outlive_the_users_references(statics):
  class Big:
    def __init__(self, i):
      self.w = jnp.full(4, float(i))

  refs = []
  for i in range(40):
    big = Big(i)
    refs.append(weakref.ref(big))
    if statics:
      f = rk.remat(lambda x, n, big=big: jnp.sin(x * big.w) * n, static_argnums=1)
      jax.grad(lambda x, f=f: f(x, 2).sum())(jnp.ones(4))
    else:
      f = rk.remat(lambda x, big=big: jnp.sin(x * big.w))
      jax.grad(lambda x, f=f: f(x).sum())(jnp.ones(4))
    del big, f
  gc.collect()
  assert sum(r() is not None for r in refs) == 0


def test_callables_that_compare_equal_keep_their_own_wrappers():
  import dataclasses

  @dataclasses.dataclass(frozen=True)
  class Scale:
    k: float = dataclasses.field(compare=False)

    def __call__(self, x):
      return x * self.k

  out = [float(rk.remat(Scale(k))(jnp.float32(3.0))) for k in (0.0, 1.0, 2.0)]
  assert out == [0.0, 3.0, 6.0]


def test_a_second_call_does_not_retrace(remat_impl):
  traces = []

  def f(x):
    traces.append(1)
    return jnp.sin(jnp.sin(x))

  g = jax.jit(jax.grad(lambda x: rk.remat(f)(x).sum()))
  g(jnp.ones(3))
  n = len(traces)
  g(jnp.ones(3))
  assert len(traces) == n
  chex.clear_trace_counter()
  h = chex.assert_max_traces(n=1)(lambda x: rk.remat(_sin_sin)(x).sum())
  jh = jax.jit(jax.grad(h))
  jh(jnp.ones(3))
  jh(jnp.ones(3))


