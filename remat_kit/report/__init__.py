"""What remat costs, read from the compiled program: one call per question.

* :func:`memory_report`, :func:`compare`, :func:`diff`: what a policy keeps and costs.
* :func:`explain_peak`: what is live at the compiled gradient's peak.
* :func:`memory_timeline`: what is live at every point of it (a page, a PNG).
* :func:`lint`: warnings for policies that do nothing useful.
* :func:`saved_residuals`, :func:`compiled_memory`, :func:`count_flops`,
  :func:`flop_breakdown`: the readouts underneath.
* :func:`compilation`: the one cached compile every readout of a function shares
  (:class:`Compilation`).
* :func:`estimate_seconds`: the roofline step time on a target.

The modules by concept, for what is not here: :mod:`~remat_kit.report.timing` (step
times a shared machine cannot fake: ``time_interleaved``, ``faster``, ``tied``,
``pareto_front``), :mod:`~remat_kit.report.estimate`, :mod:`~remat_kit.report.compiled`
(the cache), :mod:`~remat_kit.report.core` (``memory_fields``, ``live_peak_bytes``),
:mod:`~remat_kit.report.timeline`, :mod:`~remat_kit.report.table` (formatting) and
:mod:`~remat_kit.report.tensor` (the row record and the kinds).
"""

from remat_kit.report.compiled import Compilation, compilation
from remat_kit.report.core import Residual, compiled_memory, saved_residuals
from remat_kit.report.estimate import estimate_seconds
from remat_kit.report.flops import count_flops, flop_breakdown
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
from remat_kit.report.timeline import MemoryTimeline, memory_timeline

__all__ = [
    "Compilation",
    "Comparison",
    "LintWarning",
    "MemoryReport",
    "MemoryTimeline",
    "PeakReport",
    "PeakRow",
    "Residual",
    "ResidualDiff",
    "compare",
    "compilation",
    "compiled_memory",
    "count_flops",
    "diff",
    "estimate_seconds",
    "explain_peak",
    "flop_breakdown",
    "lint",
    "memory_report",
    "memory_timeline",
    "saved_residuals",
]
