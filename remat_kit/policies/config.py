"""Config in, policy out: the preset registry, the string/dict parser and `from_config`.

What each preset saves and recomputes is listed under :func:`registered`.

>>> from remat_kit.policies import from_config
>>> from_config("save_dots_no_batch | save:qkv")
Union(policies=(SaveDots(no_batch_dims=True), SaveNames(names=('qkv',))))
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

from remat_kit import _jax
from remat_kit.policies import factories
from remat_kit.policies.base import (
  DEFAULT_OFFLOAD_DST,
  DEFAULT_OFFLOAD_SRC,
  Intersection,
  Offload,
  Policy,
  Union,
)
from remat_kit.policies.library import (
  CallablePolicy,
  OffloadNames,
  SaveAnyNamesBut,
  SaveAnythingExcept,
  SaveDots,
  SaveEverything,
  SaveNames,
  SaveNothing,
  SaveOrOffloadNames,
  SavePrimitives,
)

__all__ = ["from_config", "offload", "register", "registered", "save_from_all_policies",
           "save_from_both_policies", "save_if_all_policies_save"]

_ACTIONS = ("save", "offload", "recompute")


def offload(policy: Any, *, src: str = DEFAULT_OFFLOAD_SRC,
            dst: str = DEFAULT_OFFLOAD_DST) -> Offload:
  """Offload to host what ``policy`` would save.

  Args:
    policy: anything :func:`from_config` accepts.
    src: the memory kind the values live in (``"device"`` by default).
    dst: the memory kind to offload to (``"pinned_host"`` by default).

  Returns:
    An :class:`~remat_kit.policies.Offload` of ``policy``: it recomputes what
    ``policy`` recomputes and moves what ``policy`` saves to host memory.

  Raises:
    ValueError: for a config value :func:`from_config` does not know.
    TypeError: for a value of a type :func:`from_config` does not take.
  """
  return Offload(from_config(policy), src, dst)


def save_from_both_policies(policy_1: Any, policy_2: Any) -> Union:
  """Logical OR of two policies (JAX's name for it).

  Args:
    policy_1: anything :func:`from_config` accepts.
    policy_2: the same.

  Returns:
    A :class:`~remat_kit.policies.Union` of the two.

  Raises:
    ValueError: for a config value :func:`from_config` does not know.
    TypeError: for a value of a type :func:`from_config` does not take.
  """
  return save_from_all_policies(policy_1, policy_2)


def save_from_all_policies(*policies: Any) -> Union:
  """Save a value if any of the policies saves it.

  Args:
    *policies: one or more values :func:`from_config` accepts.

  Returns:
    A :class:`~remat_kit.policies.Union` of them.

  Raises:
    ValueError: if no policy is given, or for a config value
      :func:`from_config` does not know.
    TypeError: for a value of a type :func:`from_config` does not take.
  """
  return _combined("save_from_all_policies", Union.of, policies)


def _combined(api: str, of: Callable[..., Any], policies: tuple[Any, ...]) -> Any:
  if not policies:
    raise ValueError(f"`{api}` needs at least one policy.")
  return of(*[from_config(p) for p in policies])


def save_if_all_policies_save(*policies: Any) -> Intersection:
  """Save a value only if every policy saves it: an
  :class:`~remat_kit.policies.Intersection` of ``*policies`` (one or more values
  :func:`from_config` accepts), raising as :func:`save_from_all_policies` does."""
  return _combined("save_if_all_policies_save", Intersection.of, policies)


_REGISTRY: dict[str, Callable[[], Policy]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register(name: str, factory: Callable[[], Policy], description: str = "") -> None:
  """Adds a preset to the registry that :func:`from_config` reads.

  Args:
    name: the config string, e.g. ``"save_qkv"``.
    factory: a zero-argument callable returning a policy.
    description: one line on what it saves, shown by :func:`registered`.

  Raises:
    ValueError: if ``name`` is taken or not a valid preset name.
  """
  if not isinstance(name, str) or not name or any(c in name for c in "|&:,* "):
    raise ValueError(
        f"`register`: `name` must be a non-empty str without '|&:,* ', got {name!r}.")
  if name in _REGISTRY:
    raise ValueError(f"`register`: preset {name!r} already exists; pick another name.")
  _REGISTRY[name] = factory
  _DESCRIPTIONS[name] = description


def registered() -> dict[str, str]:
  """The preset names and what each saves.

  What the built-in presets cost (see Choosing a policy for measured figures):

  * ``"full"`` (alias ``"nothing_saveable"``), :class:`SaveNothing`: saves
    only the inputs; recomputes the whole forward, matmuls included.
  * ``"no_remat"`` (``"everything_saveable"``), :class:`SaveEverything`: saves
    every intermediate; recomputes nothing.
  * ``"save_dots"`` (``"dots_saveable"``), :class:`SaveDots`: saves every
    matmul and convolution output; recomputes the elementwise ops between
    them (cheap); memory grows with the number of matmuls.
  * ``"save_dots_no_batch"`` (``"dots_with_no_batch_dims_saveable"``,
    ``"minimal"``): saves the matmuls without batch dimensions (projections);
    also recomputes batched matmuls (attention scores) and convolutions.
  * ``"save_qkv"``, ``"save_attn_out"``, ``"save_qkv_attn_out"``,
    ``"save_attn_probs"``, ``"save_mlp_hidden"``, ``"save_block_io"``
    (``attn_out`` and ``mlp_out``), :class:`SaveNames`: save only the values
    tagged with those names; recompute every untagged value from them.
  * ``"save_all_but_attn_probs"``, :class:`SaveAnythingExcept`: saves
    everything but the attention probabilities; recomputes only the op that
    makes them.
  * ``"offload_dots"``: as ``"save_dots_no_batch"``, with the matmul outputs
    in pinned host memory instead of on the device (a copy each way).
  * ``"offload_qkv"``, :class:`OffloadNames`: moves the value tagged ``qkv``
    to pinned host memory and keeps nothing else on the device; recomputes
    every other value.
  """
  return dict(_DESCRIPTIONS)


_T = "transformer names: qkv, attn_scores, attn_probs, attn_out, mlp_hidden, mlp_out"

for _name, _factory, _desc in [
    ("full", SaveNothing, "full remat: save only inputs, recompute everything"),
    ("nothing_saveable", SaveNothing, "alias of 'full'"),
    ("no_remat", SaveEverything, "no remat: save every intermediate"),
    ("everything_saveable", SaveEverything, "alias of 'no_remat'"),
    ("save_dots", lambda: SaveDots(False), "save matmul/conv outputs"),
    ("dots_saveable", lambda: SaveDots(False), "alias of 'save_dots'"),
    ("save_dots_no_batch", lambda: SaveDots(True),
     "save matmuls without batch dims (projections, not attention scores)"),
    ("dots_with_no_batch_dims_saveable", lambda: SaveDots(True), "alias of 'save_dots_no_batch'"),
    ("minimal", lambda: SaveDots(True), "MaxText's 'minimal': alias of 'save_dots_no_batch'"),
    ("save_qkv", lambda: SaveNames(("qkv",)), f"save the qkv projection ({_T})"),
    ("save_attn_out", lambda: SaveNames(("attn_out",)), "save the attention output"),
    ("save_qkv_attn_out", lambda: SaveNames(("qkv", "attn_out")),
     "save qkv and attention output"),
    ("save_attn_probs", lambda: SaveNames(("attn_probs",)), "save the attention probabilities"),
    ("save_mlp_hidden", lambda: SaveNames(("mlp_hidden",)), "save the MLP hidden activation"),
    ("save_block_io", lambda: SaveNames(("attn_out", "mlp_out")),
     "save the attention and MLP outputs"),
    ("save_all_but_attn_probs", lambda: SaveAnythingExcept(("attn_probs",)),
     "save everything except the attention probabilities"),
    ("offload_dots", lambda: Offload(SaveDots(True)),
     "offload matmuls without batch dims to pinned host memory"),
    ("offload_qkv", lambda: OffloadNames(("qkv",)), "offload qkv to pinned host memory"),
]:
  register(_name, _factory, _desc)

_PREFIXES: dict[str, Callable[[tuple[str, ...]], Policy]] = {
    "save": lambda ns: SaveNames(ns),
    "offload": lambda ns: OffloadNames(ns),
    "except": lambda ns: SaveAnythingExcept(ns),
    "names_but": lambda ns: SaveAnyNamesBut(ns),
    "prims": lambda ns: SavePrimitives(ns),
}


def _choices() -> str:
  presets = ", ".join(repr(n) for n in sorted(_REGISTRY))
  prefixes = ", ".join(f"'{p}:<name>,...'" for p in _PREFIXES)
  return (f"presets: {presets}; forms: {prefixes}; combine with '|' (union) or "
          "'&' (intersection); a bool; None; a dict of name -> "
          "'save'|'offload'|'recompute'; or a Policy")


def _from_string(s: str) -> Policy:
  text = s.strip()
  if "|" in text:
    parts = [_from_string(t) for t in text.split("|")]
    _check_no_conflict(s, parts)
    return save_from_all_policies(*parts)
  if "&" in text:
    return save_if_all_policies_save(*[_from_string(t) for t in text.split("&")])
  if ":" in text:
    prefix, _, rest = text.partition(":")
    prefix = prefix.strip()
    names = tuple(n.strip() for n in rest.split(",") if n.strip())
    if prefix not in _PREFIXES:
      raise ValueError(
          f"`from_config`: unknown prefix {prefix!r} in {s!r}. Valid: {_choices()}.")
    if not names:
      raise ValueError(f"`from_config`: {s!r} names no tensors after '{prefix}:'.")
    return _PREFIXES[prefix](names)
  if text in _REGISTRY:
    return _REGISTRY[text]()
  if text.lower() == "none":
    raise ValueError(
        f"`from_config`: {s!r} is ambiguous (`None` means full remat, as in "
        "`jax.checkpoint`). Write 'no_remat' (or False) to save everything, or 'full' "
        "(or None, True) to save nothing.")
  close = difflib.get_close_matches(text.lower(), list(_REGISTRY), n=3)
  hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
  raise ValueError(f"`from_config`: unknown policy {s!r}.{hint} Valid: {_choices()}.")


def _check_no_conflict(s: str, parts: list[Policy]) -> None:
  """A name both saved and offloaded in one union is an error, as in the dict form."""
  saved = {n for p in parts if isinstance(p, (SaveNames, SaveOrOffloadNames))
           for n in (p.names if isinstance(p, SaveNames) else p.save)}
  offloaded = {n for p in parts if isinstance(p, (OffloadNames, SaveOrOffloadNames))
               for n in (p.names if isinstance(p, OffloadNames) else p.offload)}
  both = sorted(saved & offloaded)
  if both:
    raise ValueError(f"`from_config`: {both} both saved and offloaded in {s!r}; keep each "
                     "name in one of 'save:' or 'offload:'.")


def _from_dict(d: Mapping[Any, Any]) -> Policy:
  save: list[str] = []
  off: list[str] = []
  rec: list[str] = []
  default = "recompute"
  for k, v in d.items():
    if not isinstance(k, str):
      raise TypeError(f"`from_config`: dict keys must be tensor names (str), got {k!r}.")
    if v not in _ACTIONS:
      raise ValueError(
          f"`from_config`: {k!r} maps to {v!r}; each value must be one of "
          f"{list(_ACTIONS)}.")
    if k == "*":
      default = v
      continue
    {"save": save, "offload": off, "recompute": rec}[v].append(k)
  if default == "recompute":
    return SaveOrOffloadNames(tuple(save), tuple(off))
  if default == "save":
    if not rec and not off:
      return SaveEverything()
    p: Policy = SaveAnythingExcept(tuple(rec + off))
    return Union((p, OffloadNames(tuple(off)))) if off else p
  raise ValueError(
      "`from_config`: '*': 'offload' would offload every intermediate; name the "
      "tensors to offload instead, with '*': 'recompute' or 'save'.")


def from_config(value: Any) -> Policy:
  """Builds a policy from a config value.

  Args:
    value: one of
      * a :class:`Policy` (returned as is), or one of JAX's policy functions
        and classes (translated);
      * ``True`` or ``None``: full remat; ``False``: no remat;
      * a preset name (see :func:`registered`), a form such as
        ``"save:qkv,attn_out"``, ``"offload:mlp_hidden"``, ``"except:attn_probs"``,
        ``"prims:dot_general,exp"``, or any of these joined with ``|`` / ``&``;
      * a dict mapping tensor names to ``"save"``, ``"offload"`` or
        ``"recompute"``, with ``"*"`` for everything else.

  Returns:
    A hashable policy, valid for ``jax.checkpoint``.

  Raises:
    ValueError: for an unknown string or action; the message lists the choices.
    TypeError: for a value of an unsupported type.

  Example:
    >>> from remat_kit.policies import from_config
    >>> from_config({"attn_out": "save", "mlp_hidden": "offload", "*": "recompute"})
    SaveOrOffloadNames(save=('attn_out',), offload=('mlp_hidden',), src='device', dst='pinned_host')
    >>> from_config("save_dots_no_batch | save:qkv")
    Union(policies=(SaveDots(no_batch_dims=True), SaveNames(names=('qkv',))))
  """
  if isinstance(value, Policy):
    return value
  if value is None or value is True:
    return SaveNothing()
  if value is False:
    return SaveEverything()
  if isinstance(value, str):
    return _from_string(value)
  if isinstance(value, Mapping):
    return _from_dict(value)
  if isinstance(value, type):
    raise TypeError(f"`from_config`: got the class {value.__name__}; pass an instance, "
                    f"e.g. {value.__name__}(...), or a config string.")
  jax_policy = _from_jax_policy(value)
  if jax_policy is not None:
    return jax_policy
  if callable(value):
    try:
      hash(value)
    except TypeError:
      raise TypeError(
          f"`from_config`: callable policy {value!r} is not hashable; jit caches "
          "by policy, so define it as a module-level function or frozen dataclass."
      ) from None
    return CallablePolicy(value)
  raise TypeError(f"`from_config`: cannot build a policy from {value!r}. Valid: {_choices()}.")


_UNCALLED = (factories.everything_saveable, factories.nothing_saveable,
             factories.dots_saveable, factories.dots_with_no_batch_dims_saveable)


def _from_jax_policy(value: Any) -> Policy | None:
  """Translates JAX's own policy objects, so they behave under remat3 too."""
  if value is _jax.everything_saveable:
    return SaveEverything()
  if value is _jax.nothing_saveable:
    return SaveNothing()
  if value is _jax.dots_saveable:
    return SaveDots(False)
  if value is _jax.dots_with_no_batch_dims_saveable:
    return SaveDots(True)
  kind = _jax.closure_policy_kind(value)
  if kind == "save_only_these_names":
    return SaveNames(tuple(_jax.jax_policy_names(value)))
  if kind == "save_any_names_but_these":
    return SaveAnyNamesBut(tuple(_jax.jax_policy_names(value)))
  if kind == "save_and_offload_only_these_names":
    v = _jax.closure_vars(value)
    return factories.save_and_offload_only_these_names(
        names_which_can_be_saved=v["names_which_can_be_saved"],
        names_which_can_be_offloaded=v["names_which_can_be_offloaded"],
        offload_src=v["offload_src"], offload_dst=v["offload_dst"])
  if kind == "offload_dot_with_no_batch_dims":
    v = _jax.closure_vars(value)
    return factories.offload_dot_with_no_batch_dims(v["offload_src"], v["offload_dst"])
  if any(value is f for f in _UNCALLED):  # our zero-argument factories, passed uncalled
    return value()
  if _jax.JaxDotsSaveable is not None and isinstance(value, _jax.JaxDotsSaveable):
    return SaveDots(value.only_if_no_batch_dims)
  if _jax.JaxSaveOnlyTheseNames is not None and isinstance(value, _jax.JaxSaveOnlyTheseNames):
    return SaveNames(tuple(value.saveable_names))
  if (_jax.JaxSaveAndOffloadOnlyTheseNames is not None
      and isinstance(value, _jax.JaxSaveAndOffloadOnlyTheseNames)):
    return factories.save_and_offload_only_these_names(
        names_which_can_be_saved=value.names_which_can_be_saved,
        names_which_can_be_offloaded=value.names_which_can_be_offloaded,
        offload_src=value.offload_src, offload_dst=value.offload_dst)
  if (_jax.JaxOffloadDotWithNoBatchDims is not None
      and isinstance(value, _jax.JaxOffloadDotWithNoBatchDims)):
    return factories.offload_dot_with_no_batch_dims(value.offload_src, value.offload_dst)
  if _jax.JaxSaveAnyNamesButThese is not None and isinstance(value, _jax.JaxSaveAnyNamesButThese):
    return SaveAnyNamesBut(tuple(value.names))
  return None

