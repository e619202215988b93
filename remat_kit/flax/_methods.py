"""Method machinery shared by the Linen and NNX decorators: signatures, statics, checks.

A decorated method is bound by its signature, its static (Python-valued)
arguments are told from arrays, the policy's names are checked against what
the method tags (once per shapes), and the method runs under the framework's
remat transform as :mod:`remat_kit._dispatch` decides.
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Callable
from typing import Any

from remat_kit import _dispatch, _jaxpr
from remat_kit.policies import Policy

__all__ = ["bind_statics", "is_python_static", "method_signature", "missing_tags_error",
           "needs_tag_check", "wrap_method"]


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
  if _dispatch.plan(pol).kind == "skip":
    return orig  # no remat: saves everything, exactly as the undecorated method
  checked: set[Any] = set()
  wants_check = needs_tag_check(pol, check_names)

  # The transforms take arguments positionally; keyword-only ones go back by name.
  params = list(sig.parameters.values())
  kw_only = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
  n_pos = len(params) - len(kw_only) - 1  # without self

  def call_orig(mdl: Any, *args: Any) -> Any:
    return orig(mdl, *args[:n_pos], **dict(zip(kw_only, args[n_pos:])))

  @functools.wraps(orig)
  def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
    full, statics = bind_statics(sig, static_argnums, self, args, kwargs, cls, method)
    if wants_check:
      check(self, call_orig, full, statics, pol, checked, cls, method)
    return _dispatch.apply_transform(transform, call_orig, pol, statics, prevent_cse, full)

  return wrapped


def bind_statics(sig: inspect.Signature, static_argnums: tuple[int, ...], self: Any,
                 args: tuple[Any, ...], kwargs: dict[str, Any], cls: type, method: str
                 ) -> tuple[list[Any], tuple[int, ...]]:
  """All arguments in signature order (self first; keyword-only ones last), and which of
  them are static.

  Python values (None, bool, int, float, str, enums, and tuples of them) are
  always static: a method uses them for control flow and shapes, which traced
  values cannot drive.
  """
  bound = sig.bind(self, *args, **kwargs)
  bound.apply_defaults()
  full = list(bound.arguments.values())
  names = list(sig.parameters)
  statics = tuple(sorted(set(static_argnums) | {
      i for i, a in enumerate(full) if i > 0 and is_python_static(a)}))
  for i in statics:
    try:
      hash(full[i])
    except TypeError:
      raise TypeError(
          f"`remat_policy`: static argument `{names[i]}` of {cls.__name__}.{method} "
          f"is {type(full[i]).__name__} {full[i]!r}, which is not hashable; pass a "
          "hashable value (a tuple, not a list).") from None
  return full, statics


def is_python_static(value: Any) -> bool:
  """None, bool, int, float, str, an enum member, or a tuple of these."""
  if value is None or isinstance(value, (bool, int, float, str, enum.Enum)):
    return True
  return isinstance(value, tuple) and all(is_python_static(v) for v in value)


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


