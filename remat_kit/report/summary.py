"""One call for what a policy costs: `memory_report`, `compare` and `diff`.

A report holds XLA's compiled memory analysis of the gradient, one row per
buffer the compiled program carries from the forward to the backward pass (its
`checkpoint_name`, remat site and the rule that kept it), totals per name and
per layer, FLOPs split into forward, backward and recomputation, what is live at
the compiled peak, and the live peak on GPU/TPU. One trace and one compile,
shared with :func:`~remat_kit.report.explain_peak` and
:func:`~remat_kit.report.lint` (see :mod:`remat_kit.report.compiled`). It is a
plain dataclass: ``to_dict()`` is JSON-serializable, ``str()`` is a table.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from remat_kit import _args, targets
from remat_kit.report.compiled import compilation
from remat_kit.report.core import Residual, live_peak_bytes, saved_residuals
from remat_kit.report.estimate import estimate_seconds
from remat_kit.report.explain import rule_for
from remat_kit.report.peak import PeakReport, peak_of
from remat_kit.report.table import format_bytes, format_table, short_layer

__all__ = ["Comparison", "MemoryReport", "ResidualDiff", "compare", "diff", "memory_report"]


@dataclasses.dataclass
class MemoryReport:
  """What the gradient of one function keeps and computes.

  Attributes:
    label: a name for the function.
    backend: the JAX backend the numbers come from.
    compiled: XLA's memory analysis of the compiled gradient (bytes):
      argument/output/alias/temp/generated code sizes, the ``host_*`` fields,
      and ``peak_bytes`` = temp + argument + output - alias.
    residuals: one :class:`~remat_kit.report.Residual` per buffer the compiled
      program carries from the forward to the backward pass (made before the
      backward starts, live when it does), largest first. These exist: their
      device rows add up to at most the compiled peak.
    flops: forward, backward, recompute, total and recompute_pct.
    live_peak_bytes: the device's peak bytes in use while running the step,
      or None.
    live_peak_note: why the live peak is None, when it is.
    target: where it was compiled (``"cpu"``, ``"tpu:v5e:2x2"``, ``"gpu:h100"``).
    estimated_seconds: the step time on an accelerator target (see
      :mod:`remat_kit.report.estimate`), None on the local backend.
    estimate_source: how ``estimated_seconds`` was obtained.
    peak: what is live at the compiled gradient's peak
      (:func:`remat_kit.report.explain_peak`), which :meth:`reconcile` sums by kind.
    residuals_before_xla: with ``memory_report(..., before_xla=True)``, the
      jaxpr's residuals (:func:`~remat_kit.report.saved_residuals`): what autodiff
      asks to keep before XLA fuses, reorders and frees; they can add up to more
      than the peak. None otherwise.
  """

  label: str
  backend: str
  compiled: dict[str, Any]
  residuals: list[Residual]
  flops: dict[str, Any]
  live_peak_bytes: int | None = None
  live_peak_note: str = ""
  target: str = "cpu"
  estimated_seconds: float | None = None
  estimate_source: str = ""
  peak: PeakReport | None = None
  residuals_before_xla: list[Residual] | None = None

  def reconcile(self) -> str:
    """How the residuals relate to the compiled peak, in one line.

    For example "peak 108 MiB: activation 59%, backward temporary 30%, ...;
    the residuals listed are 64 MiB (59% of it)": when residuals are a small
    share of the peak, saving fewer of them cannot lower it much.
    """
    if self.peak is None:
      return ""
    total = max(self.peak.peak_bytes, 1)
    parts = ", ".join(f"{k} {100 * b / total:.0f}%" for k, b in self.peak.by_kind.items()
                      if b * 100 >= total)
    res = self.device_activation_bytes
    return (f"peak {format_bytes(self.peak.peak_bytes)} ({self.peak.target}): {parts}; "
            f"the compiled program carries {format_bytes(res)} of activations from the "
            f"forward to the backward pass ({100 * res / total:.0f}% of the peak)")

  @property
  def activation_bytes(self) -> int:
    """Bytes of saved activations (arguments and their views excluded)."""
    return sum(r.bytes for r in self.residuals if r.kind == "activation")

  @property
  def device_activation_bytes(self) -> int:
    """Activation bytes kept on the device, in its memory or on chip (offloaded ones
    excluded)."""
    return sum(r.bytes for r in self.residuals
               if r.kind == "activation" and r.memory != "host")

  @property
  def by_name(self) -> dict[str, int]:
    """Activation bytes per `checkpoint_name` (names only: untagged tensors are in
    :attr:`by_op`)."""
    out: dict[str, int] = {}
    for r in self.residuals:
      if r.kind == "activation" and r.name:
        out[r.name] = out.get(r.name, 0) + r.bytes
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))

  @property
  def by_op(self) -> dict[str, int]:
    """Activation bytes per producing op (the primitive that made each tensor)."""
    out: dict[str, int] = {}
    for r in self.residuals:
      if r.kind == "activation":
        key = r.primitive or "?"
        out[key] = out.get(key, 0) + r.bytes
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))

  @property
  def layers(self) -> int:
    """The largest scan trip count a residual is stacked over (1: no scan)."""
    return max((r.layers for r in self.residuals), default=1)

  @property
  def per_layer_bytes(self) -> int:
    """Activation bytes kept per scanned layer (residuals stacked by scans)."""
    return sum(r.bytes // r.layers for r in self.residuals
               if r.kind == "activation" and r.layers > 1)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serializable dict of everything, totals included."""
    return {
        "label": self.label,
        "backend": self.backend,
        "target": self.target,
        "estimated_seconds": self.estimated_seconds,
        "estimate_source": self.estimate_source,
        "compiled": dict(self.compiled),
        "residuals": [dataclasses.asdict(r) for r in self.residuals],
        "activation_bytes": self.activation_bytes,
        "device_activation_bytes": self.device_activation_bytes,
        "by_name": self.by_name,
        "by_op": self.by_op,
        "layers": self.layers,
        "per_layer_bytes": self.per_layer_bytes,
        "flops": dict(self.flops),
        "live_peak_bytes": self.live_peak_bytes,
        "live_peak_note": self.live_peak_note,
        "peak": self.peak.to_dict() if self.peak is not None else None,
        "residuals_before_xla": (None if self.residuals_before_xla is None else
                                 [dataclasses.asdict(r) for r in self.residuals_before_xla]),
        "reconcile": self.reconcile(),
    }

  def to_json(self, **kwargs: Any) -> str:
    """:meth:`to_dict` as a JSON string.

    Args:
      **kwargs: options of ``json.dumps`` (``indent=1``, ...).
    """
    return json.dumps(self.to_dict(), **kwargs)

  def table(self) -> str:
    """The residual rows and the totals, as text."""
    rows = [[format_bytes(r.bytes), r.kind, r.primitive or "-", ",".join(r.names) or r.name or "-",
             short_layer(r.layer), r.source.split(" (")[0] if r.source else "-",
             ("x".join(map(str, r.shape)) or "()") + " " + r.dtype,
             str(r.layers) if r.layers > 1 else "", r.memory if r.memory != "device" else "",
             r.rule]
            for r in self.residuals]
    out = [f"== {self.label} ({self.target}) ==",
           format_table(["bytes", "kind", "op", "name", "layer", "source", "shape", "layers",
                         "memory", "rule"], rows, align="rllllllrll")]
    c = self.compiled
    out.append(
        f"activations {format_bytes(self.activation_bytes)}"
        + (f" ({format_bytes(self.per_layer_bytes)} per layer over {self.layers} layers)"
           if self.layers > 1 else "") + "; "
        f"compiled temp {format_bytes(c.get('temp_size', 0))}, "
        f"peak {format_bytes(c.get('peak_bytes', 0))}"
        + (f", host temp {format_bytes(c['host_temp_size'])}" if c.get("host_temp_size") else ""))
    f = self.flops
    out.append(f"FLOPs: forward {f['forward']:,}, backward {f['backward']:,}, recompute "
               f"{f['recompute']:,} (+{f['recompute_pct']:.1f}%), total {f['total']:,}")
    live = (format_bytes(self.live_peak_bytes) if self.live_peak_bytes is not None
            else f"n/a ({self.live_peak_note})")
    out.append(f"live peak: {live}")
    if self.peak is not None:
      out.append(self.reconcile())
    if self.estimated_seconds is not None:
      out.append(f"estimated step on {self.target}: {self.estimated_seconds * 1e3:.3f} ms "
                 f"({self.estimate_source})")
    return "\n".join(out)

  def __str__(self) -> str:
    return self.table()


def memory_report(fn: Callable[..., Any], *args: Any, argnums: int | Sequence[int] = 0,
                  label: str | None = None, live: bool = True, target: Any = None,
                  fn_kwargs: Mapping[str, Any] | None = None,
                  static_argnames: Sequence[str] = (), before_xla: bool = False,
                  **stray: Any) -> MemoryReport:
  """Bytes, residuals and FLOPs of the gradient of the scalar function ``fn``.

  Args:
    fn: a scalar loss ``fn(*args, **fn_kwargs)``.
    *args: example arguments (real arrays when ``live``: the step is run).
    argnums: which arguments the gradient is taken with respect to.
    label: a name for the report; the function's name by default.
    live: on GPU/TPU, run the compiled gradient once and read the device's
      peak bytes in use.
    target: where to compile: None for the local backend, or an accelerator
      that need not be here, e.g. ``"tpu:v5e:2x2"`` or ``"gpu:h100"`` (see
      :mod:`remat_kit.targets`); arguments may then be ShapeDtypeStructs.
      An accelerator target adds ``estimated_seconds``.
    fn_kwargs: keyword arguments of ``fn`` (not differentiated). They are never
      mixed with this function's own options, so a loss may take a ``target=``.
    static_argnames: keyword arguments of ``fn`` passed as Python values, not traced
      (a ``train`` flag); strings and other values JAX cannot trace are static anyway.
    before_xla: also list the jaxpr's residuals (``residuals_before_xla``); one
      more trace of ``fn``.

  Returns:
    A :class:`MemoryReport`. Its trace and compile are cached: a following
    :func:`~remat_kit.report.explain_peak` or :func:`~remat_kit.report.lint` of the same
    function, arguments and target compiles nothing.

  Raises:
    TypeError: for a non-callable ``fn``, a ``fn_kwargs`` that is not a dict of
      str keys, or any other keyword argument (the function's go in
      ``fn_kwargs``).
    ValueError: for a target :func:`remat_kit.targets.parse_target` refuses, or an
      ``argnums`` that does not index ``args``.

  Example:
    >>> import jax.numpy as jnp, remat_kit as rk
    >>> def loss(w, x):
    ...   h = rk.checkpoint_name(x @ w, "h")
    ...   return jnp.sum(jnp.sin(h) @ w)
    >>> rep = rk.memory_report(rk.remat(loss, policy="save:h"), jnp.ones((4, 4)),
    ...                        jnp.ones((2, 4)), label="save h")
    >>> rep.by_name, rep.flops["recompute"]  # sin(h) is recomputed: 8 FLOPs
    ({'h': 32}, 8)
    >>> rep.device_activation_bytes <= rep.peak.peak_bytes
    True
  """
  kwargs = _args.fn_kwargs_of("memory_report", fn_kwargs, stray)
  return _report("memory_report", fn, args, kwargs, argnums, label, live, target,
                 static_argnames, before_xla)


def _report(api: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
            argnums: Any, label: str | None, live: bool, target: Any,
            static_argnames: Sequence[str], before_xla: bool) -> MemoryReport:
  """:func:`memory_report` as the readout ``api`` calls it: one compile, its views."""
  t = targets.parse_target(target)
  c = compilation(fn, args, kwargs, target=t, argnums=argnums, api=api,
                  static_argnames=static_argnames)
  label = label if label else getattr(fn, "__name__", "fn")  # (mypy types `or` as Optional)
  peak = peak_of(c, api=api)
  compiled = c.memory()
  sites = c.sites
  residuals = [dataclasses.replace(r, rule=rule_for(r, sites)) for r in c.residuals()]
  before = None
  if before_xla:
    before = [dataclasses.replace(r, rule=rule_for(r, sites))
              for r in saved_residuals(fn, *args, argnums=argnums, fn_kwargs=kwargs,
                                       static_argnames=static_argnames)]
  flops = c.flops()
  peak_live, note = None, ""
  seconds, source = estimate_seconds(flops["total"], compiled, t)
  if not t.is_local:
    note = f"nothing runs for target {t.name!r}: see the compiled peak"
  elif not live:
    note = "not measured (live=False)"
  elif live_peak_bytes() is None:
    note = f"the {jax.default_backend()} backend reports no memory_stats()"
  else:
    call = _args.bind(api, fn, args, kwargs, static_argnames, argnums)
    assert call.argnums is not None
    peak_live, note = _measure_live_peak(jax.grad(call.fn, argnums=call.argnums), call.args,
                                         call.kwargs)
  return MemoryReport(label, compiled["backend"], compiled, residuals, flops, peak_live, note,
                      t.name, seconds, source, peak, before)


def _measure_live_peak(grad: Callable[..., Any], args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> tuple[int | None, str]:
  compiled = jax.jit(grad).lower(*args, **kwargs).compile()
  before = live_peak_bytes() or 0
  jax.block_until_ready(compiled(*args, **kwargs))
  after = live_peak_bytes() or 0
  if after <= before:
    return None, ("an earlier computation in this process peaked higher "
                  f"({format_bytes(before)}); measure each configuration in a fresh process")
  return after, ""


@dataclasses.dataclass
class Comparison:
  """Reports for several functions, side by side.

  Attributes:
    reports: label -> :class:`MemoryReport`, the baseline first.
  """

  reports: dict[str, MemoryReport]

  def to_dict(self) -> dict[str, Any]:
    return {k: r.to_dict() for k, r in self.reports.items()}

  def table(self) -> str:
    base = next(iter(self.reports.values()))
    # TPU compiles often put everything in the peak and report temp 0: compare peaks then.
    key = "temp_size" if base.compiled.get("temp_size") else "peak_bytes"
    rows = []
    for label, r in self.reports.items():
      temp = r.compiled.get("temp_size", 0)
      rel = r.compiled.get(key, 0) / base.compiled[key] if base.compiled.get(key) else float("nan")
      live = format_bytes(r.live_peak_bytes) if r.live_peak_bytes is not None else "n/a"
      est = f"{r.estimated_seconds * 1e3:.3f}" if r.estimated_seconds is not None else "n/a"
      rows.append([label, format_bytes(r.activation_bytes), format_bytes(temp), f"{rel:.2f}",
                   format_bytes(r.compiled.get("peak_bytes", 0)), live,
                   f"{r.flops['recompute_pct']:.1f}", est])
    return format_table(["policy", "activations", "temp", "x " + key.split("_")[0], "peak",
                         "live peak",
                         "+FLOPs %", f"est. ms ({base.target})"], rows, align="lrrrrrrr")

  def __str__(self) -> str:
    return self.table()


def compare(fns: Mapping[str, Callable[..., Any]], *args: Any, argnums: int | Sequence[int] = 0,
            live: bool = True, verbose: bool = False, target: Any = None,
            fn_kwargs: Mapping[str, Any] | None = None, static_argnames: Sequence[str] = (),
            **stray: Any) -> Comparison:
  """:func:`memory_report` for each ``{label: fn}`` on the same arguments.

  The first entry is the baseline of the "x temp" column; ``fn_kwargs`` go to every
  function.

  Args:
    fns: ``{label: fn}``, each a scalar loss ``fn(*args, **fn_kwargs)``; the
      first is the baseline.
    *args: example arguments shared by every function (as :func:`memory_report`'s).
    argnums: which arguments the gradients are taken with respect to.
    live: on GPU/TPU, run each compiled gradient once and read the device's
      peak bytes in use.
    verbose: print one progress line per function.
    target: where to compile (as :func:`memory_report`'s); None for the local
      backend.
    fn_kwargs: keyword arguments of every function (not differentiated).
    static_argnames: those of ``fn_kwargs`` passed as Python values (as
      :func:`memory_report`'s).

  Returns:
    A :class:`Comparison`: ``.reports[label]`` and, as ``str()``, a table.

  Raises:
    TypeError: if ``fns`` is not a non-empty dict, or as :func:`memory_report`.
  """
  kwargs = _args.fn_kwargs_of("compare", fn_kwargs, stray)
  if not isinstance(fns, Mapping) or not fns:
    raise TypeError(f"`compare`: `fns` must be a non-empty dict of label -> function, got "
                    f"{fns!r}.")
  reports = {}
  for i, (label, fn) in enumerate(fns.items()):
    if verbose:
      print(f"[{i + 1}/{len(fns)}] {label}", flush=True)
    reports[label] = _report("compare", fn, args, kwargs, argnums, label, live, target,
                             static_argnames, False)
  return Comparison(reports)


@dataclasses.dataclass
class ResidualDiff:
  """What one report keeps that the other does not (by label, shape, dtype and kind).

  Attributes:
    a: the first report's label.
    b: the second report's label.
    only_a: the residuals only the first keeps.
    only_b: the residuals only the second keeps.
  """

  a: str
  b: str
  only_a: list[Residual]
  only_b: list[Residual]

  @property
  def bytes_delta(self) -> int:
    """Activation bytes of b minus those of a."""
    return (sum(r.bytes for r in self.only_b if r.kind == "activation")
            - sum(r.bytes for r in self.only_a if r.kind == "activation"))

  def to_dict(self) -> dict[str, Any]:
    return {"a": self.a, "b": self.b, "bytes_delta": self.bytes_delta,
            "only_a": [dataclasses.asdict(r) for r in self.only_a],
            "only_b": [dataclasses.asdict(r) for r in self.only_b]}

  def __str__(self) -> str:
    rows = [[f"only {self.a}", r.label, "x".join(map(str, r.shape)), r.dtype,
             format_bytes(r.bytes)] for r in self.only_a if r.kind == "activation"]
    rows += [[f"only {self.b}", r.label, "x".join(map(str, r.shape)), r.dtype,
              format_bytes(r.bytes)] for r in self.only_b if r.kind == "activation"]
    head = (f"{self.b} keeps {format_bytes(abs(self.bytes_delta))} "
            f"{'more' if self.bytes_delta >= 0 else 'less'} than {self.a}")
    return head + "\n" + format_table(["kept by", "label", "shape", "dtype", "bytes"], rows,
                                      align="lllll")


def _unmatched(xs: list[Residual], ys: list[Residual]) -> list[Residual]:
  """Rows of ``xs`` with no counterpart in ``ys`` (by label, shape, dtype and kind)."""
  key = lambda r: (r.label, r.shape, r.dtype, r.kind)
  rest = [key(r) for r in ys]
  out = []
  for r in xs:
    if key(r) in rest:
      rest.remove(key(r))
    else:
      out.append(r)
  return out


def diff(report_a: MemoryReport, report_b: MemoryReport) -> ResidualDiff:
  """What ``report_a`` keeps that ``report_b`` recomputes, and the reverse.

  Residuals match by label (name, else primitive), shape and dtype, counted
  with multiplicity.

  Args:
    report_a: a :class:`MemoryReport`.
    report_b: another, e.g. of the same function under another policy.

  Returns:
    A :class:`ResidualDiff`; its ``bytes_delta`` is b's activation bytes
    minus a's, over the unmatched rows.

  Raises:
    TypeError: if either report is not a :class:`MemoryReport`.
  """
  for arg, r in (("report_a", report_a), ("report_b", report_b)):
    if not isinstance(r, MemoryReport):
      raise TypeError(f"`diff`: `{arg}` must be a MemoryReport, got {type(r).__name__}.")
  only_a = _unmatched(report_a.residuals, report_b.residuals)
  only_b = _unmatched(report_b.residuals, report_a.residuals)
  return ResidualDiff(report_a.label, report_b.label, only_a, only_b)
