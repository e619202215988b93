"""Command line: ``python -m remat_kit {report,peak,timeline,lint,policies,versions}``.

``report FILE.py:NAME`` imports ``FILE.py`` and calls ``NAME()``, which must
return ``(loss_fn, args)`` (one report) or ``({label: loss_fn, ...}, args)``
(a comparison); ``args`` is a tuple of example arguments. The table is
printed; ``--json PATH`` also writes the report as JSON. ``peak`` prints what
is live at the compiled gradient's peak (``rk.explain_peak``); ``timeline``
writes the memory at every point of it as a page (``--out t.html``) and a
picture (``--png t.png``), one timeline per function (``rk.memory_timeline``).
Each takes
``--target`` (``tpu:v5e:2x2``, ``gpu:h100``: compiled without the device).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _load(target: str) -> Callable[[], Any]:
  path, sep, name = target.rpartition(":")
  if not sep or not path or not name:
    raise SystemExit(f"remat_kit: expected FILE.py:FUNCTION, got {target!r}.")
  file = Path(path)
  if not file.is_file():
    raise SystemExit(f"remat_kit: no such file {str(file)!r}.")
  spec = importlib.util.spec_from_file_location(file.stem, file)
  if spec is None or spec.loader is None:
    raise SystemExit(f"remat_kit: cannot import {str(file)!r}.")
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, str(file.parent.resolve()))
  spec.loader.exec_module(module)
  fn = getattr(module, name, None)
  if not callable(fn):
    found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
    raise SystemExit(f"remat_kit: {str(file)!r} has no function {name!r}; it has {found}.")
  return fn


def _case(target: str) -> tuple[Any, tuple[Any, ...]]:
  out = _load(target)()
  if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], (tuple, list))):
    raise SystemExit(
        f"remat_kit: {target} must return (loss_fn, args) or ({{label: loss_fn}}, args) with "
        f"`args` a tuple; got {type(out).__name__}.")
  return out[0], tuple(out[1])


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  from remat_kit import policies, report

  parser = argparse.ArgumentParser(prog="python -m remat_kit", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  rep = sub.add_parser("report", help="memory, residuals and FLOPs of a loss function")
  rep.add_argument("target", help="FILE.py:FUNCTION returning (loss_fn, args)")
  rep.add_argument("--json", help="also write the report to this JSON file")
  rep.add_argument("--argnums", type=int, nargs="+", default=[0],
                   help="arguments to differentiate (default: 0)")
  rep.add_argument("--target", dest="compile_target", default=None,
                   help="compile for this target instead of the local backend, e.g. "
                        "tpu:v5e:2x2 or gpu:h100 (deviceless; see remat_kit.targets)")
  pk = sub.add_parser("peak", help="what is live at the compiled gradient's peak")
  pk.add_argument("target", help="FILE.py:FUNCTION returning (loss_fn, args)")
  pk.add_argument("--top", type=int, default=20, help="rows of their own (default 20)")
  pk.add_argument("--json", help="also write the breakdown to this JSON file")
  pk.add_argument("--argnums", type=int, nargs="+", default=[0],
                  help="arguments to differentiate (default: 0)")
  tl = sub.add_parser("timeline", help="memory over the compiled schedule: page and PNG")
  tl.add_argument("target", help="FILE.py:FUNCTION returning (loss_fn, args)")
  tl.add_argument("--out", default="timeline.html", help="the page (default timeline.html)")
  tl.add_argument("--png", help="also draw the chart to this PNG")
  tl.add_argument("--json", help="also write the timelines to this JSON file")
  tl.add_argument("--argnums", type=int, nargs="+", default=[0],
                  help="arguments to differentiate (default: 0)")
  lnt = sub.add_parser("lint", help="warn about remat that saves nothing useful")
  lnt.add_argument("target", help="FILE.py:FUNCTION returning (loss_fn, args)")
  for p in (pk, tl, lnt):
    p.add_argument("--target", dest="compile_target", default=None,
                   help="compile for this target instead of the local backend")
  sub.add_parser("policies", help="list the preset policy names")
  sub.add_parser("versions", help="what remat_kit found in the installed JAX")
  args = parser.parse_args(argv)

  if args.command == "versions":
    from remat_kit import _jax, targets

    for key, value in _jax.version_report().items():
      print(f"{key:64s} {value}")
    for platform in ("tpu", "gpu"):
      c = targets.compiler(platform)
      what = f"{c.package} {c.version}" if c.available else f"none ({c.missing})"
      print(f"{'deviceless ' + platform + ' compiler':64s} {what}")
      if c.note:
        print(f"{'  note':64s} {c.note}")
    lock = Path(sys.prefix, ".lock")
    if lock.is_file():
      print(f"{'installed from the lock':64s} {lock.read_text().strip()}")
    return 0

  if args.command == "policies":
    for name, desc in sorted(policies.registered().items()):
      print(f"{name:32s} {desc}")
    return 0
  fn, fn_args = _case(args.target)
  if args.command == "lint":
    fns = fn if isinstance(fn, dict) else {args.target: fn}
    found = 0
    for label, f in fns.items():
      for w in report.lint(f, *fn_args, target=args.compile_target):
        print(f"{label}: {w}")
        found += 1
    if not found:
      print("no warnings")
    return 1 if found else 0
  argnums = args.argnums[0] if len(args.argnums) == 1 else tuple(args.argnums)
  if args.command == "timeline":
    fns = fn if isinstance(fn, dict) else {args.target: fn}
    timeline = report.memory_timeline(fns, *fn_args, target=args.compile_target,
                                      argnums=argnums)
    for label, peak in timeline.peaks.items():
      print(f"{label}: peak {report.table.format_bytes(peak)} ({peak:,} bytes) on {timeline.target}")
    timeline.to_html(args.out)
    print(f"wrote {args.out}")
    if args.png:
      print(f"wrote {timeline.to_png(args.png)}")
    if args.json:
      Path(args.json).write_text(timeline.to_json(indent=1))
      print(f"wrote {args.json}")
    return 0
  if args.command == "peak":
    if args.top < 1:
      raise SystemExit(f"remat_kit: --top must be at least 1, got {args.top}.")
    fns = fn if isinstance(fn, dict) else {args.target: fn}
    out = {}
    for label, f in fns.items():
      peak_rep = report.explain_peak(f, *fn_args, target=args.compile_target, top=args.top,
                                     argnums=argnums)
      print(f"{label}\n{peak_rep.table()}\n")
      out[label] = peak_rep.to_dict()
    if args.json:
      Path(args.json).write_text(json.dumps(out, indent=1))
      print(f"wrote {args.json}")
    return 0
  if isinstance(fn, dict):
    result: Any = report.compare(fn, *fn_args, argnums=argnums, verbose=True,
                                 target=args.compile_target)
    for r in result.reports.values():
      print(r.table(), end="\n\n")
  else:
    result = report.memory_report(fn, *fn_args, argnums=argnums, label=args.target,
                                  target=args.compile_target)
  print(result.table())
  if args.json:
    Path(args.json).write_text(json.dumps(result.to_dict(), indent=1))
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
