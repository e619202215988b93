"""NNX support for `remat_policy`: methods rematerialized with ``nnx.remat``.

The class keeps its name and attributes, so parameters and the ``nnx.Rngs``
streams that drive dropout are those of the undecorated class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from remat_kit import _args, _jaxpr
from remat_kit.flax._methods import missing_tags_error, wrap_method
from remat_kit.policies import Policy
from remat_kit.transforms import remat_scan

__all__ = ["LayerStack", "stack_layers", "unstack_layers", "wrap_nnx_method"]


def wrap_nnx_method(cls: type, method: str, pol: Policy, static_argnames: tuple[str, ...],
                    prevent_cse: bool, check_names: bool) -> Callable[..., Any]:
  """``cls.method`` run under ``nnx.remat`` with ``pol``."""
  return wrap_method(cls, method, pol, static_argnames, prevent_cse, check_names,
                     transform=nnx.remat, check=check_tags)


def check_tags(self: Any, call_orig: Callable[..., Any], full: list[Any], statics: tuple[int, ...],
           pol: Policy, checked: set[Any], cls: type, method: str) -> None:
  dyn = [i for i in range(1, len(full)) if i not in statics]
  key = (call_orig, tuple((i, full[i]) for i in statics),
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


class LayerStack(nnx.Module):
  """NNX: ``length`` copies of a block, created stacked and scanned with remat.

  The layers are built with ``nnx.vmap`` over ``nnx.split_rngs``, so each
  layer has its own parameters and its own dropout key, and live stacked
  (layer index leading) in ``self.layers``. Calling the stack scans over them
  with :func:`remat_kit.remat_scan`: flat, or nested for sqrt(L) memory.
  :meth:`unrolled` runs the same layers in a Python loop without remat (the
  reference), and :func:`unstack_layers` / :func:`stack_layers` convert
  between the stacked module and a list of per-layer modules.

  Args:
    make_block: ``rngs -> Module``, one layer mapping the carry to a carry of
      the same shape.
    length: the number of layers.
    rngs: the RNGs; every stream is split per layer.
    policy: the remat policy inside each layer; ``False`` for no remat.
    levels: None (flat), an int number of nested levels, or level lengths.
    layer_axis: the logical name of the layers' leading axis in sharding
      metadata (``nnx.with_partitioning``), as ``nnx.vmap``'s
      ``transform_metadata`` adds it: ``"layers"`` by default, ``None`` for an
      axis that is never sharded.

  Every variable a layer updates while it runs (``BatchStat``, RNG counters,
  custom ``nnx.Variable`` types) is written back to the stack, as the
  unrolled layers would leave it; only ``nnx.Param`` is read-only.
  """

  def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], length: int, *,
               rngs: nnx.Rngs, policy: Any = True, levels: Any = None,
               layer_axis: str | None = "layers") -> None:
    if not callable(make_block) or isinstance(make_block, nnx.Module):
      raise TypeError(
          f"`LayerStack`: `make_block` must be a function `rngs -> Module`, got "
          f"{make_block!r}. Pass e.g. `lambda rngs: Block(64, rngs=rngs)`.")
    _args.int_at_least("LayerStack", "length", length, 1)
    if layer_axis is not None and not isinstance(layer_axis, str):
      raise TypeError(
          f"`LayerStack`: `layer_axis` must be a str (the logical name of the layer axis) "
          f"or None, got {layer_axis!r}.")
    meta = {nnx.PARTITION_NAME: layer_axis}

    @nnx.split_rngs(splits=length)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=length, transform_metadata=meta)
    def create(r: nnx.Rngs) -> nnx.Module:
      return make_block(r)

    self.layers = create(rngs)
    self.length = length
    self.policy = policy
    self.levels = levels
    self.layer_axis = layer_axis

  def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Scans the layers over carry ``x``; ``args``/``kwargs`` go to every layer."""
    graphdef, state = nnx.split(self.layers)
    meta = {nnx.PARTITION_NAME: self.layer_axis}

    def body(h: Any, st: Any) -> tuple[Any, Any]:
      layer = nnx.merge(graphdef, nnx.spmd.remove_axis(st, 0, meta))
      h = layer(h, *args, **kwargs)
      return h, nnx.state(layer, nnx.Not(nnx.Param))

    x, updated = remat_scan(body, x, state, policy=self.policy, levels=self.levels)
    # Batch statistics, dropout counters, custom variables: as the unrolled layers leave them.
    nnx.update(self.layers, nnx.spmd.add_axis(updated, 0, meta))
    return x

  def unrolled(self, x: Any, *args: Any, **kwargs: Any) -> Any:
    """The same layers in a Python loop, without remat: the reference."""
    layers = unstack_layers(self.layers, self.length, layer_axis=self.layer_axis)
    for layer in layers:
      x = layer(x, *args, **kwargs)
    self.layers = stack_layers(layers, layer_axis=self.layer_axis)
    return x


def unstack_layers(stacked: nnx.Module, length: int | None = None, *,
                   layer_axis: str | None = "layers") -> list[nnx.Module]:
  """A stacked module (leading layer axis) as a list of per-layer modules.

  Sharding metadata loses the leading ``layer_axis`` name with the axis. The same
  operation as the Linen :func:`remat_kit.flax.unstack_layers` on this API's form of
  a stack (a module, not a parameter dict).

  Args:
    stacked: a module whose every array has the layer count as leading axis.
    length: the layer count, checked against the arrays; None reads it from them.
    layer_axis: the leading axis's name in sharding metadata.

  Raises:
    ValueError: if the module has no arrays or their leading axes differ (or are
      not ``length``).
  """
  graphdef, state = nnx.split(stacked)
  leaves = jax.tree_util.tree_leaves(state)
  if length is None and leaves and leaves[0].shape:
    length = leaves[0].shape[0]
  if not leaves or any(a.shape[:1] != (length,) for a in leaves):
    raise ValueError(
        f"`unstack_layers`: every array of the stacked module must have leading axis "
        f"{length}; got shapes {sorted({a.shape for a in leaves})}.")
  assert length is not None
  meta = {nnx.PARTITION_NAME: layer_axis}
  return [nnx.merge(graphdef, nnx.spmd.remove_axis(
      jax.tree_util.tree_map(lambda a, i=i: a[i], state), 0, meta)) for i in range(length)]


def stack_layers(layers: list[nnx.Module], *, layer_axis: str | None = "layers") -> nnx.Module:
  """The inverse of :func:`unstack_layers`: per-layer modules stacked into one.

  Sharding metadata gains the leading ``layer_axis`` name.
  """
  if not layers:
    raise ValueError("`stack_layers`: `layers` is empty.")
  splits = [nnx.split(m) for m in layers]
  graphdef = splits[0][0]
  if any(g != graphdef for g, _ in splits[1:]):
    raise ValueError("`stack_layers`: the layers differ in structure.")
  stacked = jax.tree_util.tree_map(lambda *a: jax.numpy.stack(a), *[s for _, s in splits])
  return nnx.merge(graphdef, nnx.spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: layer_axis}))
