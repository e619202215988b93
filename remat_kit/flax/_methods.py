"""Method machinery shared by the Linen and NNX decorators: signatures, statics, checks.

A decorated method is bound by its signature, its static (Python-valued)
arguments are told from arrays, the policy's names are checked against what
the method tags (once per shapes), and the method runs under the framework's
remat transform as :mod:`remat_kit._dispatch` decides.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax

from remat_kit import _dispatch, _jaxpr
from remat_kit._args import untraceable
from remat_kit.policies import Policy

__all__ = ["bind_statics", "is_python_static", "method_signature", "missing_tags_error",
           "needs_tag_check", "wrap_method"]


def needs_tag_check(pol: Policy, check_names: bool) -> bool:
  """Whether applying ``pol`` calls for the trace-time tag check."""
  return check_names and bool(
      pol.referenced_names() or pol.checked_primitives())


def wrap_method(cls: type, method: str, pol: Policy, static_argnames: tuple[str, ...],
                prevent_cse: bool, check_names: bool, *, transform: Callable[..., Any],
                check: Callable[..., None]) -> Callable[..., Any]:
  """``cls.method`` run under ``transform`` (``nn.checkpoint``/``nnx.remat``) with ``pol``.

  ``check(self, call_orig, full, statics, pol, checked, cls, method)`` raises
  if the policy names a tag the method never makes; it runs once per shapes.
  """
  # The transforms count the module itself as argument 0, as the signature does.
  orig, sig = method_signature(cls, method, static_argnames)
  if _dispatch.route(pol).kind == "skip":
    return orig  # no remat: saves everything, exactly as the undecorated method
  checked: set[Any] = set()
  wants_check = needs_tag_check(pol, check_names)
  layouts: dict[tuple[int, tuple[str, ...]], Callable[..., Any]] = {}  # lives with the class

  @functools.wraps(orig)
  def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
    full, n_pos, kw_names, statics = bind_statics(
        sig, static_argnames, self, args, kwargs, cls, method)
    call_orig = layouts.get((n_pos, kw_names))
    if call_orig is None:
      call_orig = layouts.setdefault((n_pos, kw_names), _positional(orig, n_pos, kw_names))
    if wants_check:
      check(self, call_orig, full, statics, pol, checked, cls, method)
    try:
      return _dispatch.apply_transform(transform, call_orig, pol, statics, prevent_cse, full)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError) as e:
      raise _static_hint(e, sig, full, statics, n_pos, kw_names, cls, method) from e

  wrapped.__remat_kit_orig__ = orig  # type: ignore[attr-defined]
  return wrapped


def _positional(orig: Callable[..., Any], n_pos: int, kw_names: tuple[str, ...]
                ) -> Callable[..., Any]:
  """``orig`` taking every argument positionally: the transforms pass them so.

  The first ``n_pos`` (self included) go back by position, the rest by the
  names in ``kw_names`` (keyword-only parameters and ``**kwargs`` entries).
  The caller keeps one function object per layout, so trace caches keyed on it hit.
  """

  def call_orig(*args: Any) -> Any:
    return orig(*args[:n_pos], **dict(zip(kw_names, args[n_pos:])))

  return call_orig


def _static_hint(err: Exception, sig: inspect.Signature, full: list[Any],
                 statics: tuple[int, ...], n_pos: int, kw_names: tuple[str, ...],
                 cls: type, method: str) -> TypeError:
  """The error for a traced argument used as a Python value: which ones to make static."""
  labels = _labels(sig, n_pos, kw_names)
  traced = [f"`{labels[i]}` ({_describe(full[i])})" for i in range(1, len(full))
            if i not in statics and jax.tree_util.tree_leaves(full[i])]
  scalars = [labels[i] for i in range(1, len(full)) if i not in statics
             and all(isinstance(x, (bool, int, float)) or getattr(x, "shape", None) == ()
                     for x in jax.tree_util.tree_leaves(full[i]))
             and jax.tree_util.tree_leaves(full[i])]
  hint = (f"`static_argnames=({', '.join(repr(n) for n in scalars)},)`" if scalars
          else "`static_argnames`")
  return TypeError(
      f"`remat_policy`: {cls.__name__}.{method} used a traced argument as a Python value "
      f"({type(err).__name__}). Traced arguments: {', '.join(traced) or 'none'}. Name the "
      f"one that drives control flow or shapes in {hint} (bools, ints and floats are "
      "traced unless named, as in `jax.checkpoint`; str and enum values are static "
      "automatically).")


def _describe(value: Any) -> str:
  leaves = jax.tree_util.tree_leaves(value)
  if isinstance(value, (bool, int, float)):
    return f"Python {type(value).__name__} {value!r}"
  if len(leaves) == 1 and hasattr(leaves[0], "dtype"):
    x = leaves[0]
    return f"{x.dtype}[{','.join(map(str, x.shape))}]"
  return f"{type(value).__name__} with {len(leaves)} leaves"


def _labels(sig: inspect.Signature, n_pos: int, kw_names: tuple[str, ...]) -> list[str]:
  """The user's name for each entry of the flattened argument list."""
  out: list[str] = []
  for p in sig.parameters.values():
    if len(out) >= n_pos:
      break
    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
      out.append(p.name)
    elif p.kind is p.VAR_POSITIONAL:
      out.extend(f"{p.name}[{i}]" for i in range(n_pos - len(out)))
  out.extend(kw_names)
  return out


def bind_statics(sig: inspect.Signature, static_argnames: tuple[str, ...], self: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any], cls: type, method: str
                 ) -> tuple[list[Any], int, tuple[str, ...], tuple[int, ...]]:
  """The call bound by the method's signature and flattened for the transforms.

  Returns ``(full, n_pos, kw_names, statics)``: the arguments the caller
  passed, self first, then the positional ones (``*args`` entries expanded),
  then the keyword ones (keyword-only parameters, positional parameters given
  by name after one left to its default, then ``**kwargs`` entries) whose
  names are ``kw_names``; ``n_pos`` counts self and the positional ones, and
  ``statics`` are the positions in ``full`` that are static.

  The one static rule (:mod:`remat_kit._args`): only arguments the caller
  passes are traced, unless named in ``static_argnames`` or untraceable (a
  str, an enum member, None, a tuple of these). A parameter the caller leaves
  out is not passed through the transform at all, so the method sees its
  default as the Python value it is, as ``nn.remat`` leaves it.
  """
  bound = sig.bind(self, *args, **kwargs)
  full: list[Any] = []
  kw: list[tuple[str, Any]] = []
  named: set[int] = set()
  gap = False  # a positional parameter was left to its default: later ones go by name
  for name, p in sig.parameters.items():
    if name not in bound.arguments:
      gap = gap or p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
      continue
    value = bound.arguments[name]
    if p.kind is p.POSITIONAL_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and not gap):
      if name in static_argnames:
        named.add(len(full))
      full.append(value)
    elif p.kind is p.VAR_POSITIONAL:
      if name in static_argnames:
        named.update(range(len(full), len(full) + len(value)))
      full.extend(value)
    elif p.kind is p.VAR_KEYWORD:
      kw.extend(value.items())
    else:  # keyword-only, or positional given by name after a gap
      kw.append((name, value))
  n_pos = len(full)
  for name, _ in kw:
    if name in static_argnames:
      named.add(len(full) + [k for k, _ in kw].index(name))
  full.extend(value for _, value in kw)
  kw_names = tuple(name for name, _ in kw)
  labels = _labels(sig, n_pos, kw_names)
  statics = tuple(sorted(named | {
      i for i, a in enumerate(full) if i > 0 and is_python_static(a)}))
  for i in statics:
    try:
      hash(full[i])
    except TypeError:
      raise TypeError(
          f"`remat_policy`: static argument `{labels[i]}` of {cls.__name__}.{method} "
          f"is {type(full[i]).__name__} {full[i]!r}, which is not hashable; pass a "
          "hashable value (a tuple, not a list).") from None
  return full, n_pos, kw_names, statics


def is_python_static(value: Any) -> bool:
  """A value JAX cannot trace, so static whether named or not (see
  :func:`remat_kit._args.untraceable`): None, a str, an enum member, or a tuple of
  these. Python bools, ints and floats are traced unless named in ``static_argnames``,
  as in :func:`remat_kit.remat` and ``jax.checkpoint``."""
  return value is None or untraceable(value)


def method_signature(cls: type, method: str, static_argnames: tuple[str, ...]
                     ) -> tuple[Callable[..., Any], inspect.Signature]:
  """The method and its signature, with ``static_argnames`` checked against it."""
  orig = getattr(cls, method)
  # A method remat_kit already wrapped (a subclass of a decorated class, or the decorator
  # applied twice) is wrapped afresh from the original: one level of remat, never two.
  orig = getattr(orig, "__remat_kit_orig__", orig)
  if not callable(orig):
    raise TypeError(f"`remat_policy`: `{cls.__name__}.{method}` is not a method.")
  sig = inspect.signature(orig)
  params = list(sig.parameters.values())
  kinds = {p.kind for p in params}
  unknown = [n for n in static_argnames if n not in sig.parameters]
  if unknown and inspect.Parameter.VAR_KEYWORD not in kinds:
    raise ValueError(
        f"`remat_policy`: `static_argnames` {unknown} are not parameters of "
        f"{cls.__name__}.{method}{sig}. Valid names: {[p.name for p in params[1:]]}.")
  return orig, sig


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
  missing_p = sorted(pol.checked_primitives() - have_prims)
  if missing_p:
    raise ValueError(
        f"`remat_policy`: policy {pol!r} on {cls.__name__}.{method} refers to primitives "
        f"{missing_p} that the method never uses.")


