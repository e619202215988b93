"""Pipeline parallelism with remat: stages over a mesh axis, microbatches, one SPMD program.

:func:`pipeline` turns ``stage_fn(params, x_mb) -> y_mb`` (one stage) into
``run(stage_params, x)``: stages on the chips of one mesh axis, the batch cut into
microbatches, a ``lax.scan`` over *iterations* that runs every stage on its current
microbatch, then shifts activations one stage on with ``ppermute``. ``shard_map``
is manual over the stage axis only: other mesh axes (data, FSDP) compose.

Schedules (S stages, M microbatches, R rounds):

* ``"gpipe"``: each stage holds one piece of the model; microbatch ``m`` is at
  stage ``s`` in iteration ``m + s``. ``M + S - 1`` iterations, bubble
  ``(S - 1) / (M + S - 1)``.
* ``"circular"``: each stage holds ``R = layers_per_stage`` pieces, visited in
  rounds (MaxText's circular pipeline): piece ``v = r * S + s`` of the model
  is round ``r`` of stage ``s``, and a microbatch goes round the ring ``R``
  times. ``R * M + S - 1`` iterations when ``M >= S``, bubble
  ``(S - 1) / (R * M + S - 1)``: R times fewer idle slots per unit of work.

Remat happens in two places. ``iteration_policy`` is the policy of a
checkpoint around each iteration, whose input is tagged ``iteration_input``:
the default ``"save:iteration_input"`` keeps one microbatch's stage input per
stage and iteration and recomputes the stage in the backward pass;
``"offload:iteration_input"`` moves those to host memory. ``policy`` wraps
``stage_fn`` in :func:`remat_kit.remat`; it decides what a stage keeps while
its backward runs (and what every iteration keeps when ``iteration_policy``
is None). A stage made of layers can scan them with :func:`remat_kit.remat_scan`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from remat_kit import _args
from remat_kit.pipelining.schedules import SCHEDULES, ScheduleInfo, schedule_info, stage_key
from remat_kit.policies import CallablePolicy, from_config
from remat_kit.transforms import checkpoint_name, remat

__all__ = ["ITERATION_INPUT", "Pipeline", "pipeline"]

ITERATION_INPUT = "iteration_input"

_shard_map: Callable[..., Any] = getattr(jax, "shard_map", None) or __import__(
    "jax.experimental.shard_map", fromlist=["shard_map"]).shard_map  # before jax.shard_map


def _split(x: jax.Array, m: int) -> jax.Array:
  """``(B, ...) -> (M, B // M, ...)``, microbatch ``i`` holding rows ``i, i + M, ...``."""
  return jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1)


def _merge(y: jax.Array) -> jax.Array:
  return jnp.swapaxes(y, 0, 1).reshape((y.shape[0] * y.shape[1],) + y.shape[2:])


class Pipeline:
  """The ``run(stage_params, x, *, key=None)`` that :func:`pipeline` returns.

  Attributes:
    info: the :class:`ScheduleInfo` (iterations, bubble, the slot table).
    bubble_fraction: ``info.bubble_fraction``.
    mesh, axis, stage_fn, policy, iteration_policy: as given to :func:`pipeline`.
  """

  def __init__(self, stage_fn: Callable[..., jax.Array], mesh: Any, axis: str,
               info: ScheduleInfo, policy: Any, iteration_policy: Any) -> None:
    self.stage_fn, self.mesh, self.axis, self.info = stage_fn, mesh, axis, info
    self.policy, self.iteration_policy = policy, iteration_policy
    self._stage = stage_fn if policy is None else remat(stage_fn, policy=policy,
                                                        prevent_cse=False)
    self._jitted = jax.jit(self._run)
    self._checked: set[Any] = set()  # argument signatures already checked (no retrace)

  @property
  def bubble_fraction(self) -> float:
    return self.info.bubble_fraction

  def __repr__(self) -> str:
    i = self.info
    return (f"Pipeline(schedule={i.schedule!r}, stages={i.stages}, microbatches="
            f"{i.microbatches}, layers_per_stage={i.rounds}, iterations={i.iterations}, "
            f"bubble_fraction={i.bubble_fraction:.3f})")

  # ---- checks ---------------------------------------------------------------------------
  def _check(self, stage_params: Any, x: Any, key: Any) -> None:
    sig = jax.tree_util.tree_structure((stage_params, x, key)), tuple(
        (tuple(getattr(a, "shape", ())), str(getattr(a, "dtype", type(a))))
        for a in jax.tree_util.tree_leaves((stage_params, x, key)))
    if sig not in self._checked:
      self._check_once(stage_params, x, key)
      self._checked.add(sig)

  def _check_once(self, stage_params: Any, x: Any, key: Any) -> None:
    i = self.info
    if not hasattr(x, "shape") or not getattr(x, "shape", ()):
      raise TypeError(f"`pipeline`: `x` must be an array with the batch as leading axis, got "
                      f"{type(x).__name__} {getattr(x, 'shape', '')}.")
    b = int(x.shape[0])
    if b % i.microbatches:
      divisors = [d for d in range(1, b + 1) if b % d == 0]
      raise ValueError(
          f"`pipeline`: `microbatches`={i.microbatches} does not divide the batch of {b} "
          f"(`x.shape`={tuple(x.shape)}). Pass a batch that is a multiple of "
          f"{i.microbatches}, or `microbatches` in {divisors}.")
    lead = (i.stages,) if i.schedule == "gpipe" else (i.stages, i.rounds)
    what = (f"`mesh.shape['{self.axis}']`={i.stages}" if i.schedule == "gpipe" else
            f"(`mesh.shape['{self.axis}']`, `layers_per_stage`)=({i.stages}, {i.rounds})")
    paths = jax.tree_util.tree_flatten_with_path(stage_params)[0]
    if not paths:
      raise ValueError("`pipeline`: `stage_params` has no arrays; pass the stages' parameters "
                       f"stacked with leading axes {lead}.")
    for path, leaf in paths:
      shape = tuple(getattr(leaf, "shape", ()))
      if shape[:len(lead)] != lead:
        raise ValueError(
            f"`pipeline`: leaf `stage_params{jax.tree_util.keystr(path)}` has shape {shape}; "
            f"every leaf needs leading axes {lead}, {what}. Stack one slice per stage"
            + (" and round (piece `r * S + s` of the model at `[s, r]`)."
               if i.schedule == "circular" else "."))
    if key is not None and not hasattr(key, "dtype"):
      raise TypeError(f"`pipeline`: `key` must be a PRNG key array, got {key!r}.")
    # stage_fn must map one microbatch to an array of its shape and dtype.
    one = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape[len(lead):], a.dtype), stage_params)
    x_mb = jax.ShapeDtypeStruct((b // i.microbatches,) + tuple(x.shape[1:]), x.dtype)
    extra = () if key is None else (jax.ShapeDtypeStruct(key.shape, key.dtype),)
    try:
      out = jax.eval_shape(self.stage_fn, one, x_mb, *extra)
    except TypeError as e:
      if key is not None and _takes_two(self.stage_fn):
        raise TypeError(
            "`pipeline`: `run(..., key=...)` calls `stage_fn(params, x_mb, key)`, but "
            f"`stage_fn` takes two arguments ({e}). Add a `key` parameter, or call `run` "
            "without `key`.") from e
      raise
    if not (hasattr(out, "shape") and tuple(out.shape) == x_mb.shape
            and out.dtype == x_mb.dtype):
      got = (f"{jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), out)}")
      raise ValueError(
          f"`pipeline`: `stage_fn` must return one array of its input's shape and dtype "
          f"(a microbatch {x_mb.shape} {x_mb.dtype}); it returned {got}. The stages pass "
          "activations on unchanged in shape: move embeddings and heads outside `run`.")

  # ---- the program ----------------------------------------------------------------------
  def __call__(self, stage_params: Any, x: jax.Array, *, key: jax.Array | None = None
               ) -> jax.Array:
    """Runs the pipeline: equal to :meth:`sequential`, in one SPMD program.

    Args:
      stage_params: a pytree whose leaves have leading axis ``S`` (GPipe) or
        leading axes ``(S, R)`` (circular), sharded over the stage axis.
      x: the batch, ``(B, ...)``; microbatch ``m`` is rows ``m, m + M, ...``
        (strided, so a batch sharded over data axes splits in place).
      key: a PRNG key; given, ``stage_fn`` is called with a third argument,
        :func:`stage_key` of it for each (stage, microbatch).

    Returns:
      ``(B, ...)``, every example through every stage in order.
    """
    self._check(stage_params, x, key)
    return self._jitted(stage_params, x, key)

  def sequential(self, stage_params: Any, x: jax.Array, *, key: jax.Array | None = None
                 ) -> jax.Array:
    """The program ``run`` equals: the stages in order on each microbatch, on one device.

    A reference for tests; slow (a Python loop over stages and microbatches).

    Args:
      stage_params: as for ``run`` (leading axes ``S``, or ``(S, R)``).
      x: the batch, ``(B, ...)``, cut into microbatches as ``run`` cuts it.
      key: a PRNG key; given, ``stage_fn`` gets :func:`stage_key` of it for
        each (piece, microbatch), the same keys ``run`` gives.

    Returns:
      ``(B, ...)``, every example through every stage in order.

    Raises:
      ValueError: for a batch ``microbatches`` does not divide, parameters
        without the stage axes leading, or a ``stage_fn`` that changes shape.
      TypeError: for an ``x`` that is not an array, a ``key`` that is not a
        key array, or a ``stage_fn`` that takes no ``key`` when given one.
    """
    self._check(stage_params, x, key)
    i = self.info
    xs = _split(x, i.microbatches)
    outs = []
    for m in range(i.microbatches):
      h = xs[m]
      for v in range(i.stages * i.rounds):
        r, s = divmod(v, i.stages)
        p = jax.tree_util.tree_map(
            lambda a, s=s, r=r: a[s] if i.schedule == "gpipe" else a[s, r], stage_params)
        h = self.stage_fn(p, h) if key is None else self.stage_fn(p, h, stage_key(key, v, m))
      outs.append(h)
    return _merge(jnp.stack(outs))

  def _run(self, stage_params: Any, x: jax.Array, key: jax.Array | None) -> jax.Array:
    i, axis = self.info, self.axis
    xs = _split(x, i.microbatches)
    p_specs = jax.tree_util.tree_map(lambda _: P(axis), stage_params)
    body = functools.partial(self._local, has_key=key is not None)
    kw: dict[str, Any] = {}
    if set(self.mesh.axis_names) != {axis}:
      kw["axis_names"] = frozenset({axis})  # other axes stay automatic (data, FSDP)
    fn = _shard_map(body, mesh=self.mesh, in_specs=(p_specs, P(), P()), out_specs=P(), **kw)
    key_arg = key if key is not None else jnp.zeros((), jnp.uint32)
    return _merge(fn(stage_params, xs, key_arg))

  def _local(self, params: Any, xs: jax.Array, key: jax.Array, *, has_key: bool) -> jax.Array:
    """One stage's share of the program (inside ``shard_map``)."""
    i, axis = self.info, self.axis
    S, R, M = i.stages, i.rounds, i.microbatches
    s = lax.axis_index(axis)
    params = jax.tree_util.tree_map(lambda a: a[0], params)  # this stage's slice
    ring = [(j, (j + 1) % S) for j in range(S)]

    circular = i.schedule == "circular"
    iterate = self.iteration_policy is not None and self.iteration_policy is not False

    def compute_on(params: Any, inp: jax.Array, m: jax.Array, r: jax.Array, key: jax.Array,
                   stage: Callable[..., jax.Array]) -> jax.Array:
      if circular:  # this round's piece of the stage
        params = jax.tree_util.tree_map(
            lambda a: lax.dynamic_index_in_dim(a, r, keepdims=False), params)
      if has_key:
        return stage(params, inp, stage_key(key, r * S + s, m))
      return stage(params, inp)

    if circular and not iterate:
      # Without a checkpoint around the iteration, each one would keep its round's
      # parameter slice (the backward of `x @ w` needs `w`): one checkpoint with the
      # stage's policy that never saves slices, so they are re-sliced from the stage's
      # parameters, which the loop keeps once.
      pol = _NO_SLICES if self.policy is None else from_config(self.policy) & _NO_SLICES
      compute: Callable[..., jax.Array] = remat(
          functools.partial(compute_on, stage=self.stage_fn), policy=pol, prevent_cse=False,
          check_names=self.policy is not None)
    else:
      compute = functools.partial(compute_on, stage=self._stage)

    def step(params: Any, xs: jax.Array, state: jax.Array, circ: jax.Array, m: jax.Array,
             r: jax.Array, key: jax.Array) -> jax.Array:
      fresh = lax.dynamic_index_in_dim(xs, m, keepdims=False)
      inp = jnp.where(s == 0, jnp.where(r == 0, fresh, circ), state)
      inp = checkpoint_name(inp, ITERATION_INPUT)
      return compute(params, inp, m, r, key)

    if iterate:
      step = remat(step, policy=self.iteration_policy, prevent_cse=False)

    def iteration(carry: tuple[jax.Array, jax.Array], t: jax.Array
                  ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
      state, fifo = carry
      m, r, _ = i.slot(t, s)
      m, r = jnp.clip(m, 0, M - 1), jnp.clip(r, 0, R - 1)
      if i.fifo:  # outputs of the last stage wait here until their next round starts
        slot = t % i.fifo
        circ = lax.dynamic_index_in_dim(fifo, slot, keepdims=False)
        fifo = lax.dynamic_update_index_in_dim(fifo, state, slot, 0)
      else:
        circ = state
      y = step(params, xs, state, circ, m, r, key)
      return (lax.ppermute(y, axis, ring), fifo), y

    state = _vary(xs[0], axis)  # real data in idle slots: no NaNs from zeros
    fifo = _vary(jnp.broadcast_to(xs[0], (max(i.fifo, 1),) + xs.shape[1:]), axis)
    _, ys = lax.scan(iteration, (state, fifo), jnp.arange(i.iterations, dtype=jnp.int32))
    first = (R - 1) * i.period + S - 1  # the last stage's output of microbatch 0, round R-1
    out = ys[first:first + M]
    return lax.psum(jnp.where(s == S - 1, out, jnp.zeros_like(out)), axis)


def _not_a_slice(prim: Any, *_: Any, **__: Any) -> bool:
  """Saves every op's output but slices and reshapes (data movement, cheap to redo)."""
  return getattr(prim, "name", "") not in _MOVEMENT


_MOVEMENT = frozenset({"dynamic_slice", "slice", "squeeze", "reshape", "gather"})
_NO_SLICES = CallablePolicy(_not_a_slice)


def _vary(x: jax.Array, axis: str) -> jax.Array:
  """``x`` marked as varying over ``axis`` (a scan carry that ppermute updates must be)."""
  pvary = getattr(jax.lax, "pcast", None)
  if pvary is not None:
    try:
      return pvary(x, axis, to="varying")
    except TypeError:  # pragma: no cover - older signature
      pass
  pvary = getattr(jax.lax, "pvary", None)
  return pvary(x, axis) if pvary is not None else x


def _takes_two(fn: Callable[..., Any]) -> bool:
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return False
  ps = list(sig.parameters.values())
  if any(p.kind is p.VAR_POSITIONAL for p in ps):
    return False
  return len([p for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) == 2


def pipeline(stage_fn: Callable[..., jax.Array], *, mesh: Any, axis: str = "stage",
             microbatches: int, policy: Any = None, schedule: str = "gpipe",
             layers_per_stage: int | None = None,
             iteration_policy: Any = "save:" + ITERATION_INPUT) -> Pipeline:
  """Pipeline parallelism over mesh axis ``axis``, with remat per stage and per iteration.

  ``run = pipeline(stage_fn, mesh=mesh, microbatches=M)`` gives
  ``run(stage_params, x)``, equal to applying the stages in order to every
  microbatch of ``x`` (see :meth:`Pipeline.sequential`), and ``jax.grad``
  through it equals the gradient of that sequential program. Memory per chip:
  one stage's parameters; the ``x`` and output buffers (the whole batch, as
  the stage axis replicates them); and per iteration what
  ``iteration_policy`` keeps (by default one microbatch's stage input, so
  ``iterations * B / M`` activations of one stage boundary), plus one stage's
  backward at a time under ``policy``.

  Args:
    stage_fn: ``stage_fn(params, x_mb) -> y_mb``, one microbatch through one
      stage (or one round of a stage), ``y_mb`` of ``x_mb``'s shape and
      dtype; ``stage_fn(params, x_mb, key)`` when ``run`` gets a ``key``.
    mesh: a ``jax.sharding.Mesh`` with axis ``axis``; its other axes stay
      automatic inside the pipeline, so data or FSDP sharding composes.
    axis: the mesh axis the stages live on; S = ``mesh.shape[axis]``.
    microbatches: M, how many slices the batch is cut into; it must divide
      the batch. M much larger than S shrinks the bubble.
    policy: None runs ``stage_fn`` as given; anything else wraps it in
      :func:`remat_kit.remat` with this policy (``True``/``"full"``,
      ``"save_dots_no_batch"``, a dict, ...).
    schedule: ``"gpipe"`` or ``"circular"`` (see :data:`SCHEDULES`).
    layers_per_stage: for ``"circular"``, R, the pieces of the model each
      stage holds (the leaves of ``stage_params`` are then ``(S, R, ...)``,
      piece ``r * S + s`` at ``[s, r]``); must be None or 1 for GPipe.
    iteration_policy: the policy of the checkpoint around each iteration,
      whose stage input is tagged ``"iteration_input"``: the default saves it
      and recomputes the stage; ``"offload:iteration_input"`` keeps it on the
      host; ``True`` saves the iteration's carries (for circular, two
      microbatches); None or False puts no checkpoint there (every
      iteration keeps what ``policy`` saves).

  Returns:
    A :class:`Pipeline`, the ``run`` function, with ``run.info`` (its
    :class:`ScheduleInfo`) and ``run.bubble_fraction``.

  Raises:
    ValueError: for a mesh without ``axis`` (the message lists its axes), an
      unknown ``schedule``, a bad ``microbatches`` or ``layers_per_stage``;
      when called, for a batch ``microbatches`` does not divide, parameters
      without the stage axis leading, or a ``stage_fn`` that changes shape.
    TypeError: for a non-callable ``stage_fn`` or a mesh that is not one.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, remat_kit as rk
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("stage",))
    >>> run = rk.pipeline(lambda w, x: jnp.tanh(x @ w), mesh=mesh, microbatches=8)
    >>> w, x = jnp.stack([jnp.eye(3)] * 4), jnp.ones((16, 3))
    >>> bool(jnp.allclose(run(w, x), jnp.tanh(jnp.tanh(jnp.tanh(jnp.tanh(x))))))
    True
    >>> run.info.iterations, round(run.bubble_fraction, 3)
    (11, 0.273)
  """
  if not callable(stage_fn):
    raise TypeError(f"`pipeline`: `stage_fn` must be callable, got {stage_fn!r}.")
  names = getattr(mesh, "axis_names", None)
  if names is None or not hasattr(mesh, "shape"):
    raise TypeError(f"`pipeline`: `mesh` must be a `jax.sharding.Mesh`, got {mesh!r}. Build "
                    "one with `jax.sharding.Mesh(devices, ('stage', ...))`.")
  if axis not in names:
    raise ValueError(
        f"`pipeline`: `mesh` has no axis `axis`={axis!r}; its axes are {list(names)} with "
        f"sizes {dict(mesh.shape)}. Pass `axis=` one of them, or build the mesh with a "
        f"{axis!r} axis.")
  if schedule not in SCHEDULES:
    raise ValueError(f"`pipeline`: `schedule` must be one of {list(SCHEDULES)}, got "
                     f"{schedule!r}.")
  if layers_per_stage is None:
    rounds = 1
  else:
    rounds = _args.int_at_least("pipeline", "layers_per_stage", layers_per_stage, 1)
  if schedule == "circular" and layers_per_stage is None:
    raise ValueError("`pipeline`: `schedule='circular'` needs `layers_per_stage` (R >= 1, the "
                     "pieces of the model per stage, visited in rounds).")
  info = schedule_info(schedule, stages=int(mesh.shape[axis]), microbatches=microbatches,
                       rounds=rounds)
  return Pipeline(stage_fn, mesh, axis, info, policy, iteration_policy)
