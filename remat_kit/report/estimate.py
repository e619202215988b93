"""Step time on a target, estimated from what is exact: FLOPs and HBM bytes.

The TPU compiler's ``cost_analysis()["optimal_seconds"]`` came out negative
on ordinary programs, and its ``flops`` and ``bytes accessed`` count a loop
body once, so neither is used. Instead::

  estimated_seconds = FLOPs / peak FLOP/s  +  HBM bytes moved / HBM bandwidth

* FLOPs: remat_kit's count from the jaxpr of the gradient, recomputation
  included and every scan or while trip multiplied in
  (:func:`remat_kit.report.count_flops`);
* HBM bytes: the operand and result bytes of each top-level kernel of the
  compiled program, loop bodies times their trip counts
  (:func:`remat_kit.targets.hbm_bytes_moved`);
* the chip's published peak rates (:data:`remat_kit.targets.CHIPS`).

The two terms are added (no overlap of compute and memory traffic), so the
estimate is an upper bound of an ideal kernel schedule; it is for ranking
plans on one target, not for predicting wall time to the millisecond.
"""

from __future__ import annotations

from typing import Any

from remat_kit import targets

__all__ = ["estimate_seconds"]


def estimate_seconds(total_flops: int | float, compiled: dict[str, Any], target: Any
                     ) -> tuple[float | None, str]:
  """``(estimated_seconds, estimate_source)`` for a compiled gradient on ``target``.

  Returns ``(None, reason)`` on the local backend, whose speed is measured
  rather than estimated.
  """
  t = targets.parse_target(target)
  chip = t.chip
  if t.is_local or chip is None:
    return None, "none: the local backend is timed, not estimated"
  moved = compiled.get("hbm_bytes_moved")
  if moved is None:
    return None, "none: the compile reported no HBM bytes"
  seconds = float(total_flops) / chip.peak_flops + float(moved) / chip.hbm_bandwidth
  source = (f"roofline sum: remat_kit FLOPs ({total_flops:.3g}, trip counts included) / "
            f"{chip.peak_flops:.3g} FLOP/s + compiled HBM bytes ({moved:.3g}) / "
            f"{chip.hbm_bandwidth:.3g} B/s [{chip.source}]")
  return seconds, source
