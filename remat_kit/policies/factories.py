"""JAX's ``jax.checkpoint_policies`` factories, returning remat_kit policies.

The same names and arguments as JAX's (``save_only_these_names("x")``,
``save_and_offload_only_these_names(names_which_can_be_saved=...)``,
``offload_dot_with_no_batch_dims("device", "pinned_host")``, ...), so that code
written for ``jax.checkpoint`` reads the same; each returns a hashable policy of
:mod:`~remat_kit.policies.library`, which saves what JAX's own saves.

JAX's policy *values* (``jax.checkpoint_policies.dots_saveable``,
``checkpoint_dots``, ``everything_saveable``, ...) are plain policies there;
here ``checkpoint_dots`` and ``checkpoint_dots_with_no_batch_dims`` are values
too, and the zero-argument factories (``dots_saveable``, ``nothing_saveable``,
...) may be passed uncalled, as JAX code passes them: :func:`remat_kit.remat`
and :func:`~remat_kit.policies.from_config` call them.
"""

from __future__ import annotations

from collections.abc import Iterable

from remat_kit.policies.base import DEFAULT_OFFLOAD_DST, DEFAULT_OFFLOAD_SRC, Offload
from remat_kit.policies.library import (
  OffloadNames,
  SaveAnyNamesBut,
  SaveAnythingExcept,
  SaveBySize,
  SaveDots,
  SaveEverything,
  SaveNames,
  SaveNothing,
  SaveOrOffloadNames,
  SavePrimitives,
)

__all__ = [
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
    "nothing_saveable",
    "offload_dot_with_no_batch_dims",
    "offload_these_names",
    "save_any_names_but_these",
    "save_and_offload_only_these_names",
    "save_anything_except_these_names",
    "save_by_size",
    "save_only_these_names",
    "save_these_primitives",
]


def everything_saveable() -> SaveEverything:
  """Save everything: no remat.

  Returns:
    :class:`SaveEverything`: saves every value, recomputes nothing.
  """
  return SaveEverything()


def nothing_saveable() -> SaveNothing:
  """Save nothing: full remat.

  Returns:
    :class:`SaveNothing`: saves only the inputs, recomputes the whole forward.
  """
  return SaveNothing()


def dots_saveable() -> SaveDots:
  """Save matmul and convolution outputs; recompute the rest.

  Returns:
    :class:`SaveDots`: memory grows with the matmuls kept; the backward pass
    recomputes only the elementwise ops between them.
  """
  return SaveDots(no_batch_dims=False)


def dots_with_no_batch_dims_saveable() -> SaveDots:
  """Save matmuls without batch dimensions (projections); recompute the rest.

  Returns:
    ``SaveDots(no_batch_dims=True)``: less memory than :func:`dots_saveable`,
    for recomputing batched matmuls (attention scores) and convolutions too.
  """
  return SaveDots(no_batch_dims=True)


# JAX's aliases, values as in `jax.checkpoint_policies` (not factories).
checkpoint_dots: SaveDots = SaveDots(no_batch_dims=False)
"""JAX's ``checkpoint_dots``: the policy :func:`dots_saveable` returns (a value)."""
checkpoint_dots_with_no_batch_dims: SaveDots = SaveDots(no_batch_dims=True)
"""JAX's ``checkpoint_dots_with_no_batch_dims``: the policy
:func:`dots_with_no_batch_dims_saveable` returns (a value)."""


def offload_dot_with_no_batch_dims(offload_src: str, offload_dst: str) -> Offload:
  """JAX's ``offload_dot_with_no_batch_dims``: offload unbatched matmul outputs.

  What :func:`dots_with_no_batch_dims_saveable` saves goes to ``offload_dst``
  memory instead; everything else is recomputed.

  Args:
    offload_src: the memory kind the values live in (``"device"``).
    offload_dst: the memory kind to offload to (``"pinned_host"``).

  Returns:
    ``Offload(SaveDots(no_batch_dims=True), offload_src, offload_dst)``:
    device memory as full remat for those tensors, host memory and a copy
    each way over the host link instead.
  """
  return Offload(SaveDots(no_batch_dims=True), offload_src, offload_dst)


def save_and_offload_only_these_names(
    *, names_which_can_be_saved: Iterable[str], names_which_can_be_offloaded: Iterable[str],
    offload_src: str, offload_dst: str) -> SaveOrOffloadNames:
  """JAX's ``save_and_offload_only_these_names``: save some names, offload others.

  Args:
    names_which_can_be_saved: `checkpoint_name` tags kept on the device.
    names_which_can_be_offloaded: tags moved to ``offload_dst`` memory.
    offload_src: the memory kind the values live in (``"device"``).
    offload_dst: the memory kind to offload to (``"pinned_host"``).

  Returns:
    A :class:`SaveOrOffloadNames`; every untagged value and every other tag
    is recomputed.

  Raises:
    ValueError: if a name is in both sets (as JAX raises).
    TypeError: for a name that is not a non-empty str.
  """
  save = _names(names_which_can_be_saved, "names_which_can_be_saved")
  off = _names(names_which_can_be_offloaded, "names_which_can_be_offloaded")
  both = sorted(set(save) & set(off))
  if both:  # JAX's words first, so code that matches JAX's message keeps working
    raise ValueError(
        "`save_and_offload_only_these_names`: The names should be exclusive and should not "
        "intersect in `names_which_can_be_saved` and `names_which_can_be_offloaded`. Got "
        f"{both} in both: give each name one action, saved or offloaded.")
  return SaveOrOffloadNames(save, off, offload_src, offload_dst)


def _names(value: Iterable[str], arg: str) -> tuple[str, ...]:
  if isinstance(value, str):
    return (value,)
  try:
    return tuple(sorted(set(value)))
  except TypeError:
    raise TypeError(f"`save_and_offload_only_these_names`: `{arg}` must be an iterable of "
                    f"str names, got {value!r}.") from None


def save_only_these_names(*names: str) -> SaveNames:
  """Save only the values tagged with these names.

  Args:
    *names: the `checkpoint_name` tags to save (none: save nothing tagged).

  Returns:
    A :class:`SaveNames`.

  Raises:
    TypeError: for a name that is not a non-empty str.
  """
  return SaveNames(names)


def offload_these_names(*names: str, src: str = DEFAULT_OFFLOAD_SRC,
                        dst: str = DEFAULT_OFFLOAD_DST) -> OffloadNames:
  """Offload the values tagged with these names to host memory.

  Args:
    *names: the `checkpoint_name` tags to offload.
    src: the memory kind the values live in (``"device"`` by default).
    dst: the memory kind to offload to (``"pinned_host"`` by default).

  Returns:
    An :class:`OffloadNames` (raises as :func:`save_only_these_names` does).
  """
  return OffloadNames(names, src, dst)


def save_any_names_but_these(*names: str) -> SaveAnyNamesBut:
  """Save every named value except these names; recompute unnamed values.

  ``*names`` are the `checkpoint_name` tags not to save; returns a
  :class:`SaveAnyNamesBut`, and raises as :func:`save_only_these_names` does.
  """
  return SaveAnyNamesBut(names)


def save_anything_except_these_names(*names: str) -> SaveAnythingExcept:
  """Save everything except the values tagged with these names.

  Args:
    *names: the `checkpoint_name` tags not to save.

  Returns:
    A :class:`SaveAnythingExcept` (apply it with :func:`remat_kit.remat` for
    the excluded tensors to really be dropped).

  Raises:
    TypeError: for a name that is not a non-empty str.
  """
  return SaveAnythingExcept(names)


def save_these_primitives(*primitives: str) -> SavePrimitives:
  """Save the outputs of these primitives (by name, e.g. ``"dot_general"``).

  Args:
    *primitives: the primitive names to save.

  Returns:
    A :class:`SavePrimitives`.

  Raises:
    TypeError: for a primitive name that is not a non-empty str.
  """
  return SavePrimitives(primitives)


def save_by_size(*, min_bytes: int = 0, max_bytes: int | None = None) -> SaveBySize:
  """Save op outputs whose size in bytes lies in ``[min_bytes, max_bytes]``.

  Args:
    min_bytes: the smallest output to save (0: no lower bound).
    max_bytes: the largest output to save; None (the default) for no limit.

  Returns:
    A :class:`SaveBySize`.

  Raises:
    ValueError: if a bound is not an int >= 0, or ``max_bytes`` is below
      ``min_bytes``.
  """
  return SaveBySize(min_bytes, max_bytes)
