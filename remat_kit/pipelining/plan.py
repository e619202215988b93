"""A pipeline planned without the chips: per-stage compiled memory and estimated step time.

:func:`plan_step` compiles one training step of :func:`remat_kit.pipeline` for
every chip of a target (deviceless: ``"tpu:v5e:2x2"``, ``"tpu:v5e:4x4"``, see
:mod:`remat_kit.targets`), on a mesh ``("fsdp", "stage")``: the stages on one
axis, each stage's parameters and the batch sharded ``fsdp`` ways on the
other. Every chip runs the same SPMD program on its stage's shard, so the
compiled per-chip memory *is* each stage's memory. The step time is the
library's roofline (:func:`remat_kit.report.estimate_seconds`): FLOPs
per chip counted from the jaxpr (idle bubble slots included: in one SPMD
program they compute too, on data that is thrown away) over the chip's peak,
plus the compiled program's HBM bytes over its bandwidth. The ``ppermute``
between stages (one microbatch's activations per iteration, over ICI) is not
in it.

:func:`largest_microbatch` compiles at microbatch sizes 1 and 2 per chip and
predicts the largest one under the chip's HBM from the line through them
(memory is affine in the microbatch size: fixed parameters and optimizer
state, plus activations per example), as ``experiments/pod_plan.py`` does for
batches.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from remat_kit import targets
from remat_kit.pipelining.transform import ITERATION_INPUT, pipeline
from remat_kit.report import count_flops, estimate_seconds
from remat_kit.report.core import memory_fields

__all__ = ["largest_microbatch", "plan_step", "stage_mesh"]


def stage_mesh(target: Any, fsdp: int = 1) -> jax.sharding.Mesh:
  """A ``("fsdp", "stage")`` mesh over all of ``target``'s devices, ``fsdp`` rows.

  Raises:
    ValueError: when ``fsdp`` does not divide the target's device count.
  """
  t = targets.parse_target(target)
  devs = t.devices()
  if not isinstance(fsdp, int) or fsdp < 1 or len(devs) % fsdp:
    raise ValueError(f"`plan_step`: `fsdp`={fsdp!r} must divide the {len(devs)} devices of "
                     f"{t.name!r}; pass one of "
                     f"{[d for d in range(1, len(devs) + 1) if len(devs) % d == 0]}.")
  return jax.sharding.Mesh(np.array(devs).reshape(fsdp, len(devs) // fsdp), ("fsdp", "stage"))


def _param_spec(shape: tuple[int, ...], lead: int, fsdp: int) -> P:
  """``stage`` on the leading axis; ``fsdp`` on the largest later axis it divides."""
  spec: list[Any] = ["stage"] + [None] * (len(shape) - 1)
  if fsdp > 1:
    rest = sorted(range(lead, len(shape)), key=lambda i: -shape[i])
    for i in rest:
      if shape[i] % fsdp == 0:
        spec[i] = "fsdp"
        break
  return P(*spec)


def _label(policy: Any) -> str:
  return policy if isinstance(policy, str) else repr(policy)


def plan_step(stage_fn: Callable[..., jax.Array], stage_params: Any, x: Any, *,
              target: Any, fsdp: int = 1, microbatches: int, policy: Any = None,
              schedule: str = "gpipe", layers_per_stage: int | None = None,
              iteration_policy: Any = "save:" + ITERATION_INPUT, optimizer: Any = None,
              loss: Callable[[jax.Array], jax.Array] | None = None) -> dict[str, Any]:
  """Compiles one pipelined training step for ``target`` and reads its per-chip cost.

  Args:
    stage_fn: as in :func:`remat_kit.pipeline`.
    stage_params: arrays or ``jax.ShapeDtypeStruct``s, leading axes ``(S,)``
      (GPipe) or ``(S, R)`` (circular), ``S`` = devices / ``fsdp``.
    x: the whole batch (array or ``ShapeDtypeStruct``), ``(B, ...)``.
    target: where to compile: ``"tpu:v5e:2x2"``, ``"tpu:v5e:4x4"``, ...
    fsdp: how many ways each stage's parameters and the batch are sharded.
    microbatches, policy, schedule, layers_per_stage, iteration_policy: as in
      :func:`remat_kit.pipeline`.
    optimizer: an optax-style ``GradientTransformation`` (``init``/``update``);
      given, the step also updates the parameters and the optimizer state
      (both donated), so their memory is counted; None compiles the gradient.
    loss: ``loss(y) -> scalar`` on the pipeline's output; the mean square of
      ``y`` (in float32) by default.

  Returns:
    A JSON-serializable row: the schedule (``iterations``,
    ``bubble_fraction``), ``microbatch_size`` (examples per chip per
    microbatch), the compiled byte fields and ``peak_bytes``, ``flops`` per
    chip, ``estimated_seconds`` with its ``estimate_source``, ``fits`` (the
    compiler accepted it; False with ``note`` when the TPU compiler refuses
    the program for exceeding HBM) and ``compile_s``.
  """
  t = targets.parse_target(target)
  mesh = stage_mesh(t, fsdp)
  run = pipeline(stage_fn, mesh=mesh, axis="stage", microbatches=microbatches, policy=policy,
                 schedule=schedule, layers_per_stage=layers_per_stage,
                 iteration_policy=iteration_policy)
  lead = 1 if schedule == "gpipe" else 2
  params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=NamedSharding(mesh, _param_spec(a.shape, lead, fsdp))),
      stage_params)
  batch = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
      mesh, P("fsdp") if fsdp > 1 else P()))
  loss = loss or (lambda y: jnp.mean(jnp.square(y.astype(jnp.float32))))
  objective = lambda p, xb: loss(run(p, xb))
  args: tuple[Any, ...]
  donate: tuple[int, ...]
  if optimizer is None:
    step, args, donate = jax.grad(objective), (params, batch), ()
  else:
    opt_state = jax.tree_util.tree_map(  # each leaf sharded like its parameter
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                       sharding=_state_sharding(s, params, mesh)),
        jax.eval_shape(optimizer.init, params))

    def step(p: Any, state: Any, xb: jax.Array) -> Any:
      grads = jax.grad(objective)(p, xb)
      updates, state = optimizer.update(grads, state, p)
      return jax.tree_util.tree_map(lambda a, u: a + u.astype(a.dtype), p, updates), state

    args, donate = (params, opt_state, batch), (0, 1)
  info = run.info
  row: dict[str, Any] = {
      "target": t.name, "stages": info.stages, "fsdp": fsdp, "schedule": schedule,
      "layers_per_stage": info.rounds, "microbatches": microbatches,
      "microbatch_size": x.shape[0] // microbatches // fsdp, "policy": _label(policy),
      "iteration_policy": _label(iteration_policy), "iterations": info.iterations,
      "bubble_fraction": round(info.bubble_fraction, 4)}
  t0 = time.perf_counter()
  try:
    compiled = targets.compile_for(step, t, *args, donate_argnums=donate)
  except Exception as e:  # noqa: BLE001 - the compiler's OOM is an answer
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    m = re.search(r"exceeds available HBM \(([\d.]+)G", str(e))
    row.update(fits=False, note=str(e).splitlines()[0][:200],
               hbm_gib=float(m.group(1)) if m else None)
    return row
  mem = memory_fields(compiled, t)
  # Inside the pipeline only the stage axis is manual: the jaxpr's shapes are one stage's
  # (whole over fsdp), so a chip does 1/fsdp of the FLOPs counted.
  flops = count_flops(step, *args) / fsdp
  seconds, source = estimate_seconds(flops, mem, t)
  row.update(fits=True, **{k: v for k, v in mem.items() if k not in ("backend", "target")},
             flops=flops, estimated_seconds=seconds, estimate_source=source,
             compile_s=round(time.perf_counter() - t0, 1))
  return row


def _state_sharding(s: Any, params: Any, mesh: jax.sharding.Mesh) -> NamedSharding:
  """An optimizer-state leaf shards like the parameter of its shape; scalars replicate."""
  for p in jax.tree_util.tree_leaves(params):
    if p.shape == s.shape:
      return p.sharding
  return NamedSharding(mesh, P())


def largest_microbatch(stage_fn: Callable[..., jax.Array], stage_params: Any,
                       example: jax.ShapeDtypeStruct, *, target: Any, microbatches: int,
                       fsdp: int = 1, budget_bytes: int | None = None, verify: bool = False,
                       **plan: Any) -> dict[str, Any]:
  """The largest microbatch size per chip whose step fits ``budget_bytes``, predicted.

  Compiles the step (:func:`plan_step`) with 1 and 2 examples per chip per
  microbatch, fits ``peak = fixed + per_example * size`` through them, and
  returns the size the line puts under the budget (the chip's HBM by
  default), with both rows.

  Args:
    stage_fn, stage_params: as in :func:`plan_step`.
    example: one example's shape and dtype (the batch axis left out).
    target, microbatches, fsdp: as in :func:`plan_step`.
    budget_bytes: the per-chip memory to stay under; the chip's HBM by default.
    verify: also compile at the predicted size; when the compiler refuses it or
      its peak is over the budget, step down (by an eighth, then halving) until a
      size fits, then bisect towards the smallest refused size (at most 7 more
      compiles). The result then carries the compiled row of the size it returns.
    **plan: passed on to :func:`plan_step` (policy, schedule, optimizer, ...).

  Returns:
    ``{"microbatch_size": k, "fixed_bytes", "bytes_per_example",
    "predicted_peak_bytes", "rows": [row at 1, row at 2]}``; size 0 when not
    even one example fits. With ``verify``: ``"predicted_size"``,
    ``"verified"`` (True: the compiled peak at ``microbatch_size`` is under the
    budget), ``"verified_row"`` and ``"refused_at"`` (the smallest size found
    over the budget, or None).
  """
  t = targets.parse_target(target)
  if budget_bytes is None:
    if t.chip is None:
      raise ValueError(f"`largest_microbatch`: target {t.name!r} has no published HBM size; "
                       "pass `budget_bytes=`.")
    budget_bytes = t.chip.hbm_bytes

  def at(size: int) -> dict[str, Any]:  # the step compiled with `size` per chip per microbatch
    x = jax.ShapeDtypeStruct((size * microbatches * fsdp,) + tuple(example.shape),
                             example.dtype)
    return plan_step(stage_fn, stage_params, x, target=t, fsdp=fsdp,
                     microbatches=microbatches, **plan)

  rows = []
  for size in (1, 2):
    rows.append(at(size))
    if not rows[-1]["fits"]:
      return {"microbatch_size": size - 1, "rows": rows}
  one, two = rows[0]["peak_bytes"], rows[1]["peak_bytes"]
  per = max(two - one, 1)
  fixed = one - per
  size = max(0, int((budget_bytes - fixed) // per))
  out = {"microbatch_size": size, "fixed_bytes": fixed, "bytes_per_example": per,
         "predicted_peak_bytes": fixed + size * per, "budget_bytes": budget_bytes,
         "rows": rows}
  if not verify or size <= 2:
    return out
  # The line is a guess: compile there. Refused: step down (by an eighth, then halving)
  # until a size fits; then bisect between it and the smallest refused size.
  out["predicted_size"] = size
  lo, lo_row, hi = 2, rows[1], None
  for _ in range(7):
    row = at(size)
    if row["fits"] and row["peak_bytes"] <= budget_bytes:
      lo, lo_row = size, row
    else:
      hi = size
    if hi is None or hi - lo <= max(1, lo // 16):
      break
    size = (lo + hi) // 2 if lo > 2 else max(3, hi * 7 // 8 if hi == out["predicted_size"]
                                                else hi // 2)
  return {**out, "microbatch_size": lo, "verified": True, "verified_row": lo_row,
          "refused_at": hi}
