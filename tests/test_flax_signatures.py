"""The decorator on the signatures real Flax code uses (issue: Flax signatures)."""

import enum

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

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
  plain, rem = KwOnly(), remat_policy("full")(KwOnly)()
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
  plain, rem = NnxKw(nnx.Rngs(0)), remat_policy("full")(NnxKw)(nnx.Rngs(0))
  loss = lambda m: jnp.sum(m(x, reps=3, scale=0.5))
  chex.assert_trees_all_close(nnx.grad(loss)(rem), nnx.grad(loss)(plain), rtol=1e-6)


# --------------------------------------------------------------------------
# Policy config strings: the small items of the same issue
# --------------------------------------------------------------------------
import pytest  # noqa: E402

from remat_kit import policies as P  # noqa: E402


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
    rk.remat_scan(body, c, {"a": jnp.ones((4, 3, 3)), "b": jnp.ones((5, 3))}, groups=2)
  with pytest.raises(ValueError, match=r"leaf `xs\['s'\]` is a scalar"):
    rk.remat_scan(body, c, {"s": jnp.float32(1.0), "w": jnp.ones((4, 3, 3))})
  with pytest.raises(ValueError, match="0 layers"):
    rk.remat_scan(body, c, jnp.ones((0, 3, 3)))
  with pytest.raises(TypeError, match="`groups` must be None, an int number of levels"):
    rk.remat_scan(body, c, jnp.ones((4, 3, 3)), groups=True)
