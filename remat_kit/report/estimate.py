"""Step time on a target, estimated from what is exact: FLOPs and HBM bytes.

The TPU compiler's ``cost_analysis()["optimal_seconds"]`` came out negative
on ordinary programs, and its ``flops`` and ``bytes accessed`` count a loop
body once, so neither is used. Instead::

  estimated_seconds = FLOPs / peak FLOP/s  +  HBM bytes moved / HBM bandwidth
                      +  host-link bytes / host (PCIe) bandwidth

* FLOPs: remat_kit's count from the jaxpr of the gradient, recomputation
  included and every scan or while trip multiplied in
  (:func:`remat_kit.report.count_flops`);
* HBM bytes: the operand and result bytes of each top-level kernel of the
  compiled program, loop bodies times their trip counts
  (:func:`remat_kit.targets.bytes_moved`);
* host-link bytes: what copies to and from host memory (offloaded
  activations, memory space ``S(5)``) carry over PCIe, counted apart from HBM;
* the chip's published peak rates (:data:`remat_kit.targets.CHIPS`).

The terms are added (no overlap of compute and memory traffic), so the
estimate is an upper bound of an ideal kernel schedule; it is for ranking
plans on one target, not for predicting wall time to the millisecond.
"""

from __future__ import annotations

from typing import Any

from remat_kit import targets

__all__ = ["estimate_seconds", "measure_local_rates"]


def estimate_seconds(total_flops: int | float, compiled: dict[str, Any], target: Any,
                     rates: tuple[float, float, str] | None = None
                     ) -> tuple[float | None, str]:
  """``(estimated_seconds, estimate_source)`` for a compiled gradient on ``target``.

  Args:
    total_flops: the gradient's FLOPs (``flop_breakdown(...)["total"]``).
    compiled: :func:`remat_kit.report.compiled_memory` of the gradient.
    target: where it was compiled.
    rates: ``(FLOP/s, bytes/s, where they come from)`` to use instead of the
      target's published peaks; for the local backend, measured rates (see
      :func:`measure_local_rates`).

  Returns:
    ``(seconds, source)``: the roofline sum and what went into it, or
    ``(None, reason)`` where there is no estimate: the local backend without
    ``rates`` (it is timed), a target without a known chip, a compile that
    reports no HBM bytes, or given ``rates`` for a program that moves bytes
    to or from host memory (they have no host bandwidth).
  """
  t = targets.parse_target(target)
  host_rate = None
  if rates is None:
    chip = t.chip
    if t.is_local or chip is None:
      return None, "none: the local backend is timed, not estimated"
    rates = (chip.peak_flops, chip.hbm_bandwidth, chip.source)
    host_rate = (chip.host_bandwidth, chip.host_source)
  moved = compiled.get("hbm_bytes_moved")
  if moved is None:
    return None, "none: the compile reported no HBM bytes"
  flops_s, bytes_s, where = rates
  seconds = float(total_flops) / flops_s + float(moved) / bytes_s
  source = (f"roofline sum: remat_kit FLOPs ({total_flops:.3g}, trip counts included) / "
            f"{flops_s:.3g} FLOP/s + compiled HBM bytes ({moved:.3g}) / "
            f"{bytes_s:.3g} B/s [{where}]")
  host = compiled.get("host_bytes_moved") or 0
  if host:
    if host_rate is None:
      return None, (f"none: the program moves {host:.3g} bytes to and from host memory and "
                    "the given rates have no host bandwidth")
    seconds += float(host) / host_rate[0]
    source += f" + host-link bytes ({host:.3g}) / {host_rate[0]:.3g} B/s [{host_rate[1]}]"
  return seconds, source


def measure_local_rates(repeats: int = 10) -> tuple[float, float, str]:
  """The local device's matmul FLOP/s and copy bandwidth, measured (median of ``repeats``).

  A 1024^3 float32 matmul and a 64 MiB ``x + 1``; labelled as measured.

  Args:
    repeats: timed runs of each kernel after one warm-up run (10 by default).

  Returns:
    ``(FLOP/s, bytes/s, description)``, the ``rates`` that
    :func:`estimate_seconds` takes.
  """
  import statistics
  import time

  import jax
  import jax.numpy as jnp

  a = jnp.ones((1024, 1024), jnp.float32)
  v = jnp.ones((16 * 2**20,), jnp.float32)
  mm, add = jax.jit(lambda x: x @ x), jax.jit(lambda x: x + 1)

  def med(fn: Any, x: Any) -> float:
    jax.block_until_ready(fn(x))
    ts = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(x))
      ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

  flops = 2 * 1024**3 / med(mm, a)
  bw = 2 * v.nbytes / med(add, v)
  return flops, bw, (f"measured on {jax.devices()[0].device_kind}: {flops:.3g} FLOP/s "
                     f"(1024^3 f32 matmul), {bw:.3g} B/s (64 MiB x + 1)")
