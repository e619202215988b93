"""Reading XLA's dumps: buffer assignment, live ranges and the optimized HLO.

``compile(compiler_options={"xla_dump_to": dir})`` writes, on CPU, GPU and TPU
alike, ``*after_optimizations.txt`` (the scheduled module, with each
instruction's ``op_name`` and source frames), ``*-buffer-assignment.txt``
(allocations, and each value's offset and size in one) and ``*-live-range.txt``
(each value's live range over the schedule). Used by
:mod:`remat_kit.report.peak`.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

__all__ = ["Alloc", "Program", "allocations", "live_ranges", "read"]


def read(d: str, suffix: str) -> str:
  files = glob.glob(os.path.join(d, "*" + suffix))
  if not files:
    raise RuntimeError(f"`explain_peak`: the compiler wrote no `*{suffix}` dump; this JAX/XLA "
                       "does not support the dumps explain_peak reads. Please report it.")
  with open(max(files, key=os.path.getsize)) as f:
    return f.read()


@dataclasses.dataclass
class Alloc:
  index: int
  size: int
  resident: bool  # a parameter, output or constant: allocated for the whole step
  parameter: int | None
  constant: bool
  color: int
  values: list[tuple[str, int, int]]  # (value, offset, size)


_ALLOC = re.compile(r"^allocation (\d+): size (\d+)(.*):$")
_VALUE = re.compile(r"^ value: <\d+ (\S+) @\d+> \(size=(\d+),offset=(\d+)\)")


def allocations(text: str) -> list[Alloc]:
  out: list[Alloc] = []
  for line in text.splitlines():
    m = _ALLOC.match(line)
    if m:
      flags = m.group(3)
      if "thread-local" in flags:
        out.append(Alloc(int(m.group(1)), 0, False, None, False, -1, []))
        continue
      p = re.search(r"parameter (\d+)", flags)
      c = re.search(r"color (\d+)", flags)
      out.append(Alloc(int(m.group(1)), int(m.group(2)), "preallocated-temp" not in flags,
                        int(p.group(1)) if p else None, "constant" in flags,
                        int(c.group(1)) if c else 0, []))
      continue
    m = _VALUE.match(line)
    if m and out and out[-1].color >= 0:
      out[-1].values.append((_key(m.group(1)), int(m.group(3)), int(m.group(2))))
  return out


def _key(value: str) -> str:
  return value[:-2] if value.endswith("{}") else value


_RANGE = re.compile(r"^\s+(\S+):(\d+)-(\d+)$")


def live_ranges(text: str) -> tuple[dict[str, tuple[int, int]], int]:
  m = re.search(r"HloLiveRange \(max (\d+)\)", text)
  horizon = int(m.group(1)) if m else 0
  ranges = {}
  section = False
  for line in text.splitlines():
    if "BufferLiveRange:" in line:
      section = True
      continue
    if section:
      r = _RANGE.match(line)
      if not r:
        if line.strip().startswith("Live ranges"):
          break
        continue
      ranges[_key(r.group(1))] = (int(r.group(2)), int(r.group(3)))
  sequence = re.findall(r"^\s+(\d+):(\S+)$", text, flags=re.M)
  return ranges, max(horizon, len(sequence))


class Program:
  """Instructions of the optimized HLO module: opcode, op_name, source line."""

  _INSTR = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = ")

  def __init__(self, text: str):
    self.info: dict[str, tuple[str, str, str | None]] = {}
    self.users: dict[str, list[str]] = {}
    self._operands: dict[str, list[str]] = {}
    self.root: list[str] = []
    files, funcs, locs, frames = {}, {}, {}, {}
    section = None
    entry = False
    roots: dict[str, str] = {}  # computation -> its ROOT instruction
    calls: dict[str, str] = {}  # fusion instruction -> the computation it calls
    computation = None
    for line in text.splitlines():
      head = line.strip()
      if head in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
        section = head
        continue
      if section and head and head[0].isdigit():
        k, rest = head.split(" ", 1)
        if section == "FileNames":
          files[int(k)] = rest.strip('"')
        elif section == "FunctionNames":
          funcs[int(k)] = rest.strip('"')
        elif section == "FileLocations":
          f = dict(re.findall(r"(\w+)=(\d+)", rest))
          locs[int(k)] = (int(f.get("file_name_id", 0)), int(f.get("function_name_id", 0)),
                          int(f.get("line", 0)))
        else:
          f = dict(re.findall(r"(\w+)=(\d+)", rest))
          frames[int(k)] = (int(f.get("file_location_id", 0)), int(f.get("parent_frame_id", 0)))
        continue
      section = None
      if head.startswith("ENTRY"):
        entry = True
      c = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
      if c and line.rstrip().endswith("{"):
        computation = c.group(1)
      m = self._INSTR.match(line)
      if not m:
        continue
      if m.group(1) and computation:
        roots[computation] = m.group(2)
      called = re.search(r"calls=%([\w.\-]+)", line)
      if called and " fusion(" in line:
        calls[m.group(2)] = called.group(1)
      rest = line[m.end():]
      opcode = _opcode(rest)
      op_name = re.search(r'op_name="([^"]*)"', line)
      frame = re.search(r"stack_frame_id=(\d+)", line)
      src = re.search(r'source_file="([^"]*)" source_line=(\d+)', line)
      source = (f"{os.path.basename(src.group(1))}:{src.group(2)}" if src else
                self._source(int(frame.group(1)), files, funcs, locs, frames) if frame else None)
      self.info[m.group(2)] = (opcode, op_name.group(1) if op_name else "", source)
      args = rest[rest.find(opcode + "(") + len(opcode):]
      operands = _operand_names(args)
      self._operands[m.group(2)] = operands
      for operand in operands:
        self.users.setdefault(operand, []).append(m.group(2))
      if entry and m.group(1):
        self.root = (re.findall(r"%([\w.\-]+)", args.split("),")[0]) if opcode == "tuple"
                     else [m.group(2)])
        entry = False
    # A fusion is named by what its called computation computes (its ROOT, through
    # bitcasts and copies): "exp" for a fused dot+exp, not the dot.
    for instr, comp in calls.items():
      root = roots.get(comp)
      while root and self.info.get(root, ("",))[0] in ("bitcast", "copy", "tuple") and \
          self._first_operand(root):
        root = self._first_operand(root)
      if root and self.info.get(root, ("", ""))[1]:
        opcode = self.info[instr][0]
        self.info[instr] = (opcode, self.info[root][1], self.info[root][2] or self.info[instr][2])

  def _first_operand(self, root: str) -> str | None:
    """The first operand of ``root`` (what a bitcast or copy passes on)."""
    return self._operands.get(root, [None])[0]

  @staticmethod
  def _source(frame: int, files: dict, funcs: dict, locs: dict, frames: dict) -> str | None:
    first = None
    seen = set()
    while frame in frames and frame not in seen:
      seen.add(frame)
      loc, parent = frames[frame]
      if loc in locs:
        f, fn, line = locs[loc]
        path = files.get(f, "?")
        text = f"{os.path.basename(path)}:{line} ({funcs.get(fn, '?')})"
        first = first or text
        if not any(s in path for s in _LIBRARY):
          return text
      frame = parent - 1  # printed parents are one more than the frame they name
    return first


_LIBRARY = (os.sep + "remat_kit" + os.sep, os.sep + "flax" + os.sep, os.sep + "jax" + os.sep,
            os.sep + "optax" + os.sep)


def _operand_names(args: str) -> list[str]:
  """The ``%name`` operands in ``(...)`` at the start of ``args``."""
  depth = 0
  for i, ch in enumerate(args):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      return re.findall(r"%([\w.\-]+)", args[:i])
  return []


def _opcode(rest: str) -> str:
  """The opcode after an instruction's shape (which may be a parenthesized tuple)."""
  end = rest.find(" ")
  if rest.startswith("("):
    depth = 0
    for end, ch in enumerate(rest, start=1):  # noqa: B007 - `end` is used after the loop
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
  m = re.match(r"\s*([\w\-]+)\(", rest[end:])
  return m.group(1) if m else "?"
