"""NNX support for `remat_policy`: methods rematerialized with ``nnx.remat``.

The class keeps its name and attributes, so parameters and the ``nnx.Rngs``
streams that drive dropout are those of the undecorated class.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from remat_kit import _compat, _jaxpr
from remat_kit.flax.linen import bind_statics, method_signature, missing_tags_error, needs_tag_check
from remat_kit.policies import SKIP_CHECKPOINT, Policy
from remat_kit.transforms import jax_policy

__all__ = ["wrap_nnx_method"]


def wrap_nnx_method(cls: type, method: str, pol: Policy, static_argnames: tuple[str, ...],
                    prevent_cse: bool, check_names: bool) -> Callable[..., Any]:
  """``cls.method`` run under ``nnx.remat`` with ``pol``."""
  orig, sig, static_argnums = method_signature(cls, method, static_argnames)
  if pol.native() is SKIP_CHECKPOINT:
    return orig
  checked: set[Any] = set()
  wants_check = needs_tag_check(pol, check_names)

  def call_orig(mdl: Any, *args: Any) -> Any:
    return orig(mdl, *args)

  @functools.wraps(orig)
  def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
    full, statics = bind_statics(sig, static_argnums, self, args, kwargs, cls, method)
    if wants_check:
      _check(self, full, statics, pol, checked, call_orig, cls, method)
    policy, classic = jax_policy(pol)
    ck = nnx.remat(call_orig, policy=policy, static_argnums=statics, prevent_cse=prevent_cse)
    if classic:
      with _compat.classic_remat():
        return ck(*full)
    return ck(*full)

  return wrapped


def _check(self: Any, full: list[Any], statics: tuple[int, ...], pol: Policy,
           checked: set[Any], call_orig: Callable[..., Any], cls: type, method: str) -> None:
  dyn = [i for i in range(1, len(full)) if i not in statics]
  key = (tuple((i, full[i]) for i in statics),
         tuple(tuple(_jaxpr.aval_key(jax.typeof(x)) for x in jax.tree_util.tree_leaves(full[i]))
               for i in dyn))
  if key in checked:
    return
  graphdef, state = nnx.split(self)

  def run(state: Any, *dyn_vals: Any) -> Any:
    args = list(full)
    args[0] = nnx.merge(graphdef, state)  # a copy: self's RNG state is not advanced
    for i, v in zip(dyn, dyn_vals):
      args[i] = v
    return call_orig(*args)

  closed = jax.make_jaxpr(run)(state, *[full[i] for i in dyn])
  missing_tags_error(pol, closed, cls, method)
  checked.add(key)
