"""Leaf policies (what to save, by name, primitive or size) and JAX-named factories.

Each policy is a frozen, hashable dataclass with a readable ``repr``; each
says what it saves and what it costs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from remat_kit import _jax, _jaxpr
from remat_kit.policies.base import DEFAULT_OFFLOAD_DST, DEFAULT_OFFLOAD_SRC, Policy, names_arg

__all__ = [
    "CallablePolicy",
    "SaveOrOffloadNames",
    "OffloadNames",
    "SaveAnyNamesBut",
    "SaveAnythingExcept",
    "SaveBySize",
    "SaveDots",
    "SaveEverything",
    "SaveNames",
    "SaveNothing",
    "SavePrimitives",
]


@dataclasses.dataclass(frozen=True)
class SaveEverything(Policy):
  """Saves every intermediate: the same memory and compute as no remat.

  Saves: every value the backward pass reads. Recomputes: nothing (see
  Choosing a policy for how the presets compare).
  """

  def decide(self, prim, avals, params):
    return _jax.Saveable


@dataclasses.dataclass(frozen=True)
class SaveNothing(Policy):
  """Full remat: saves only the inputs; the backward pass reruns the forward.

  Memory: the function's inputs only. Compute: one extra forward pass.

  Saves: nothing but the checkpoint's inputs. Recomputes: the whole forward
  of the checkpointed function, matmuls included: the least memory for the
  most FLOPs.
  """

  def saving_primitives(self):
    return frozenset()

  def decide(self, prim, avals, params):
    return _jax.Recompute


def _is_dot(prim: Any, avals: tuple[Any, ...], params: dict[str, Any],
            no_batch_dims: bool) -> bool:
  """Whether JAX's ``dots_saveable`` (``dots_with_no_batch_dims_saveable``) saves this
  output: the same primitives, cuDNN's ``scaled_matmul_wrapper`` included."""
  name = getattr(prim, "name", "")
  if name == "dot_general":
    if not no_batch_dims:
      return True
    lhs_b, rhs_b = _jaxpr.dot_batch_dims(params)
    return not lhs_b and not rhs_b
  if name == "scaled_matmul_wrapper":
    return not no_batch_dims or (bool(avals) and getattr(avals[0], "shape", (0,))[:1] == (1,))
  return name == "conv_general_dilated" and not no_batch_dims


@dataclasses.dataclass(frozen=True)
class SaveDots(Policy):
  """Saves the outputs of matrix multiplies (and convolutions).

  Everything elementwise (activations, norms, dropout masks) is recomputed.
  Memory: one tensor per matmul. Compute: the cheap, memory-bound ops again.

  Saves: every ``dot_general`` and convolution output (with ``no_batch_dims``:
  only unbatched ``dot_general``s). Recomputes: the elementwise ops between
  them (cheap); with ``no_batch_dims`` also batched matmuls such as
  attention's ``q @ k`` and convolutions, for less memory. Memory grows with
  the number and size of the matmuls kept.

  Attributes:
    no_batch_dims: if True, save only `dot_general`s without batch dimensions
      (projections, not attention's batched ``q @ k``), and no convolutions.
  """

  no_batch_dims: bool = False

  def saving_primitives(self):
    return frozenset({"dot_general"} if self.no_batch_dims
                     else {"dot_general", "conv_general_dilated"})

  def decide(self, prim, avals, params):
    return _jax.Saveable if _is_dot(prim, avals, params, self.no_batch_dims) else _jax.Recompute

  def referenced_primitives(self):
    return frozenset({"dot_general"})


@dataclasses.dataclass(frozen=True)
class _ByName(Policy):
  """A policy that decides at `checkpoint_name` tags alone: a tagged value is saved when
  ``_keeps(name)``; untagged values are recomputed."""

  names: tuple[str, ...]

  def __post_init__(self):
    object.__setattr__(self, "names",
                       names_arg(self.names, f"{type(self).__name__}(names=...)"))

  def _keeps(self, name: str) -> bool:
    raise NotImplementedError

  def saving_primitives(self):
    return frozenset({_jax.name_primitive_name()})

  def decide(self, prim, avals, params):
    n = _jax.checkpoint_name_of(prim, params)
    return _jax.Saveable if n is not None and self._keeps(n) else _jax.Recompute

  def own_names(self):
    return frozenset(self.names)


@dataclasses.dataclass(frozen=True)
class SaveNames(_ByName):
  """Saves the values tagged with these `checkpoint_name`s; recomputes the rest.

  Saves: only the values tagged with ``names`` (plus the checkpoint's inputs).
  Recomputes: every untagged value the backward pass needs, from the saved
  ones; memory is the named tensors' bytes, and the more work lies between
  the tags, the more FLOPs the backward pass repeats.

  Attributes:
    names: the `checkpoint_name` tags to save.

  Raises:
    TypeError: if ``names`` is not a str or a sequence of non-empty strs.
  """

  def _keeps(self, name: str) -> bool:
    return name in self.names


@dataclasses.dataclass(frozen=True)
class OffloadNames(Policy):
  """Moves the values with these names to host memory; recomputes the rest.

  Memory: device memory as full remat for these tensors, host memory for
  them instead. Compute: a device-to-host copy forward and back.

  Saves: nothing on the device; the tagged values go to ``dst`` memory.
  Recomputes: every untagged value, as :class:`SaveNames` does; the named
  tensors cost host memory and a copy each way over the host link instead of
  device memory (where the target has a host memory space).

  Attributes:
    names: the `checkpoint_name` tags to offload.
    src: memory kind the values live in (``"device"``).
    dst: memory kind to offload to (``"pinned_host"``).

  Raises:
    TypeError: if ``names`` is not a str or a sequence of non-empty strs.
  """

  names: tuple[str, ...]
  src: str = DEFAULT_OFFLOAD_SRC
  dst: str = DEFAULT_OFFLOAD_DST

  def __post_init__(self):
    object.__setattr__(self, "names", names_arg(self.names, "OffloadNames(names=...)"))

  def saving_primitives(self):
    return frozenset({_jax.name_primitive_name()})

  def decide(self, prim, avals, params):
    n = _jax.checkpoint_name_of(prim, params)
    if n is not None and n in self.names:
      return _jax.Offloadable(src=self.src, dst=self.dst)
    return _jax.Recompute

  @property
  def offloads(self) -> bool:
    return True

  def own_names(self):
    return frozenset(self.names)


@dataclasses.dataclass(frozen=True)
class SaveOrOffloadNames(Policy):
  """A per-name plan: save some names, offload others, recompute the rest.

  Built from a dict by :func:`from_config`, e.g.
  ``{"attn_out": "save", "mlp_hidden": "offload", "*": "recompute"}``.

  Saves: the ``save`` names on the device, the ``offload`` names in ``dst``
  memory. Recomputes: every other value, untagged ones included; device
  memory is the saved names' bytes, and each offloaded name costs a copy each
  way over the host link.

  Attributes:
    save: names to keep on device.
    offload: names to move to host memory.
    src: memory kind of offloaded values.
    dst: memory kind to offload to.

  Raises:
    ValueError: if a name is both in ``save`` and in ``offload``.
    TypeError: if ``save`` or ``offload`` is not a str or a sequence of
      non-empty strs.
  """

  save: tuple[str, ...] = ()
  offload: tuple[str, ...] = ()
  src: str = DEFAULT_OFFLOAD_SRC
  dst: str = DEFAULT_OFFLOAD_DST

  def __post_init__(self):
    save = names_arg(self.save, "SaveOrOffloadNames(save=...)")
    off = names_arg(self.offload, "SaveOrOffloadNames(offload=...)")
    both = sorted(set(save) & set(off))
    if both:
      raise ValueError(
          f"`SaveOrOffloadNames`: names {both} are both saved and offloaded. Give each "
          "name one action: 'save', 'offload' or 'recompute'.")
    object.__setattr__(self, "save", save)
    object.__setattr__(self, "offload", off)

  def saving_primitives(self):
    return frozenset({_jax.name_primitive_name()})

  def decide(self, prim, avals, params):
    n = _jax.checkpoint_name_of(prim, params)
    if n is None:
      return _jax.Recompute
    if n in self.save:
      return _jax.Saveable
    if n in self.offload:
      return _jax.Offloadable(src=self.src, dst=self.dst)
    return _jax.Recompute

  @property
  def offloads(self) -> bool:
    return bool(self.offload)

  def own_names(self):
    return frozenset(self.save) | frozenset(self.offload)


@dataclasses.dataclass(frozen=True)
class SaveAnyNamesBut(_ByName):
  """Saves every named value except these names; recomputes unnamed values.

  Saves: every tagged value whose name is not in ``names``. Recomputes: the
  untagged values and the excluded names' values; cost as :class:`SaveNames`
  with every other tag listed.

  Attributes:
    names: the `checkpoint_name` tags not to save.

  Raises:
    TypeError: if ``names`` is not a str or a sequence of non-empty strs.
  """

  def _keeps(self, name: str) -> bool:
    return name not in self.names


@dataclasses.dataclass(frozen=True)
class SaveAnythingExcept(Policy):
  """Saves everything except the values with these names.

  JAX's ``save_anything_except_these_names`` saves everything: refusing to
  save a named value only makes JAX save the unnamed value just before the
  tag, the same tensor. This policy really drops them: under
  :func:`remat_kit.remat`, the operation that produces each excluded value is
  recomputed from its own inputs on the backward pass.

  Handed straight to ``jax.checkpoint`` it can only refuse the tag itself, as
  JAX's does; apply it with :func:`remat_kit.remat`, which finds each excluded
  tensor's producer at trace time (``producers``). A producer is recognised by
  its primitive and input shapes, so an identical op elsewhere in the function
  is recomputed too: more compute, never more memory than promised.

  Memory: as no remat, less the excluded tensors (plus the producer's inputs
  where nothing else keeps them). Compute: one op per excluded tensor.

  Saves: every value except those tagged with ``names`` and, under
  :func:`remat_kit.remat`, the outputs of their producers. Recomputes: only
  those producers (and ops identical to them): a few FLOPs for the memory of
  the excluded tensors.

  Attributes:
    names: the `checkpoint_name` tags not to save.
    producers: ``(primitive name, input shapes and dtypes)`` signatures of the ops that
      produce the excluded tensors, filled in by :func:`remat_kit.remat` at
      trace time (empty: only the tags themselves are refused).

  Raises:
    TypeError: if ``names`` is not a str or a sequence of non-empty strs.
  """

  names: tuple[str, ...]
  producers: frozenset[tuple[Any, ...]] = dataclasses.field(default=frozenset(), repr=False)

  def __post_init__(self):
    object.__setattr__(self, "names", names_arg(self.names, "SaveAnythingExcept(names=...)"))
    object.__setattr__(self, "producers", frozenset(self.producers))

  def decide(self, prim, avals, params):
    n = _jax.checkpoint_name_of(prim, params)
    if n is not None:
      return _jax.Recompute if n in self.names else _jax.Saveable
    if self.producers:
      sig = (prim.name, tuple(_jax.aval_key(a) for a in avals))
      if sig in self.producers:
        return _jax.Recompute
    return _jax.Saveable

  def own_names(self):
    return frozenset(self.names)

  def excluded_names(self):
    return frozenset(self.names)

  def with_producers(self, producers):
    return dataclasses.replace(self, producers=frozenset(producers))


@dataclasses.dataclass(frozen=True)
class SavePrimitives(Policy):
  """Saves the outputs of the named primitives, e.g. ``("dot_general", "exp")``.

  Saves: every output of the listed primitives, whatever its shape.
  Recomputes: every other op's output; ``("dot_general",)`` saves what
  :class:`SaveDots` saves but the convolutions.

  Attributes:
    primitives: the primitive names (``jax.core.Primitive.name``) to save.

  Raises:
    TypeError: if ``primitives`` is not a str or a sequence of non-empty strs.
  """

  primitives: tuple[str, ...]

  def __post_init__(self):
    object.__setattr__(
        self, "primitives", names_arg(self.primitives, "SavePrimitives(primitives=...)"))

  def saving_primitives(self):
    return frozenset(self.primitives)

  def decide(self, prim, avals, params):
    return _jax.Saveable if getattr(prim, "name", None) in self.primitives else _jax.Recompute

  def referenced_primitives(self):
    return frozenset(self.primitives)


def _out_bytes(prim: Any, avals: tuple[Any, ...], params: dict[str, Any]) -> int:
  """Bytes of an equation's outputs, from the primitive's abstract evaluation."""
  out = prim.abstract_eval(*avals, **params)
  if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], (set, frozenset)):
    out = out[0]  # (avals, effects)
  outs = out if isinstance(out, (list, tuple)) else [out]
  total = 0
  for a in outs:
    shape = getattr(a, "shape", None)
    dtype = getattr(a, "dtype", None)
    if shape is None or dtype is None:
      continue
    total += math.prod(shape) * np.dtype(dtype).itemsize
  return total


@dataclasses.dataclass(frozen=True)
class SaveBySize(Policy):
  """Saves every op output whose size in bytes lies in ``[min_bytes, max_bytes]``.

  Small tensors (per-token statistics, norms) are cheap to keep and can be
  expensive to recompute through; large ones are where remat pays. Combine
  with ``&``, e.g. ``dots_saveable() & save_by_size(max_bytes=2**20)``.

  Saves: every op output whose size is in the range, whatever the op (a
  `checkpoint_name` tag itself is never saved; the value it tags is judged).
  Recomputes: the outputs outside the range (and those it cannot size); with
  the defaults (``0``, None) it saves every output, as no remat.
  ``max_bytes`` bounds each tensor, not the total.

  Attributes:
    min_bytes: smallest output to save.
    max_bytes: largest output to save; None for no limit.

  Raises:
    ValueError: if a bound is not an int >= 0, or ``max_bytes`` is below
      ``min_bytes``.
  """

  min_bytes: int = 0
  max_bytes: int | None = None

  def __post_init__(self):
    for field in ("min_bytes", "max_bytes"):
      v = getattr(self, field)
      if v is None and field == "max_bytes":
        continue
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"`SaveBySize`: `{field}` must be an int >= 0, got {v!r}.")
    if self.max_bytes is not None and self.max_bytes < self.min_bytes:
      raise ValueError(
          f"`SaveBySize`: `max_bytes`={self.max_bytes} is below "
          f"`min_bytes`={self.min_bytes}; swap them.")

  def decide(self, prim, avals, params):
    if _jax.checkpoint_name_of(prim, params) is not None:
      return _jax.Recompute  # the tag's input is judged instead
    try:
      n = _out_bytes(prim, avals, params)
    except Exception:  # noqa: BLE001 - a primitive we cannot size is not saved
      return _jax.Recompute
    if n < self.min_bytes or (self.max_bytes is not None and n > self.max_bytes):
      return _jax.Recompute
    return _jax.Saveable


@dataclasses.dataclass(frozen=True)
class CallablePolicy(Policy):
  """Wraps a plain ``policy(prim, *avals, **params)`` function.

  `jax_remat3` ignores plain callables; wrapped, it still applies (through
  JAX's classic remat). The function must be hashable (a module-level def).

  Saves and recomputes whatever ``fn`` decides: its cost is the function's.

  Attributes:
    fn: the policy function, called as ``jax.checkpoint`` calls a policy; it
      returns a bool (True: save) or JAX's ``Offloadable``.
  """

  fn: Callable[..., Any]

  def decide(self, prim, avals, params):
    return _jax.ensure_decision(self.fn(prim, *avals, **params))

  @property
  def offloads(self) -> bool:
    """Unknown for a plain function: True where it comes from JAX's offload factories
    (``offload_dot_with_no_batch_dims``, ``save_and_offload_only_these_names``)."""
    return "offload" in getattr(self.fn, "__qualname__", "")
