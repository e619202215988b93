"""Linen: the decorator's method wrapper, and `LayerStack` with stacked/unrolled params.

Scan over a stack of Linen layers with remat: `LayerStack`, and stacked/unrolled params.

``nn.scan(nn.remat(Block))`` renames modules, and nesting it for sqrt(L)
memory nests the parameter axes, so a checkpoint taken with one layout does
not load into another. `LayerStack` keeps one layout for every choice: the
stacked parameters live under ``"layers"`` with the layer index as leading
axis, whatever the grouping, and :func:`unstack_layers` turns them into the
``layers_0 ... layers_{L-1}`` tree of the unrolled stack (``scan=False``).

Each layer gets its own dropout key: the stack draws one key per stream and
splits it into one per layer, in scanned and unrolled form alike, so the
scanned stack with remat gives the gradients of the unrolled stack without.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from remat_kit import _args, _jaxpr
from remat_kit.flax._methods import missing_tags_error, wrap_method
from remat_kit.policies import Policy
from remat_kit.transforms import remat, remat_scan

__all__ = ["LayerStack", "add_layer_axis", "stack_layers", "unstack_layers",
           "wrap_linen_method"]


def wrap_linen_method(cls: type, method: str, pol: Policy, static_argnames: tuple[str, ...],
                      prevent_cse: bool, check_names: bool) -> Callable[..., Any]:
  """``cls.method`` run under ``nn.checkpoint`` with ``pol``."""
  return wrap_method(cls, method, pol, static_argnames, prevent_cse, check_names,
                     transform=nn.checkpoint, check=check_tags)


def check_tags(self: Any, call_orig: Callable[..., Any], full: list[Any],
                static_argnums: tuple[int, ...], pol: Policy, checked: set[Any],
                cls: type, method: str) -> None:
  """Raises if ``pol`` names a tag the method never makes (once per shapes)."""
  if self.is_initializing():
    return
  dyn = [(i, a) for i, a in enumerate(full) if i > 0 and i not in static_argnums]
  key = (call_orig, tuple((i, full[i]) for i in static_argnums),
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




class LayerStack(nn.Module):
  """``length`` copies of ``block``, scanned with remat (or unrolled, for reference).

  Memory: a flat scan keeps one carry per layer plus what ``policy`` saves
  inside each layer (grows like L). ``levels=d`` nests the scan d levels deep
  and fully rematerializes each group, so about ``d * L ** (1/d)`` carries
  are kept, for ``d - 1`` extra forward passes (see
  :func:`remat_kit.remat_scan`).

  Attributes:
    block: one layer, an unbound Linen module mapping the carry to a carry of
      the same shape. Its only variables must be ``params`` (use LayerNorm or
      GroupNorm, not BatchNorm).
    length: the number of layers.
    policy: the remat policy inside each layer (anything
      :func:`remat_kit.from_config` accepts); ``False`` for no remat.
    levels: None for a flat scan; an int d >= 2 for d nested levels; or a
      tuple of level lengths whose product is ``length``.
    scan: False runs the layers in a Python loop with parameters
      ``layers_0 ...``, each layer rematerialized under ``policy``; with
      ``policy=False`` this is the unrolled reference. ``levels`` needs a scan.
      (XLA:CPU undoes remat in Python loops; XLA:GPU keeps it.)
    rng_streams: RNG streams split per layer when present (``"dropout"``).
    layer_axis: the logical name of the stacked parameters' leading axis in
      partition metadata (``nn.with_logical_partitioning`` /
      ``nn.with_partitioning`` boxes), as ``nn.scan``'s ``metadata_params``
      adds it: ``"layers"`` by default, ``None`` for an axis that is never
      sharded. Parameters without partition metadata are unaffected.
  """

  block: nn.Module
  length: int
  policy: Any = True
  levels: int | tuple[int, ...] | None = None
  scan: bool = True
  rng_streams: tuple[str, ...] = ("dropout",)
  layer_axis: str | None = "layers"

  def _validate(self) -> None:
    if not isinstance(self.block, nn.Module):
      raise TypeError(
          f"`LayerStack`: `block` must be an (unbound) flax.linen.Module instance, got "
          f"{self.block!r}. Pass `Block(...)`, not the class.")
    _args.int_at_least("LayerStack", "length", self.length, 1)
    if not self.scan and self.levels is not None:
      raise ValueError(
          f"`LayerStack`: `levels`={self.levels!r} nests a scan, but `scan=False`. Use "
          "`scan=True`, or leave `levels` unset.")
    if self.layer_axis is not None and not isinstance(self.layer_axis, str):
      raise TypeError(
          f"`LayerStack`: `layer_axis` must be a str (the logical name of the layer axis) "
          f"or None, got {self.layer_axis!r}.")

  @nn.compact
  def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Runs the layers on carry ``x``; ``args``/``kwargs`` go to every layer."""
    self._validate()
    block = self.block.clone(parent=None, name=None)
    n = self.length
    streams = [s for s in self.rng_streams if self.has_rng(s)]
    keys = {s: jax.random.split(self.make_rng(s), n) for s in streams}
    if self.is_initializing():
      stacked = self._init_stacked(block, x, args, kwargs, keys)
    else:
      stacked = None

    def apply(h: Any, params: Any, rngs: Mapping[str, jax.Array]) -> Any:
      return block.apply({"params": params}, h, *args, rngs=dict(rngs), **kwargs)

    if not self.scan:
      layer = remat(apply, policy=self.policy)
      for i in range(n):
        take = lambda a, i=i: a[i]
        p = self.param(f"layers_{i}", lambda _, i=i: jax.tree_util.tree_map(take, stacked))
        with jax.named_scope(f"layers_{i}"):  # the readouts' layer column: which layer
          x = layer(x, p, jax.tree_util.tree_map(take, keys))
      return x
    params = self.param("layers", lambda _: add_layer_axis(stacked, self.layer_axis))

    def body(h: Any, xs: Any) -> tuple[Any, None]:
      p, r = xs
      return apply(h, p, r), None

    x, _ = remat_scan(body, x, (params, keys), policy=self.policy, levels=self.levels)
    return x

  def _init_stacked(self, block: nn.Module, x: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any], keys: Mapping[str, jax.Array]) -> Any:
    """Initial parameters of every layer, stacked: the same in scanned and unrolled form."""
    base = self.make_rng("params")

    def init_one(k: jax.Array, r: Mapping[str, jax.Array]) -> Any:
      variables = block.init({"params": k, **r}, x, *args, **kwargs)
      extra = sorted(set(variables) - {"params"})
      if extra:
        raise ValueError(
            f"`LayerStack`: block {type(block).__name__} has variable collections {extra} "
            "besides `params`; a scanned stack carries no mutable state. Use LayerNorm or "
            "GroupNorm instead of BatchNorm.")
      return variables["params"]

    return jax.vmap(init_one)(jax.random.split(base, self.length), dict(keys))


def add_layer_axis(tree: Any, name: str | None) -> Any:
  """Partition-metadata boxes in ``tree`` with a leading axis ``name`` added.

  Stacked parameters gain a leading layer axis; their ``nn.Partitioned`` /
  ``nn.LogicallyPartitioned`` names must gain it too, or
  ``nn.get_partition_spec`` shards the layer axis by the first weight axis.
  """
  return jax.tree_util.tree_map(
      lambda x: x.add_axis(0, {nn.PARTITION_NAME: name})
      if isinstance(x, nn.meta.AxisMetadata) else x,
      tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _take_layer(a: Any, i: int) -> Any:
  if isinstance(a, nn.Partitioned):
    return a.replace(value=a.value[i], names=tuple(a.names[1:]))
  if _is_box(a):
    return a.replace_boxed(a.unbox()[i])
  return a[i]


def _stack_boxes(items: Sequence[Any]) -> Any:
  if _is_box(items[0]):
    return items[0].replace_boxed(jax.numpy.stack([b.unbox() for b in items]))
  return jax.numpy.stack(items)


_LAYER = re.compile(r"^(?P<prefix>.+)_(?P<index>\d+)$")


def unstack_layers(params: Mapping[str, Any], *, prefix: str = "layers") -> dict[str, Any]:
  """Turns every stacked ``prefix`` entry into ``prefix_0 ... prefix_{L-1}``.

  The scanned `LayerStack`'s parameters become those of the unrolled one
  (``scan=False``), at any depth of the tree. Partition-metadata boxes lose
  their leading (layer) axis name with the axis.

  >>> import jax.numpy as jnp
  >>> tree = {"stack": {"layers": {"w": jnp.zeros((3, 2))}}}
  >>> sorted(unstack_layers(tree)["stack"])
  ['layers_0', 'layers_1', 'layers_2']
  """
  out: dict[str, Any] = {}
  for k, v in params.items():
    if k == prefix:
      leaves = jax.tree_util.tree_leaves(v)
      if not leaves:
        raise ValueError(f"`unstack_layers`: `{prefix}` holds no arrays.")
      n = leaves[0].shape[0]
      for i in range(n):
        out[f"{prefix}_{i}"] = jax.tree_util.tree_map(
            lambda a, i=i: _take_layer(a, i), v, is_leaf=_is_box)
    elif isinstance(v, Mapping):
      out[k] = unstack_layers(v, prefix=prefix)
    else:
      out[k] = v
  return out


def stack_layers(params: Mapping[str, Any], *, prefix: str = "layers",
                 layer_axis: str | None = "layers") -> dict[str, Any]:
  """The inverse of :func:`unstack_layers`: ``prefix_i`` entries stacked into ``prefix``.

  Partition-metadata boxes gain the leading axis name ``layer_axis``, as in
  the scanned `LayerStack`.

  Raises:
    ValueError: if the layer indices are not ``0 ... L-1`` or the layers'
      trees differ.
  """
  out: dict[str, Any] = {}
  layers: dict[int, Any] = {}
  for k, v in params.items():
    m = _LAYER.match(k)
    if m and m["prefix"] == prefix:
      layers[int(m["index"])] = v
    elif isinstance(v, Mapping):
      out[k] = stack_layers(v, prefix=prefix, layer_axis=layer_axis)
    else:
      out[k] = v
  if layers:
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(
          f"`stack_layers`: layer indices {sorted(layers)} under `{prefix}_i` are not "
          f"0..{len(layers) - 1}.")
    seq: Sequence[Any] = [layers[i] for i in range(len(layers))]
    structs = {jax.tree_util.tree_structure(t) for t in seq}
    if len(structs) > 1:
      raise ValueError(f"`stack_layers`: the `{prefix}_i` trees differ in structure.")
    out[prefix] = add_layer_axis(jax.tree_util.tree_map(
        lambda *a: _stack_boxes(a), *seq, is_leaf=_is_box), layer_axis)
  return out


# The names of remat_kit 0.1, kept for existing code.
