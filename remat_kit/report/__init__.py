"""What remat costs: saved residuals, compiled memory, FLOPs, and reports over them.

* :func:`memory_report`, :func:`compare`, :func:`diff`: one call per question.
* :func:`lint`: warnings for policies that do nothing useful.
* :func:`explain_peak`: what is live at the compiled gradient's peak.
* :func:`memory_timeline`: what is live at every point of it (a page, a PNG).
* :func:`saved_residuals`, :func:`compiled_memory`, :func:`count_flops`,
  :func:`flop_breakdown`, :func:`live_peak_bytes`: the readouts underneath.
"""

from remat_kit.report.core import (
    Residual,
    activation_bytes,
    compiled_memory,
    live_peak_bytes,
    saved_residuals,
)
from remat_kit.report.flops import count_flops, flop_breakdown, without_remat
from remat_kit.report.lint import LintWarning, lint
from remat_kit.report.peak import PeakReport, PeakRow, explain_peak
from remat_kit.report.summary import (
    Comparison,
    MemoryReport,
    ResidualDiff,
    compare,
    diff,
    memory_report,
)
from remat_kit.report.table import format_bytes, format_table
from remat_kit.report.timeline import MemoryTimeline, Timeline, TimelineBuffer, memory_timeline

__all__ = [
    "Comparison",
    "PeakReport",
    "PeakRow",
    "LintWarning",
    "MemoryReport",
    "MemoryTimeline",
    "Residual",
    "ResidualDiff",
    "Timeline",
    "TimelineBuffer",
    "activation_bytes",
    "compare",
    "compiled_memory",
    "count_flops",
    "diff",
    "explain_peak",
    "flop_breakdown",
    "format_bytes",
    "format_table",
    "lint",
    "live_peak_bytes",
    "memory_report",
    "memory_timeline",
    "saved_residuals",
    "without_remat",
]
