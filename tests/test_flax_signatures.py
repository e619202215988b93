"""The decorator on the signatures real Flax code uses (issue: Flax signatures)."""

import enum

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from remat_kit import policies as P
from remat_kit.flax import remat_policy


class Mode(enum.Enum):
  A = 1
  B = 2


class KwOnly(nn.Module):
  @nn.compact
  def __call__(self, x, *, train: bool = False, reps: int = 1, mode: Mode = Mode.A,
               dims: tuple = (4,)):
    for _ in range(reps):  # an int drives a Python loop
      x = nn.Dense(dims[0])(x)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return x * (2.0 if mode is Mode.B else 1.0)


def test_linen_keyword_only_flags_ints_enums_and_tuples():
  x = jnp.ones((3, 4))
  plain = KwOnly()
  rem = remat_policy("full", static_argnames=("train", "reps", "dims"))(KwOnly)()
  kw = {"train": True, "reps": 2, "mode": Mode.B, "dims": (4,)}
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  v = plain.init(rngs, x, **kw)
  chex.assert_trees_all_equal(v, rem.init(rngs, x, **kw))
  f = lambda m: jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, **kw,
                                                   rngs={"dropout": jax.random.key(2)})))
  chex.assert_trees_all_close(f(rem)(v["params"]), f(plain)(v["params"]), rtol=1e-6)


class NnxKw(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x, *, reps: int = 1, scale: float = 1.0):
    for _ in range(reps):
      x = self.dense(x)
    return x * scale


def test_nnx_keyword_only_ints_and_floats():
  x = jnp.ones((3, 4))
  plain = NnxKw(nnx.Rngs(0))
  rem = remat_policy("full", static_argnames="reps")(NnxKw)(nnx.Rngs(0))
  loss = lambda m: jnp.sum(m(x, reps=3, scale=0.5))
  chex.assert_trees_all_close(nnx.grad(loss)(rem), nnx.grad(loss)(plain), rtol=1e-6)


# --------------------------------------------------------------------------
# Policy config strings: the small items of the same issue
# --------------------------------------------------------------------------

def test_unions_are_canonical():
  assert P.from_config("save:a|save:b") == P.from_config("save:b|save:a")
  assert hash(P.from_config("save:a|save_dots")) == hash(P.from_config("save_dots|save:a"))
  assert P.from_config("save:a|save:a|save:b") == P.from_config("save:b|save:a")


def test_a_name_saved_and_offloaded_in_a_string_is_an_error_as_in_a_dict():
  with pytest.raises(ValueError, match=r"\['a'\] both saved and offloaded in 'save:a\|offload:a'"):
    P.from_config("save:a|offload:a")


def test_a_policy_class_is_refused_with_the_fix():
  with pytest.raises(TypeError, match=r"got the class SaveDots; pass an instance, e.g. SaveDots"):
    P.from_config(P.SaveDots)


def test_suggestions_ignore_case():
  with pytest.raises(ValueError, match="Did you mean 'full'"):
    P.from_config("FULL")


def test_remat_scan_validates_xs_and_groups_in_the_users_terms():
  import remat_kit as rk
  body = lambda c, w: (c @ w, None)
  c = jnp.ones((2, 3))
  with pytest.raises(ValueError, match=r"different leading lengths .*xs\['a'\]: 4, xs\['b'\]: 5"):
    rk.remat_scan(body, c, {"a": jnp.ones((4, 3, 3)), "b": jnp.ones((5, 3))}, levels=2)
  with pytest.raises(ValueError, match=r"leaf `xs\['s'\]` is a scalar"):
    rk.remat_scan(body, c, {"s": jnp.float32(1.0), "w": jnp.ones((4, 3, 3))})
  with pytest.raises(ValueError, match="0 layers"):
    rk.remat_scan(body, c, jnp.ones((0, 3, 3)))
  with pytest.raises(TypeError, match="`levels` must be None, an int number of levels"):
    rk.remat_scan(body, c, jnp.ones((4, 3, 3)), levels=True)


# --------------------------------------------------------------------------
# The decorator on more signatures and module shapes
# --------------------------------------------------------------------------
RNGS = {"params": jax.random.key(0), "dropout": jax.random.key(1)}


def _same_everywhere(cls, x, *args, policy="full", methods="__call__", method="__call__",
                     mutable=False, static=(), jax_remat=None, **kwargs):
  """Decorated and plain: same init tree/values, outputs (masks), updates and gradients.

  ``jax_remat``: the same module under Flax's own ``nn.remat`` (JAX's checkpoint). Where
  remat itself moves float rounding (a BatchNorm's batch statistics, reduced in another
  fusion), the decorated module must equal that exactly, and differ from the plain one by
  no more than JAX's own remat does: the tolerance is read from JAX, not chosen.
  """
  plain = cls()
  rem = remat_policy(policy, methods=methods, static_argnames=static)(cls)()
  init = lambda m: m.init(RNGS, x, *args, method=method, **kwargs)
  v = init(plain)
  chex.assert_trees_all_equal(v, init(rem))

  def run(m, p):
    out = m.apply({**v, "params": p}, x, *args, method=method, mutable=mutable,
                  rngs={"dropout": jax.random.key(2)}, **kwargs)
    return out if mutable else (out, {})

  if jax_remat is None:
    chex.assert_trees_all_equal(run(rem, v["params"]), run(plain, v["params"]))
  else:
    ours, theirs, base = (run(m, v["params"]) for m in (rem, jax_remat(), plain))
    chex.assert_trees_all_equal(ours, theirs)
    assert _max_diff(ours, base) <= _max_diff(theirs, base)
  grad = lambda m: jax.grad(lambda p: jnp.sum(run(m, p)[0] ** 2))(v["params"])
  if jax_remat is None:
    chex.assert_trees_all_close(grad(rem), grad(plain), rtol=1e-6, atol=1e-6)
  else:
    ours, theirs, base = (grad(m) for m in (rem, jax_remat(), plain))
    chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert _max_diff(ours, base) <= _max_diff(theirs, base)
  return v


class VarArgs(nn.Module):
  @nn.compact
  def __call__(self, x, *extra, scale=1.0, **opts):
    for e in extra:
      x = x + e
    x = nn.Dense(4)(x)
    return x * scale * (2.0 if opts.get("double") else 1.0)


def test_linen_var_args_and_kwargs_pass_through():
  x = jnp.ones((3, 4))
  _same_everywhere(VarArgs, x, x, 2 * x, scale=0.5, double=True, static="double")


class Loop(nn.Module):
  @nn.compact
  def __call__(self, x, n):
    for _ in range(n):
      x = nn.Dense(4)(x)
    return x


def test_a_traced_int_names_the_argument_to_make_static():
  x = jnp.ones((3, 4))
  m = remat_policy("full")(Loop)()
  v = Loop().init(RNGS, x, 2)
  with pytest.raises(TypeError, match=r"Traced arguments: .*`n` \(int32\[\]\).*"
                                      r"static_argnames=\('n',\)"):
    jax.jit(lambda v, n: m.apply(v, x, n))(v, 2)
  with pytest.raises(TypeError, match=r"`n` \(Python int 2\).*static_argnames=\('n',\)"):
    m.apply(v, x, 2)  # a Python int is traced too, unless named (as in jax.checkpoint)
  m2 = remat_policy("full", static_argnames="n")(Loop)()
  assert m2.apply(v, x, 2).shape == (3, 4)


class SetupStyle(nn.Module):
  def setup(self):
    self.enc = nn.Dense(8)
    self.dec = nn.Dense(4)
    self.drop = nn.Dropout(0.5)

  def encode(self, x, train: bool = True):
    return self.drop(nn.gelu(self.enc(x)), deterministic=not train)

  def __call__(self, x):
    return self.dec(self.encode(x))


def test_linen_setup_style_and_a_method_other_than_call():
  x = jnp.linspace(-1, 1, 12).reshape(3, 4)
  v = _same_everywhere(SetupStyle, x, methods="encode", method="encode", static="train")
  rem = remat_policy(methods="encode", static_argnames="train")(SetupStyle)
  by_function = rem().apply(v, x, False, method=rem.encode)  # method= a function
  chex.assert_trees_all_equal(by_function, SetupStyle().apply(v, x, False, method="encode"))
  _same_everywhere(SetupStyle, x, policy="save_dots", methods=("encode", "__call__"),
                   static="train")


class ScanVmapInside(nn.Module):
  @nn.compact
  def __call__(self, x):
    cell = nn.scan(lambda m, c, _: (nn.tanh(nn.Dense(4)(c)), None), variable_broadcast="params",
                   split_rngs={"params": False}, length=3)
    x, _ = cell(self, x, None)
    per_row = nn.vmap(nn.Dense, in_axes=0, out_axes=0, variable_axes={"params": 0},
                      split_rngs={"params": True})(4)
    return per_row(x)


def test_linen_nn_scan_and_nn_vmap_inside():
  _same_everywhere(ScanVmapInside, jnp.linspace(-1, 1, 12).reshape(3, 4))


class WithBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dropout(0.5, deterministic=not train)(nn.relu(x))


def test_linen_batch_stats_updates_under_the_decorator():
  x = jnp.linspace(-1, 1, 24).reshape(6, 4)
  v = _same_everywhere(WithBatchNorm, x, True, mutable=["batch_stats"], static="train",
                       jax_remat=nn.remat(WithBatchNorm, static_argnums=(2,)))
  assert "batch_stats" in v
  _same_everywhere(WithBatchNorm, x, False, static="train",
                   jax_remat=nn.remat(WithBatchNorm, static_argnums=(2,)))


class NnxBN(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x, *extra, train: bool = True, **opts):
    for e in extra:
      x = x + e
    return self.drop(nnx.relu(self.bn(self.dense(x), use_running_average=not train)),
                     deterministic=not train)


class NnxBNJaxRemat(NnxBN):
  """The same module under Flax's own `nnx.remat` (JAX's checkpoint), full remat."""

  def __call__(self, x, *extra, train: bool = True, **opts):
    f = nnx.remat(lambda m, x, *e: NnxBN.__call__(m, x, *e, train=train, **opts))
    return f(self, x, *extra)


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(p - q))) for p, q in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def test_nnx_var_args_and_batch_stats_updates():
  """The dense bias feeds a BatchNorm, so its gradient is zero up to rounding, and remat
  moves that rounding (JAX's own remat by 1.8e-5 on JAX 0.12.1): the decorated module
  equals Flax's `nnx.remat` and is as close to the plain one as that is."""
  x = jnp.linspace(-1, 1, 24).reshape(6, 4)
  plain = NnxBN(nnx.Rngs(0))
  rem = remat_policy("full", static_argnames="train")(NnxBN)(nnx.Rngs(0))
  theirs = NnxBNJaxRemat(nnx.Rngs(0))
  loss = lambda m: jnp.sum(m(x, x, train=True, unused=None) ** 2)
  ours, jaxs, base = (nnx.grad(loss)(m) for m in (rem, theirs, plain))
  chex.assert_trees_all_close(ours, jaxs, rtol=1e-6)
  assert _max_diff(ours, base) <= _max_diff(jaxs, base)
  chex.assert_trees_all_close(nnx.state(rem, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat))
  assert not jnp.allclose(rem.bn.mean[...], 0.0)


def test_remat_static_argnums_for_an_argument_passed_by_keyword():
  import remat_kit as rk

  def f(x, n):
    for _ in range(n):
      x = jnp.sin(x)
    return x

  g = rk.remat(f, static_argnums=1)
  want = jax.grad(lambda x: f(x, 3))(1.0)
  assert jax.grad(lambda x: g(x, n=3))(1.0) == want
  assert jax.grad(lambda x: g(x, 3))(1.0) == want
  with pytest.raises(ValueError, match="`static_argnums` contains 2"):
    rk.remat(f, static_argnums=2)(1.0, n=3)


# --------------------------------------------------------------------------
# LayerStack: the layer axis in partition metadata, and mutable state
# --------------------------------------------------------------------------
from remat_kit.flax import LayerStack, stack_layers, unstack_layers  # noqa: E402
from remat_kit.flax import nnx as rk_nnx  # noqa: E402


class Logical(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    return x + nn.Dense(8, kernel_init=init)(x)


@pytest.mark.parametrize("axis", ["layers", None, "stage"])
def test_linen_layer_stack_names_the_layer_axis(axis):
  x = jnp.ones((2, 8))
  stack = LayerStack(Logical(), 3, layer_axis=axis)
  v = stack.init(jax.random.key(0), x)
  spec = nn.get_partition_spec(v)["params"]["layers"]["Dense_0"]["kernel"]
  assert spec == jax.sharding.PartitionSpec(axis, "embed", "mlp")
  # Unstacked, each layer's kernel is (embed, mlp) again, and stacking restores the name.
  per_layer = unstack_layers(v["params"])
  assert nn.get_partition_spec(per_layer)["layers_1"]["Dense_0"]["kernel"] == (
      jax.sharding.PartitionSpec("embed", "mlp"))
  back = stack_layers(per_layer, layer_axis=axis)
  assert nn.get_partition_spec(back)["layers"]["Dense_0"]["kernel"] == spec
  chex.assert_trees_all_equal(nn.unbox(back), nn.unbox(v["params"]))
  unrolled = LayerStack(Logical(), 3, scan=False).apply({"params": per_layer}, x)
  chex.assert_trees_all_close(stack.apply(v, x), unrolled, rtol=1e-6)
  with pytest.raises(TypeError, match="`layer_axis` must be a str"):
    LayerStack(Logical(), 3, layer_axis=0).init(jax.random.key(0), x)


class Calls(nnx.Variable):
  pass


class NnxStateful(nnx.Module):
  def __init__(self, rngs):
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
    self.lin = nnx.Linear(8, 8, kernel_init=init, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.calls = Calls(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    self.calls[...] += 1
    return x + self.drop(self.bn(self.lin(x)))


@pytest.mark.parametrize("levels", [None, 2])
def test_nnx_layer_stack_writes_back_batch_stats_and_custom_variables(levels):
  x = jnp.linspace(-1, 1, 32).reshape(4, 8)
  eager = nnx.using_eager_sharding()
  nnx.use_eager_sharding(False)  # sharding metadata without a mesh
  try:
    make = lambda: rk_nnx.LayerStack(NnxStateful, 4, rngs=nnx.Rngs(0, dropout=1),
                                     policy="full", levels=levels)
    scanned, ref = make(), make()
  finally:
    nnx.use_eager_sharding(eager)
  spec = nnx.get_partition_spec(nnx.state(scanned, nnx.Param))["layers"]["lin"]["kernel"]
  assert spec.get_value() == jax.sharding.PartitionSpec("layers", "embed", "mlp")
  chex.assert_trees_all_close(scanned(x), ref.unrolled(x), rtol=1e-5, atol=1e-6)
  no_keys = nnx.Not(nnx.RngKey)
  chex.assert_trees_all_close(nnx.state(scanned, no_keys), nnx.state(ref, no_keys),
                              rtol=1e-5, atol=1e-6)
  assert scanned.layers.calls[...].tolist() == [1, 1, 1, 1]
  assert not jnp.allclose(scanned.layers.bn.mean[...], 0.0)


# --------------------------------------------------------------------------
# Defaults the caller did not pass stay Python values (the one static rule)
# --------------------------------------------------------------------------
class TrainDefault(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True, scale: float = 1.0):
    x = nn.Dense(4)(x) * scale
    return nn.Dropout(0.5, deterministic=not train)(x)  # `not train` needs a Python bool


class DeterministicDefault(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic: bool = False):
    return nn.Dropout(0.5, deterministic=deterministic)(nn.Dense(4)(x))


class KwOnlyDefault(nn.Module):
  @nn.compact
  def __call__(self, x, *, train=True):
    return nn.Dropout(0.5, deterministic=not train)(nn.Dense(4)(x))


@pytest.mark.parametrize("cls", [TrainDefault, DeterministicDefault, KwOnlyDefault])
def test_linen_a_default_not_passed_stays_a_python_value(cls):
  """`nn.remat` leaves an argument the caller did not pass as its Python default; under
  the decorator, with no static_argnames, that default is not traced either."""
  x = jnp.linspace(-1, 1, 12).reshape(3, 4)
  _same_everywhere(cls, x)


def test_linen_a_gap_in_the_defaults_passes_later_arguments_by_name():
  x = jnp.linspace(-1, 1, 12).reshape(3, 4)
  _same_everywhere(TrainDefault, x, scale=0.5)  # train left to its default, scale traced


def test_linen_a_passed_bool_is_traced_unless_named_static():
  x = jnp.ones((3, 4))
  rem = remat_policy("full")(TrainDefault)()
  v = rem.init(RNGS, x)
  with pytest.raises(TypeError, match=r"`train` \(Python bool True\).*static_argnames=\('train',"):
    rem.apply(v, x, True, rngs={"dropout": jax.random.key(2)})
  _same_everywhere(TrainDefault, x, True, static="train")
  _same_everywhere(TrainDefault, x, train=False, static="train")


class NnxDefaults(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x, train: bool = True, *, deterministic: bool = False):
    return self.drop(self.dense(x), deterministic=deterministic or not train)


@pytest.mark.parametrize("call", [
    lambda m, x: m(x),                        # both left to their defaults
    lambda m, x: m(x, deterministic=False),   # the keyword-only one passed, by keyword
])
def test_nnx_a_default_not_passed_stays_a_python_value(call):
  x = jnp.linspace(-1, 1, 12).reshape(3, 4)
  plain = NnxDefaults(nnx.Rngs(0))
  rem = remat_policy("full", static_argnames="deterministic")(NnxDefaults)(nnx.Rngs(0))
  loss = lambda m: jnp.sum(call(m, x) ** 2)
  chex.assert_trees_all_close(nnx.grad(loss)(rem), nnx.grad(loss)(plain), rtol=1e-6)
