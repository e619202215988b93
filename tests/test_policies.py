"""Policies as values: hashable, readable, composable, buildable from config."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import pytest

import remat_kit as rk
from remat_kit import policies as P
from remat_kit import targets

ALL = [
    P.everything_saveable(),
    P.nothing_saveable(),
    P.dots_saveable(),
    P.dots_with_no_batch_dims_saveable(),
    P.save_only_these_names("a", "b"),
    P.offload_these_names("a"),
    P.save_any_names_but_these("a"),
    P.save_anything_except_these_names("a"),
    P.save_these_primitives("sin"),
    P.save_by_size(max_bytes=1024),
    P.offload(P.dots_with_no_batch_dims_saveable()),
    P.SaveOrOffloadNames(save=("a",), offload=("b",)),
    P.dots_saveable() | P.save_only_these_names("a"),
    P.dots_saveable() & P.save_by_size(max_bytes=10),
]


@pytest.mark.parametrize("policy", ALL, ids=repr)
def test_policies_are_frozen_hashable_values(policy):
  rebuilt = dataclasses.replace(policy)
  assert rebuilt == policy and hash(rebuilt) == hash(policy)
  with pytest.raises(dataclasses.FrozenInstanceError):
    policy.names = ("changed",)
  assert type(policy).__name__ in repr(policy)


@pytest.mark.parametrize("policy", ALL, ids=repr)
def test_policies_run_in_jax_checkpoint_with_unchanged_gradients(policy):
  """Each policy handed straight to ``jax.checkpoint`` (classic remat) runs and keeps
  the gradient; offloading ones are exercised where the backend has host memory."""
  if policy.offloads and not targets.can_offload():
    pytest.skip("offload needs a backend with pinned_host memory in a jitted step")

  def f(x):
    a = rk.checkpoint_name(jnp.sin(x @ x), "a")
    b = rk.checkpoint_name(jnp.cos(a), "b")
    return jnp.sum(b * a)

  x = jnp.linspace(0.1, 1.0, 16).reshape(4, 4)
  with rk.classic_remat():
    ck = jax.checkpoint(f, policy=policy)
  chex.assert_trees_all_close(jax.grad(ck)(x), jax.grad(f)(x), rtol=1e-6)


def test_names_are_sorted_and_deduplicated():
  assert P.save_only_these_names("b", "a", "b").names == ("a", "b")
  assert P.save_only_these_names("a", "b") == P.save_only_these_names("b", "a")


@pytest.mark.parametrize("bad", ["", 3, None])
def test_bad_names_are_rejected(bad):
  with pytest.raises(TypeError, match="non-empty str"):
    P.save_only_these_names(bad)


def test_union_and_intersection_flatten_and_match_hand_written():
  a, b, c = P.dots_saveable(), P.save_only_these_names("x"), P.save_these_primitives("sin")
  assert (a | b) | c == P.Union((a, b, c))
  assert a & (b & c) == P.Intersection((a, b, c))
  assert P.save_from_both_policies(a, b) == a | b
  assert "x" in (a | b).referenced_names()


def test_name_plan_rejects_overlap():
  with pytest.raises(ValueError, match=r"both saved and offloaded"):
    P.SaveOrOffloadNames(save=("a",), offload=("a",))


def test_save_by_size_validates():
  with pytest.raises(ValueError, match="`max_bytes`"):
    P.save_by_size(min_bytes=10, max_bytes=5)
  with pytest.raises(ValueError, match="`min_bytes`"):
    P.save_by_size(min_bytes=-1)


@pytest.mark.parametrize(
    "value, expected",
    [
        (True, P.SaveNothing()),
        (None, P.SaveNothing()),
        (False, P.SaveEverything()),
        ("full", P.SaveNothing()),
        ("no_remat", P.SaveEverything()),
        ("save_dots", P.SaveDots(False)),
        ("minimal", P.SaveDots(True)),
        ("save_qkv", P.SaveNames(("qkv",))),
        ("save:a, b", P.SaveNames(("a", "b"))),
        ("offload:h", P.OffloadNames(("h",))),
        ("except:p", P.SaveAnythingExcept(("p",))),
        ("prims:sin,exp", P.SavePrimitives(("exp", "sin"))),
        ("save_dots | save:a", P.Union((P.SaveDots(False), P.SaveNames(("a",))))),
        ("save_dots & prims:dot_general",
         P.Intersection((P.SaveDots(False), P.SavePrimitives(("dot_general",))))),
        ({"attn_out": "save", "mlp_hidden": "offload", "*": "recompute"},
         P.SaveOrOffloadNames(save=("attn_out",), offload=("mlp_hidden",))),
        ({"a": "save"}, P.SaveOrOffloadNames(save=("a",))),
        ({"*": "save", "p": "recompute"}, P.SaveAnythingExcept(("p",))),
        ({"*": "save"}, P.SaveEverything()),
        (jax.checkpoint_policies.dots_saveable, P.SaveDots(False)),
        (jax.checkpoint_policies.nothing_saveable, P.SaveNothing()),
        (jax.checkpoint_policies.everything_saveable, P.SaveEverything()),
        (jax.checkpoint_policies.save_only_these_names("q"), P.SaveNames(("q",))),
        (jax.checkpoint_policies.save_any_names_but_these("q"), P.SaveAnyNamesBut(("q",))),
    ],
    ids=lambda v: getattr(v, "__name__", None) or repr(v),  # stable across xdist workers
)
def test_from_config(value, expected):
  assert P.from_config(value) == expected
  assert rk.from_config(value) == expected


def test_from_config_passes_policies_through():
  p = P.save_only_these_names("a")
  assert P.from_config(p) is p


def test_unknown_string_lists_choices_and_suggests():
  with pytest.raises(ValueError) as e:
    P.from_config("save_dot")
  msg = str(e.value)
  assert "'save_dot'" in msg and "Did you mean" in msg and "'save_dots'" in msg
  assert "'full'" in msg and "save:<name>" in msg


@pytest.mark.parametrize(
    "value, match",
    [
        ({"a": "keep"}, r"'a' maps to 'keep'.*'save', 'offload', 'recompute'"),
        ({"*": "offload"}, r"'\*': 'offload'"),
        ("bogus:a", r"unknown prefix 'bogus'"),
        ("save:", r"names no tensors"),
    ],
)
def test_bad_config_values(value, match):
  with pytest.raises(ValueError, match=match):
    P.from_config(value)


def test_unsupported_types():
  with pytest.raises(TypeError, match="cannot build a policy from 3"):
    P.from_config(3)
  with pytest.raises(TypeError, match="dict keys must be tensor names"):
    P.from_config({1: "save"})


def test_plain_callables_are_wrapped():
  def my_policy(prim, *_, **__):
    return prim.name == "sin"

  assert P.from_config(my_policy) == P.CallablePolicy(my_policy)


def test_registry_rejects_duplicates_and_lists_descriptions():
  with pytest.raises(ValueError, match="already exists"):
    P.register("full", P.SaveNothing)
  assert "save_dots" in P.registered() and P.registered()["full"]


def test_one_spelling_each_for_no_remat_and_full_remat():
  assert P.from_config(None) == P.from_config(True) == P.from_config("full") == P.SaveNothing()
  assert P.from_config(False) == P.from_config("no_remat") == P.SaveEverything()
  for ambiguous in ("none", "None", " none "):
    with pytest.raises(ValueError, match=r"ambiguous.*'no_remat'.*'full'"):
      P.from_config(ambiguous)


def test_composing_with_a_config_value_is_a_type_error_naming_from_config():
  with pytest.raises(TypeError, match=r"`\|` composes remat_kit policies; got 'save:x'.*"
                                      r"from_config\('save:x'\)"):
    P.dots_saveable() | "save:x"
  with pytest.raises(TypeError, match=r"`&` composes .*got True"):
    True & P.dots_saveable()
  assert P.dots_saveable() | P.from_config("save:x") == P.from_config("save_dots | save:x")
