"""`@remat_policy`: a class decorator that rematerializes Linen or NNX modules in place.

``nn.remat(Block)`` makes a new class, ``CheckpointBlock``, so auto-generated
names change (``CheckpointBlock_0`` for ``Block_0``): the parameter tree, its
initial values and the dropout streams all differ with remat on. Its
``static_argnums`` also count ``self``.

``remat_policy`` instead rematerializes the module's *methods* in place
(``nn.checkpoint`` for Linen, ``nnx.remat`` for NNX, applied to the method
function), so the class keeps its name and its parameter paths. Static
arguments are given by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

import flax.linen as flax_linen
from flax import nnx as flax_nnx

from remat_kit.flax import linen, nnx
from remat_kit.policies import from_config

__all__ = ["remat_policy"]

M = TypeVar("M", bound=type)


@overload
def remat_policy(policy: M) -> M: ...
@overload
def remat_policy(policy: Any = ..., *, static_argnames: str | Sequence[str] = ...,
                 methods: str | Sequence[str] = ..., prevent_cse: bool = ...,
                 check_names: bool = ...) -> Callable[[M], M]: ...
def remat_policy(policy: Any = None, *, static_argnames: str | Sequence[str] = (),
                 methods: str | Sequence[str] = ("__call__",), prevent_cse: bool = True,
                 check_names: bool = True) -> Any:
  """Class decorator: rematerialize a Linen or NNX module's methods under ``policy``.

  The decorated class keeps its name, so parameter paths, initial values and
  dropout streams are those of the undecorated class: switching remat on
  changes memory and nothing else.

  Args:
    policy: anything :func:`remat_kit.policies.from_config` accepts; full
      remat by default. When the decorator is used bare, this is the class.
    static_argnames: names of arguments that must be static, passed by
      position or by keyword (``**kwargs`` keys too); names, not positions,
      so no ``self`` off-by-one. The one rule of :func:`remat_kit.remat`: named
      arguments, and ``str``/enum values (which JAX cannot trace), are static;
      Python ``bool``, ``int`` and ``float`` are traced unless named.
      Arguments are bound by the method's signature, ``*args``/``**kwargs``
      passed through; a traced argument used as a Python value raises an
      error naming the candidates.
    methods: the methods to rematerialize.
    prevent_cse: as in ``jax.checkpoint``; use False for modules in a scan.
    check_names: raise at apply time if the policy names a tag the method
      never makes.

  Returns:
    A subclass with the same name whose methods are rematerialized.

  Raises:
    TypeError: if the target is not a Linen Module class.
    ValueError: for a static argument name the method does not have, or (at
      apply time) a policy name that the module never tags.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from remat_kit.flax import remat_policy
    >>> @remat_policy("save_dots", static_argnames="train")
    ... class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train: bool):
    ...     return nn.Dropout(0.1, deterministic=not train)(nn.relu(nn.Dense(4)(x)))
    >>> Block.__name__
    'Block'
  """
  if isinstance(policy, type):
    return remat_policy()(policy)
  _refuse_misuse(policy)
  pol = from_config(policy)
  names = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
  meths = (methods,) if isinstance(methods, str) else tuple(methods)
  if not meths:
    raise ValueError("`remat_policy`: `methods` is empty; name at least one method.")

  def decorate(cls: M) -> M:
    if isinstance(cls, type) and issubclass(cls, flax_nnx.Module):
      wrap = nnx.wrap_nnx_method
    elif isinstance(cls, type) and issubclass(cls, flax_linen.Module):
      wrap = linen.wrap_linen_method
    else:
      raise TypeError(
          f"`remat_policy`: expected a flax.linen.Module or flax.nnx.Module subclass, got "
          f"{cls!r}. Decorate "
          "the class (not an instance or a function); for plain functions use "
          "`remat_kit.remat`.")
    missing = [m for m in meths if not hasattr(cls, m)]
    if missing:
      raise ValueError(f"`remat_policy`: {cls.__name__} has no methods {missing}.")
    # Decorating a class this decorator made (twice, or with another policy) replaces
    # its policy: the new class derives from the undecorated one, so it is one level.
    base: type = cls.__bases__[0] if "__remat_policy__" in cls.__dict__ else cls
    body: dict[str, Any] = {
        m: wrap(base, m, pol, _names_for(base, m, names, meths), prevent_cse, check_names)
        for m in meths}
    body.update(__module__=base.__module__, __qualname__=base.__qualname__,
                __doc__=base.__doc__)
    # Any: a class made at run time, with an attribute set on it below.
    new: Any = type(base.__name__, (base,), body)
    # Set after creation: Flax wraps callable class attributes (policies are) as methods.
    new.__remat_policy__ = pol
    return new

  return decorate


def _names_for(cls: type, method: str, names: tuple[str, ...], meths: tuple[str, ...]
               ) -> tuple[str, ...]:
  """The static names that apply to ``method``: each must be a parameter of at least one
  of ``meths`` (else the error lists them), and applies where it is one."""
  def takes(m: str) -> Callable[[str], bool]:
    params = inspect.signature(getattr(cls, m)).parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return lambda n: var_kw or n in params
  unknown = [n for n in names if not any(takes(m)(n) for m in meths)]
  if unknown:
    valid = sorted({p for m in meths for p in inspect.signature(getattr(cls, m)).parameters}
                   - {"self"})
    raise ValueError(
        f"`remat_policy`: `static_argnames` {unknown} are not parameters of "
        f"{', '.join(f'{cls.__name__}.{m}' for m in meths)}. Valid names: {valid}.")
  return tuple(n for n in names if takes(method)(n))


def _refuse_misuse(policy: Any) -> None:
  """A method or a module instance where a policy belongs: a TypeError naming the fix."""
  if isinstance(policy, (flax_linen.Module, flax_nnx.Module)):
    raise TypeError(
        f"`remat_policy`: got the module instance {type(policy).__name__}(...) as `policy`. "
        "`remat_policy` decorates a Module *class*: write `remat_policy(policy)(Block)` or "
        "`@remat_policy(...)` above `class Block(nn.Module)`; to rematerialize one "
        "instance's call, use `nn.remat`/`nnx.remat` or `remat_kit.remat`.")
  if inspect.isfunction(policy):
    params = list(inspect.signature(policy).parameters)
    if params and params[0] == "self":
      raise TypeError(
          f"`remat_policy`: got the method `{policy.__qualname__}` as `policy`: "
          "`remat_policy` decorates a Module class, not a method (as `nn.remat` users "
          "often write it). Put `@remat_policy(...)` above the `class` line (with "
          f"`methods=({policy.__name__!r},)` for a method other than `__call__`).")
