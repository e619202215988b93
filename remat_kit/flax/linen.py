"""`@remat_policy` for Flax Linen modules: a switch that changes memory only.

``nn.remat(Block)`` makes a new class, ``CheckpointBlock``, so auto-generated
names change (``CheckpointBlock_0`` for ``Block_0``): the parameter tree, its
initial values and the dropout streams all differ with remat on. Its
``static_argnums`` also count ``self``.

``remat_policy`` instead rematerializes the module's *methods* in place (with
``nn.checkpoint`` applied to the method function), so the class keeps its
name and its parameter paths. Static arguments are given by name.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

import flax.linen as nn
import jax

from remat_kit import _compat, _jaxpr
from remat_kit.policies import SKIP_CHECKPOINT, Policy, from_config
from remat_kit.transforms import jax_policy

__all__ = ["remat_policy"]

M = TypeVar("M", bound=type)


def needs_tag_check(pol: Policy, check_names: bool) -> bool:
  """Whether applying ``pol`` calls for the trace-time tag check."""
  return check_names and bool(
      pol.referenced_names() or pol.referenced_primitives() - {"dot_general"})


def wrap_method(cls: type, method: str, pol: Policy, static_argnames: tuple[str, ...],
                prevent_cse: bool, check_names: bool, *, transform: Callable[..., Any],
                check: Callable[..., None]) -> Callable[..., Any]:
  """``cls.method`` run under ``transform`` (``nn.checkpoint``/``nnx.remat``) with ``pol``.

  ``check(self, call_orig, full, statics, pol, checked, cls, method)`` raises
  if the policy names a tag the method never makes; it runs once per shapes.
  """
  # The transforms count the module itself as argument 0, as the signature does.
  orig, sig, static_argnums = method_signature(cls, method, static_argnames)
  if pol.native() is SKIP_CHECKPOINT:
    return orig  # no remat: saves everything, exactly as the undecorated method
  checked: set[Any] = set()
  wants_check = needs_tag_check(pol, check_names)

  def call_orig(mdl: Any, *args: Any) -> Any:
    return orig(mdl, *args)

  @functools.wraps(orig)
  def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
    full, statics = bind_statics(sig, static_argnums, self, args, kwargs, cls, method)
    if wants_check:
      check(self, call_orig, full, statics, pol, checked, cls, method)
    return call_rematted(transform, call_orig, full, statics, pol, prevent_cse)

  return wrapped


def call_rematted(transform: Callable[..., Any], fn: Callable[..., Any], full: list[Any],
                  statics: tuple[int, ...], pol: Policy, prevent_cse: bool) -> Any:
  """``transform(fn, policy=...)(*full)`` (``nn.checkpoint`` or ``nnx.remat``) under the
  remat implementation ``pol`` needs (see :func:`remat_kit.transforms.jax_policy`)."""
  policy, classic = jax_policy(pol)
  ck = transform(fn, policy=policy, static_argnums=statics, prevent_cse=prevent_cse)
  if classic:
    with _compat.classic_remat():
      return ck(*full)
  return ck(*full)


def bind_statics(sig: inspect.Signature, static_argnums: tuple[int, ...], self: Any,
                 args: tuple[Any, ...], kwargs: dict[str, Any], cls: type, method: str
                 ) -> tuple[list[Any], tuple[int, ...]]:
  """All arguments positionally (self first), and which of them are static.

  Python flags (bool, str, None) cannot be traced: they are always static.
  """
  bound = sig.bind(self, *args, **kwargs)
  bound.apply_defaults()
  full = list(bound.arguments.values())
  names = list(sig.parameters)
  statics = tuple(sorted(set(static_argnums) | {
      i for i, a in enumerate(full) if i > 0 and (a is None or isinstance(a, (bool, str)))}))
  for i in statics:
    try:
      hash(full[i])
    except TypeError:
      raise TypeError(
          f"`remat_policy`: static argument `{names[i]}` of {cls.__name__}.{method} "
          f"is {type(full[i]).__name__} {full[i]!r}, which is not hashable; pass a "
          "hashable value (a tuple, not a list).") from None
  return full, statics


def method_signature(cls: type, method: str, static_argnames: tuple[str, ...]
                     ) -> tuple[Callable[..., Any], inspect.Signature, tuple[int, ...]]:
  """The method, its signature, and the positions (self = 0) of its static args."""
  orig = getattr(cls, method)
  if not callable(orig):
    raise TypeError(f"`remat_policy`: `{cls.__name__}.{method}` is not a method.")
  sig = inspect.signature(orig)
  params = list(sig.parameters.values())
  kinds = {p.kind for p in params}
  unknown = [n for n in static_argnames if n not in sig.parameters]
  if unknown:
    raise ValueError(
        f"`remat_policy`: `static_argnames` {unknown} are not parameters of "
        f"{cls.__name__}.{method}{sig}. Valid names: {[p.name for p in params[1:]]}.")
  if inspect.Parameter.VAR_POSITIONAL in kinds or inspect.Parameter.VAR_KEYWORD in kinds:
    raise TypeError(
        f"`remat_policy`: {cls.__name__}.{method} takes *args or **kwargs; name its "
        "arguments explicitly so static ones can be told from arrays.")
  return orig, sig, tuple(i for i, p in enumerate(params) if p.name in static_argnames)


def missing_tags_error(pol: Policy, closed: Any, cls: type, method: str) -> None:
  """Raises if ``pol`` names tags or primitives that ``closed`` never has."""
  have, have_prims = _jaxpr.tags_and_primitives(closed)
  missing = sorted(pol.referenced_names() - have)
  if missing:
    raise ValueError(
        f"`remat_policy`: policy {pol!r} on {cls.__name__}.{method} refers to checkpoint "
        f"names {missing} that the method never tags. Names it tags: "
        f"{sorted(have) or 'none'}. Fix the spelling, or tag the value with "
        "`remat_kit.checkpoint_name(x, name)`.")
  missing_p = sorted(pol.referenced_primitives() - {"dot_general"} - have_prims)
  if missing_p:
    raise ValueError(
        f"`remat_policy`: policy {pol!r} on {cls.__name__}.{method} refers to primitives "
        f"{missing_p} that the method never uses.")


def _check_tags(self: Any, call_orig: Callable[..., Any], full: list[Any],
                static_argnums: tuple[int, ...], pol: Policy, checked: set[Any],
                cls: type, method: str) -> None:
  """Raises if ``pol`` names a tag the method never makes (once per shapes)."""
  if self.is_initializing():
    return
  dyn = [(i, a) for i, a in enumerate(full) if i > 0 and i not in static_argnums]
  key = (tuple((i, full[i]) for i in static_argnums),
         tuple((i, jax.tree_util.tree_structure(a),
                tuple(_jaxpr.aval_key(jax.typeof(x)) for x in jax.tree_util.tree_leaves(a)))
               for i, a in dyn))
  if key in checked:
    return
  variables = self.variables

  def run(variables: Any, *dyn_vals: Any) -> Any:
    args = list(full[1:])
    for (i, _), v in zip(dyn, dyn_vals):
      args[i - 1] = v
    unbound = self.clone(parent=None)
    rngs = {n: jax.random.key(0) for n in self.scope.rngs}
    return unbound.apply(variables, *args, rngs=rngs, method=call_orig, mutable=True)

  closed = jax.make_jaxpr(run)(variables, *[a for _, a in dyn])
  missing_tags_error(pol, closed, cls, method)
  checked.add(key)


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
    static_argnames: names of Python-valued arguments such as ``"train"`` or
      ``"deterministic"`` (not positions, so no ``self`` off-by-one). Values
      that are a Python ``bool``, ``str`` or ``None`` are static anyway.
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
  pol = from_config(policy)
  names = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
  meths = (methods,) if isinstance(methods, str) else tuple(methods)
  if not meths:
    raise ValueError("`remat_policy`: `methods` is empty; name at least one method.")

  def decorate(cls: M) -> M:
    from flax import nnx

    if isinstance(cls, type) and issubclass(cls, nnx.Module):
      from remat_kit.flax.nnx import wrap_nnx_method

      wrap = wrap_nnx_method
    elif isinstance(cls, type) and issubclass(cls, nn.Module):
      wrap = functools.partial(wrap_method, transform=nn.checkpoint, check=_check_tags)
    else:
      raise TypeError(
          f"`remat_policy`: expected a flax.linen.Module or flax.nnx.Module subclass, got "
          f"{cls!r}. Decorate "
          "the class (not an instance or a function); for plain functions use "
          "`remat_kit.remat`.")
    missing = [m for m in meths if not hasattr(cls, m)]
    if missing:
      raise ValueError(f"`remat_policy`: {cls.__name__} has no methods {missing}.")
    body = {m: wrap(cls, m, pol, names, prevent_cse, check_names) for m in meths}
    body.update(__module__=cls.__module__, __qualname__=cls.__qualname__, __doc__=cls.__doc__)
    new = type(cls.__name__, (cls,), body)
    # Set after creation: Flax wraps callable class attributes (policies are) as methods.
    new.__remat_policy__ = pol
    return new  # type: ignore[return-value]

  return decorate
