"""What remat costs: saved residuals, compiled memory, FLOPs, and reports over them.

* :func:`memory_report`, :func:`compare`, :func:`diff`: one call per question.
* :func:`lint`: warnings for policies that do nothing useful.
* :func:`explain_peak`: what is live at the compiled gradient's peak.
* :func:`memory_timeline`: what is live at every point of it (a page, a PNG).
* :func:`saved_residuals`, :func:`compiled_memory`, :func:`count_flops`,
  :func:`flop_breakdown`, :func:`live_peak_bytes`: the readouts underneath.
* :func:`compilation`: the one cached compile every readout of a function shares
  (:class:`Compilation`: its memory fields, residuals, FLOPs, timeline).
* :func:`estimate_seconds`: the roofline step time on a target.
* :func:`time_interleaved`, :func:`faster`, :func:`tied`, :func:`pareto_front`:
  step times a shared machine cannot fake, and the frontier they allow.
"""

from remat_kit.report.compiled import Compilation, compilation
from remat_kit.report.compiled import cache_info as compilation_cache_info
from remat_kit.report.compiled import clear_cache as clear_compilation_cache
from remat_kit.report.core import (
    Residual,
    compiled_memory,
    live_peak_bytes,
    memory_fields,
    saved_residuals,
)
from remat_kit.report.estimate import estimate_seconds, measure_local_rates
from remat_kit.report.flops import count_flops, flop_breakdown, without_remat
from remat_kit.report.linting import LintWarning, lint
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
from remat_kit.report.timeline import (
    MemoryTimeline,
    Timeline,
    TimelineBuffer,
    memory_timeline,
    timeline_of,
)
from remat_kit.report.timing import (
    RELIABLE,
    Timing,
    faster,
    pareto_front,
    tied,
    time_interleaved,
)

__all__ = [
    "RELIABLE",
    "Compilation",
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
    "Timing",
    "clear_compilation_cache",
    "compare",
    "compilation",
    "compilation_cache_info",
    "compiled_memory",
    "count_flops",
    "diff",
    "estimate_seconds",
    "explain_peak",
    "faster",
    "flop_breakdown",
    "format_bytes",
    "format_table",
    "lint",
    "live_peak_bytes",
    "measure_local_rates",
    "memory_fields",
    "memory_report",
    "memory_timeline",
    "pareto_front",
    "saved_residuals",
    "tied",
    "time_interleaved",
    "timeline_of",
    "without_remat",
]
