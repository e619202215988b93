"""Every parse of XLA's text: the dumps and the optimized HLO.

``compile(compiler_options={"xla_dump_to": dir})`` writes, on CPU, GPU and TPU
alike, ``*after_optimizations.txt`` (the scheduled module, with each
instruction's ``op_name`` and source frames), ``*-buffer-assignment.txt``
(allocations, and each value's offset and size in one) and ``*-live-range.txt``
(each value's live range over the schedule). :mod:`remat_kit.report.peak`
reads them; :func:`bytes_moved` reads ``compiled.as_text()`` for the step-time
estimate. ``tests/fixtures/xla`` holds golden dumps from CPU, ``tpu:v5e:2x2``
and ``gpu:h100`` compiles on the oldest and newest admitted JAX, which
``tests/test__xla.py`` parses against the compiler's own memory figures.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import re
from collections.abc import Callable
from typing import Any

__all__ = ["Alloc", "Program", "allocations", "bytes_moved", "hbm_bytes_moved", "live_ranges",
           "read"]


# The HLO opcodes that pass their operand's data on unchanged (the same values, maybe
# another shape or memory), and those whose result is a view of their operand.
PASS_ON = frozenset("bitcast copy copy-start copy-done reshape reduce-precision".split())
VIEWS = frozenset("get-tuple-element bitcast copy dynamic-slice slice reshape tuple "
                  "while".split())


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
_VALUE = re.compile(r"^ value: <\d+ (\S+)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\)")


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
    self._shapes: dict[str, str] = {}  # instruction -> its shape text
    self.users: dict[str, list[str]] = {}
    self._operands: dict[str, list[str]] = {}
    self.root: list[str] = []
    files, funcs, locs, frames = {}, {}, {}, {}
    section = None
    entry = False
    roots: dict[str, str] = {}  # computation -> its ROOT instruction
    calls: dict[str, str] = {}  # fusion instruction -> the computation it calls
    computation = None
    self.calls: dict[str, str] = {}  # fusion (or call) instruction -> computation it calls
    self.bodies: dict[str, str] = {}  # while instruction -> its body computation
    self.conds: dict[str, str] = {}  # while instruction -> its condition computation
    self.trip_counts: dict[str, int] = {}  # while instruction -> its known trip count
    self.roots: dict[str, str] = {}  # computation -> its ROOT instruction
    self.params: dict[str, dict[int, str]] = {}  # computation -> parameter index -> instr
    self.comp_of: dict[str, str] = {}  # instruction -> the computation it lies in
    self.gte_index: dict[str, int] = {}  # get-tuple-element -> the index it takes
    self._entry: str | None = None
    self._by_comp: dict[str, list[str]] | None = None
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
        em = re.match(r"ENTRY\s+%?([\w.\-]+)", head)
        self._entry = em.group(1) if em else None
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
      if computation:
        self.comp_of[m.group(2)] = computation
      if called:
        self.calls[m.group(2)] = called.group(1)
      body = re.search(r"body=%?([\w.\-]+)", line)
      if body and opcode == "while":
        self.bodies[m.group(2)] = body.group(1)
        cond = re.search(r"condition=%?([\w.\-]+)", line)
        if cond:
          self.conds[m.group(2)] = cond.group(1)
        trips = re.search(r'known_trip_count\W+n\W+(\d+)', line)
        if trips:
          self.trip_counts[m.group(2)] = int(trips.group(1))
      gte = re.search(r"\bindex=(\d+)", rest) if opcode == "get-tuple-element" else None
      if gte:
        self.gte_index[m.group(2)] = int(gte.group(1))
      if opcode == "parameter" and computation:
        index = re.search(r"parameter\((\d+)\)", rest)
        if index:
          self.params.setdefault(computation, {})[int(index.group(1))] = m.group(2)
      op_name = re.search(r'op_name="([^"]*)"', line)
      frame = re.search(r"stack_frame_id=(\d+)", line)
      src = re.search(r'source_file="([^"]*)" source_line=(\d+)', line)
      source = (f"{os.path.basename(src.group(1))}:{src.group(2)}" if src else
                self._source(int(frame.group(1)), files, funcs, locs, frames) if frame else None)
      self.info[m.group(2)] = (opcode, op_name.group(1) if op_name else "", source)
      self._shapes[m.group(2)] = rest[:rest.find(opcode + "(")] if opcode != "?" else ""
      args = rest[rest.find(opcode + "(") + len(opcode):]
      operands = _operand_names(args)
      self._operands[m.group(2)] = operands
      for operand in operands:
        self.users.setdefault(operand, []).append(m.group(2))
      if entry and m.group(1):
        self.root = (re.findall(r"%([\w.\-]+)", args.split("),")[0]) if opcode == "tuple"
                     else [m.group(2)])
        entry = False
    self.roots.update(roots)
    self._raw = dict(self.info)  # each instruction's own metadata, before fusions are named
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

  def loop_of(self, instr: str) -> str | None:
    """The while loop whose body or condition ``instr`` lies in, or None."""
    comp = self.comp_of.get(instr)
    return next((w for w in self.bodies
                 if comp in (self.bodies[w], self.conds.get(w))), None)

  def own(self, instr: str) -> tuple[str, str, str | None]:
    """An instruction's own ``(opcode, op_name, source)`` (a fusion's is not its root's)."""
    return self._raw.get(instr, ("?", "", None))

  def producer(self, value: str, nbytes: int | None = None) -> str | None:
    """The instruction whose computation made the data ``value`` holds.

    Followed into fusions and calls (to their root, or the tuple element), out of a
    fused computation's parameters (to the fusion's operand), through tuples,
    get-tuple-element, a while loop's output (to its body's), bitcasts, copies
    (``copy-start``/``copy-done`` too) and reshapes, and from a
    ``dynamic-update-slice`` (a scan stacking its iterations' values) to the update it
    writes. None where the chain leaves what the dump describes.
    """
    instr, _, tail = value.partition("{")
    index = int(tail.rstrip("}").split(",")[0]) if tail.rstrip("}").split(",")[0].isdigit() \
        else None
    callers: dict[str, str] = {}
    for f, comp in self.calls.items():
      callers.setdefault(comp, f)
    for _ in range(64):
      opcode = self.own(instr)[0]
      ops = self._operands.get(instr, [])
      if opcode == "async-done" and ops:  # an async fusion: its start calls the fusion
        instr = ops[0]
        continue
      if opcode in ("fusion", "call", "async-start") and instr in self.calls:
        root = self.roots.get(self.calls[instr])
        if root is None:
          return instr
        instr = root
        continue
      if opcode == "tuple" and index is None and nbytes is not None:
        sized = [o for o in ops if _shape_bytes(self._shapes.get(o, "")) == nbytes]
        if len(sized) == 1:
          instr = sized[0]
          continue
      if opcode == "tuple" and index is not None and index < len(ops):
        instr, index = ops[index], None
        continue
      if opcode == "get-tuple-element" and ops:
        instr, index = ops[0], self.gte_index.get(instr)
        continue
      if opcode == "while" and instr in self.bodies:
        root = self.roots.get(self.bodies[instr])
        if root is None:
          return instr
        instr = root
        continue
      if opcode == "parameter":
        home = self.comp_of.get(instr, "")
        caller = callers.get(home)
        number = next((i for i, x in self.params.get(home, {}).items() if x == instr), None)
        if caller is None or number is None:
          return instr
        caller_ops = self._operands.get(caller, [])
        if number >= len(caller_ops):
          return instr
        instr = caller_ops[number]
        continue
      if opcode in PASS_ON and ops:  # JAX marks what a remat saves with a reduce-precision
        instr, index = ops[0], None
        continue
      if opcode == "dynamic-update-slice" and len(ops) > 1:
        instr, index = ops[1], None
        nbytes = _shape_bytes(self._shapes.get(instr, "")) or nbytes  # the slice's size now
        continue
      return instr
    return instr

  def entry_computations(self) -> set[str]:
    """The entry computation's name (a set, for membership tests)."""
    return {self._entry} if self._entry else set()

  def shape_text(self, instr: str) -> str:
    """An instruction's result shape, as the dump prints it."""
    return self._shapes.get(instr, "")

  def stacked_update(self, instr: str, nbytes: int) -> str | None:
    """For a scan body's kernel that writes a layer's slice into a stacked buffer of
    ``nbytes`` bytes (a fusion whose ``dynamic-update-slice`` makes that buffer): what
    made the slice it writes, followed by :meth:`producer`. None where there is none."""
    comp = self.calls.get(instr)
    if comp is None:
      return None
    # An async wrapper computation calls the fusion in turn.
    inner = [x for x in self.instructions(comp) if x in self.calls and x != instr]
    comps = [comp] + [self.calls[x] for x in inner]
    for c in comps:
      for x in self.instructions(c):
        if self.own(x)[0] == "dynamic-update-slice" and \
            _shape_bytes(self._shapes.get(x, "")) == nbytes:
          ops = self._operands.get(x, [])
          if len(ops) > 1:  # a kernel of several outputs: the one of the slice's size
            return self.producer(ops[1], _shape_bytes(self._shapes.get(ops[1], "")))
    return None

  def instructions(self, comp: str) -> list[str]:
    """The instructions of one computation, in the dump's order."""
    if self._by_comp is None:
      self._by_comp = {}
      for x, c in self.comp_of.items():
        self._by_comp.setdefault(c, []).append(x)
    return self._by_comp.get(comp, [])

  def feeds_dot_reduce(self, value: str) -> bool:
    """Whether a reader of ``value`` reduces it as a matmul's partial sums (XLA's split-K:
    the contraction split across a leading dimension, summed by a ``reduce`` whose
    op_name is the ``dot_general``)."""
    callers: dict[str, str] = {}
    for f, comp in self.calls.items():
      callers.setdefault(comp, f)
    frontier, seen = [value.split("{")[0]], set()
    for _ in range(6):
      nxt = []
      for instr in frontier:
        for user in self.users.get(instr, []):
          opcode, op_name, _ = self.own(user)
          if opcode == "reduce" and op_name.rsplit("/", 1)[-1] == "dot_general":
            return True
          if user in seen:
            continue
          seen.add(user)
          if opcode in ("fusion", "call") and user in self.calls:
            comp = self.calls[user]
            for k, operand in enumerate(self._operands.get(user, [])):
              if operand == instr and k in self.params.get(comp, {}):
                nxt.append(self.params[comp][k])
          elif opcode in ("bitcast", "copy", "get-tuple-element", "tuple", "reshape"):
            nxt.append(user)
      frontier = nxt
    return False

  def shape_of(self, value: str) -> tuple[str, tuple[int, ...]] | None:
    """``(dtype, dims)`` of a buffer value (``"%fusion.3"`` or a tuple element
    ``"while.2{1}"``), with numpy's dtype name; None where the text does not say."""
    instr, _, index = value.partition("{")
    text = self._shapes.get(instr, "")
    arrays = _SHAPE.findall(text)
    if index:
      path = [int(i) for i in index.rstrip("}").split(",") if i.strip()]
      # A flat tuple (the common case: while loops and multi-output fusions); layouts
      # such as {1,0:T(8,128)S(1)} hold parentheses of their own.
      nested = re.sub(r"\{[^}]*\}", "", text).count("(") > 1
      if len(path) != 1 or path[0] >= len(arrays) or nested:
        return None
      arrays = [arrays[path[0]]]
    if len(arrays) != 1:
      return None
    dtype, dims, _ = arrays[0]
    return _NUMPY.get(dtype, dtype), tuple(int(d) for d in dims.split(",") if d)

  def operands_of(self, instr: str) -> list[str]:
    """The instructions ``instr`` reads (a fusion's: those it is called with)."""
    return list(self._operands.get(instr, []))

  def argument_of(self, instr: str) -> int | None:
    """The number of the entry parameter ``instr`` is a cast or a view of (through
    converts, bitcasts, copies, reshapes, transposes and fusions of them), or None."""
    callers = {comp: f for f, comp in self.calls.items()}
    for _ in range(16):
      opcode = self.own(instr)[0]
      comp = self.comp_of.get(instr, "")
      if opcode == "parameter":
        number = next((i for i, x in self.params.get(comp, {}).items() if x == instr), None)
        if comp == self._entry or number is None:
          return number
        operands = self._operands.get(callers.get(comp, ""), [])
        if number >= len(operands):
          return None
        instr = operands[number]
      elif opcode in ("fusion", "call") and instr in self.calls:
        root = self.roots.get(self.calls[instr])
        if root is None:
          return None
        instr = root
      elif opcode in ("convert", "bitcast", "copy", "reshape", "transpose", "copy-start",
                      "copy-done", "get-tuple-element") and self._operands.get(instr):
        instr = self._operands[instr][0]
      else:
        return None
    return None

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
        if any(s in path for s in _USER) or not any(s in path for s in _LIBRARY):
          return text
      frame = parent - 1  # printed parents are one more than the frame they name
    return first


_LIBRARY = (os.sep + "remat_kit" + os.sep, os.sep + "flax" + os.sep, os.sep + "jax" + os.sep,
            os.sep + "optax" + os.sep)
# remat_kit's reference models are user code: a row points at the model's line.
_USER = (os.sep + "remat_kit" + os.sep + "models" + os.sep,)


def _operand_names(args: str) -> list[str]:
  """The ``%name`` operands in ``(...)`` at the start of ``args``."""
  depth = 0
  for i, ch in enumerate(args):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      return re.findall(r"%([\w.\-]+)", args[:i])
  return re.findall(r"%([\w.\-]+)", args)  # no closing paren: every name on the line


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


# --------------------------------------------------------------------------
# HBM bytes the compiled program moves.
# --------------------------------------------------------------------------
_ITEMSIZE = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
             "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_NUMPY = {"pred": "bool", "s8": "int8", "u8": "uint8", "s16": "int16", "u16": "uint16",
          "f16": "float16", "bf16": "bfloat16", "s32": "int32", "u32": "uint32",
          "f32": "float32", "s64": "int64", "u64": "uint64", "f64": "float64",
          "c64": "complex64", "c128": "complex128", "f8e4m3fn": "float8_e4m3fn",
          "f8e5m2": "float8_e5m2"}
_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\](\{[^}]*\})?")
_HOST_SPACE = "S(5)"  # XLA's host memory space, in a layout: {1,0:T(8,128)S(5)}
# Ops whose operands and result cross HBM: fused kernels, library calls, copies.
_MOVING = ("fusion", "custom-call", "convolution", "dot", "copy", "copy-start", "all-gather",
           "all-reduce", "reduce-scatter", "dynamic-update-slice", "dynamic-slice", "scatter",
           "gather", "reduce", "transpose", "sort")


def _split_bytes(text: str) -> tuple[int, int]:
  """``(device bytes, host bytes)`` of the arrays in a shape text; an array whose layout
  names the host memory space ``S(5)`` counts as host."""
  dev = host = 0
  for dtype, dims, layout in _SHAPE.findall(text):
    size = _ITEMSIZE.get(dtype)
    if size is None:
      continue
    n = 1
    for d in dims.split(","):
      if d:
        n *= int(d)
    if _HOST_SPACE in layout:
      host += n * size
    else:
      dev += n * size
  return dev, host


def _shape_bytes(text: str) -> int:
  return sum(_split_bytes(text))


def _kernel_bytes(op: str, rhs: str, op_m: Any, table: dict[str, str],
                  comps: dict[str, list[tuple[str, str]]],
                  param_reads: Callable[[str], dict[int, int]]) -> list[tuple[int, bool]]:
  """What one top-level kernel moves: ``(bytes, over the host link)`` pairs."""
  operands = [_split_bytes(table.get(o, "")) for o in _operand_names("(" + rhs[op_m.end():])]
  sizes = [(d + h, h > 0) for d, h in operands]
  result = op_m.group(1)
  if op == "copy-start":  # (destination, source alias, context): only the destination is new
    first = _SHAPE.search(result)
    result = first.group(0) if first else ""
  d, h = _split_bytes(result)
  out = (d + h, h > 0)
  callee = re.search(r"calls=%?([\w.\-]+)", rhs)
  if op == "fusion" and callee:
    sliced = param_reads(callee.group(1))
    sizes = [(sliced.get(i, b), on_host) for i, (b, on_host) in enumerate(sizes)]
    root = next((r for n, r in reversed(comps.get(callee.group(1), ()))), "")
    if " dynamic-update-slice(" in root:
      # Written in place: the update operands are read, and written into the buffer
      # (over the host link when the buffer lives there).
      return [(b, on_host or out[1]) for b, on_host in sizes]
    return [out, *sizes]
  if "dynamic_update_slice" in rhs or op == "dynamic-update-slice":
    # In place: the big buffer is neither read nor rewritten, only the update.
    big = max(range(len(sizes)), key=lambda i: sizes[i][0], default=None)
    rest = [s for i, s in enumerate(sizes) if i != big]
    into_host = big is not None and sizes[big][1]
    return [pair for b, on_host in rest for pair in ((b, on_host), (b, on_host or into_host))]
  if "dynamic_slice" in rhs or op == "dynamic-slice":
    from_host = any(on_host for _, on_host in sizes)
    return [(out[0], from_host), out]  # reads the slice, writes it
  return [out, *sizes]


def hbm_bytes_moved(hlo_text: str) -> int:
  """HBM bytes of :func:`bytes_moved`: what the estimate divides by HBM bandwidth."""
  return bytes_moved(hlo_text)[0]


def bytes_moved(hlo_text: str) -> tuple[int, int]:
  """``(HBM bytes, host-link bytes)`` read and written by the top-level kernels of a
  compiled HLO module.

  Each fusion, library call (custom-call), convolution, copy or collective
  of the entry computation counts its operand and result bytes once; the
  body of a ``while`` counts ``known_trip_count`` times (once where the
  compiler gives none), and ``call``/``conditional`` bodies count as inlined.
  What happens inside a fusion stays on chip and is not counted. Dynamic
  (update-)slices in loops, which XLA does in place, count the slice only.
  """
  text = re.sub(r"/\*.*?\*/", "", hlo_text)
  comps: dict[str, list[tuple[str, str]]] = {}  # computation -> [(instruction, rhs)]
  shapes: dict[str, dict[str, str]] = {}
  entry, cur = None, None
  for line in text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{") and " = " not in line:
      m = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->", line)
      if m is None:
        continue
      cur = m.group(2)
      comps[cur], shapes[cur] = [], {}
      for pname, ptype in re.findall(r"([\w.\-]+):\s*(\([^)]*\)|[^,()]+)", m.group(3)):
        shapes[cur][pname] = ptype
      if m.group(1):
        entry = cur
      continue
    ins = line.strip()
    if cur is None or " = " not in ins:
      continue
    ins = ins.removeprefix("ROOT ")
    name, rhs = ins.split(" = ", 1)
    op_m = re.match(r"(\(.*?\)|\S+)\s+([\w\-]+)\(", rhs)
    if op_m is None:
      continue
    shapes[cur][name.lstrip("%")] = op_m.group(1)
    comps[cur].append((name.lstrip("%"), rhs))

  @functools.cache
  def param_reads(callee: str) -> dict[int, int]:
    """For a fused computation: parameters read only through dynamic-slices, and the
    bytes those slices read (a stacked buffer sliced per loop trip is not read whole)."""
    params: dict[str, int] = {}
    uses: dict[str, list[tuple[str, str]]] = {}
    for ins_name, rhs in comps.get(callee, ()):
      m = re.match(r"(\(.*?\)|\S+)\s+([\w\-]+)\((.*)", rhs)
      if m is None:
        continue
      if m.group(2) == "parameter":
        index_m = re.match(r"(\d+)", m.group(3))
        assert index_m is not None, rhs  # HLO prints every parameter as `parameter(N)`
        params[ins_name] = int(index_m.group(1))
        continue
      ops = _operand_names("(" + m.group(3))
      for k, o in enumerate(ops):
        uses.setdefault(o, []).append((m.group(2), m.group(1) if k == 0 else ""))
    out = {}
    for pname, index in params.items():
      u = uses.get(pname, [])
      if u and all(op == "dynamic-slice" and shape for op, shape in u):
        out[index] = sum(_shape_bytes(shape) for _, shape in u)
      elif u and all(op == "dynamic-update-slice" and shape for op, shape in u):
        out[index] = 0  # the buffer updated in place: only the update is written
    return out

  @functools.cache
  def cost(name: str) -> tuple[int, int]:
    """``(HBM bytes, host-link bytes)`` of one computation's kernels."""
    hbm = host = 0
    table = shapes.get(name, {})
    for _, rhs in comps.get(name, ()):
      op_m = re.match(r"(\(.*?\)|\S+)\s+([\w\-]+)\(", rhs)
      assert op_m is not None, rhs  # `comps` holds only instructions this pattern matched
      op = op_m.group(2)
      if op == "while":
        body = re.search(r"body=%?([\w.\-]+)", rhs)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rhs)
        n = int(trips.group(1)) if trips else 1
        if body:
          b = cost(body.group(1))
          hbm, host = hbm + n * b[0], host + n * b[1]
      elif op in ("call", "conditional"):
        for callee in re.findall(r"(?:to_apply|branch_computations|calls)=\{?%?([\w.\-]+)", rhs):
          b = cost(callee)
          hbm, host = hbm + b[0], host + b[1]
      elif op in _MOVING:
        for nbytes, on_host in _kernel_bytes(op, rhs, op_m, table, comps, param_reads):
          if on_host:
            host += nbytes
          else:
            hbm += nbytes
    return hbm, host

  return cost(entry) if entry else (0, 0)
