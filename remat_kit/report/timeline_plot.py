"""The memory timeline as a PNG (matplotlib, Agg): one panel per policy, one scale."""

from __future__ import annotations

from typing import Any

import numpy as np

from remat_kit.report.table import format_bytes
from remat_kit.report.timeline_html import COLORS

__all__ = ["plot"]


def plot(mt: Any, path: str, dpi: int = 120) -> None:
  """Draws ``mt`` (a :class:`~remat_kit.report.timeline.MemoryTimeline`) to ``path``."""
  from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI

  tls = list(mt.timelines.values())
  top = max([t.peak_bytes for t in tls] + [1])
  cap = mt.capacity_bytes
  near = cap is not None and cap <= 3 * top
  ymax = 1.08 * (max(top, cap) if near else top)
  unit, scale = next(((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
                      if ymax >= 2 * s), ("B", 1))
  fig = Figure(figsize=(4.6 * len(tls) + 1.6, 3.8))
  axes = fig.subplots(1, len(tls), sharey=True, squeeze=False)
  kinds: dict[str, Any] = {}
  for ax, t in zip(axes[0], tls):
    xs = np.arange(t.points + 1)
    base = np.zeros(t.points + 1)
    for k, v in t.by_kind.items():
      up = base + np.append(v, v[-1] if v else 0) / scale
      kinds[k] = ax.fill_between(xs, base, up, step="post", color=COLORS.get(k, "#999"),
                                 linewidth=0, label=k)
      base = up
    p = t.peak_point
    ax.axvline(p + 0.5, color="black", linestyle="--", linewidth=1)
    ax.plot([p + 0.5], [t.peak_bytes / scale], "ko", markersize=4)
    ax.annotate(f"peak {format_bytes(t.peak_bytes)}", (p + 0.5, t.peak_bytes / scale),
                xytext=(0, 6), textcoords="offset points", ha="center", fontsize=9,
                fontweight="bold")
    if t.backward < t.points:
      ax.axvline(t.backward, color="#555", linestyle=":", linewidth=1)
    if cap is not None and near:
      ax.axhline(cap / scale, color="#b00", linestyle="--", linewidth=1.2)
    ax.set_title(t.label, fontsize=11)
    ax.set_xlim(0, t.points)
    ax.set_ylim(0, ymax / scale)
    ax.set_xlabel("program point")
    ax.grid(axis="y", color="#eee")
  axes[0][0].set_ylabel(f"live bytes ({unit})")
  note = f"target {mt.target}"
  if cap is not None:
    note += (f", device memory {format_bytes(cap)} (red line)" if near else
             f", device memory {format_bytes(cap)} (off scale)")
  fig.suptitle(f"memory over the compiled schedule · {note}", fontsize=11)
  handles = [kinds[k] for k in reversed(list(kinds))]
  fig.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8,
             frameon=False)
  fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
  fig.savefig(path, dpi=dpi)
