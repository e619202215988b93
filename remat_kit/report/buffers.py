"""The buffers of a compiled program, and what its HLO says about each.

A :class:`Buffer` is what a temp or host allocation holds at one offset for one
stretch of the schedule; the helpers read an HLO value's primitive, `checkpoint_name`,
remat site and role (activation, forward or backward temporary) from its op
metadata. :mod:`remat_kit.report.compiled` builds on them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from remat_kit import _jaxpr
from remat_kit import _xla as _dumps

__all__ = ["Buffer", "backward_start", "buffers_of", "feeds_loop", "is_host", "memory_of",
           "name_of", "origin", "instr_of", "primitive", "reader_site", "stacks", "temp_kind"]


@dataclasses.dataclass(frozen=True)
class Buffer:
  """One buffer of a temp or host allocation: the values the compiler placed at one
  offset whose live ranges touch (an in-place update, an alias, a loop's carry).

  Attributes:
    alloc: the allocation it lies in.
    offset: its offset in the allocation.
    size: its bytes.
    start: the first program point it is live at (the live-range dump's order).
    end: the last.
    values: the HLO values it holds, in order.
  """

  alloc: _dumps.Alloc
  offset: int
  size: int
  start: int
  end: int
  values: tuple[str, ...]

  @property
  def memory(self) -> str:
    """"device", "host" (pinned host memory) or "on-chip" (a TPU's VMEM)."""
    return memory_of(self.alloc)




def name_of(prog: _dumps.Program, marks: _jaxpr.Marks, value: str) -> str | None:
  """The `checkpoint_name` of the op that made ``value``, through ops that pass it on."""
  return origin(prog, marks, value)[0]


def origin(prog: _dumps.Program, marks: _jaxpr.Marks, value: str) -> tuple[str | None, str]:
  """``(checkpoint name, op_name)`` of the op that made ``value``: followed back through
  ops that pass a value on, and from a scan's stacking (``dynamic_update_slice``) to the
  value it stacks. The op_name is ``value``'s own where no name is met."""
  frontier = [instr_of(value)]
  own = prog.info.get(frontier[0], ("", "", None))[1]
  for _ in range(4):
    nxt = []
    for instr in frontier:
      opcode, op_name, _ = prog.info.get(instr, ("", "", None))
      prim = primitive(op_name) or opcode
      if op_name and (n := marks.name_of(op_name, prim)):
        return n, op_name
      # A name tagged before an op that passes the value on belongs to its output too.
      if prim in _jaxpr.PASS_ON or opcode in _dumps.PASS_ON:
        nxt += prog.operands_of(instr)[:1]
      elif prim == "dynamic_update_slice":
        nxt += prog.operands_of(instr)[1:]
    frontier = nxt
  return None, own


def stacks(op_name: str) -> bool:
  """Whether an op is a scan body writing its layer's slice into a stacked residual."""
  return "while/body" in op_name and primitive(op_name) == "dynamic_update_slice"


def reader_site(prog: _dumps.Program, marks: _jaxpr.Marks, values: Sequence[str]
                 ) -> int | None:
  """The remat site whose ops read these values (through slices and views): they are its
  input."""
  frontier, seen = [instr_of(v) for v in values], set()
  for _ in range(3):
    nxt = []
    for instr in frontier:
      for user in prog.users.get(instr, []):
        opcode, op_name, _ = prog.info.get(user, ("", "", None))
        s = marks.site_of(op_name)
        if s is not None:
          return s
        if user not in seen and (opcode in _dumps.VIEWS
                                  or primitive(op_name) in _jaxpr.SLICES | _jaxpr.RESHAPES):
          seen.add(user)
          nxt.append(user)
    frontier = nxt
  return None




def instr_of(value: str) -> str:
  """The HLO instruction of a value (``fusion.3{1}`` -> ``fusion.3``)."""
  return value.split("{")[0]


def buffers_of(prog: _dumps.Program, allocs: list[_dumps.Alloc],
             ranges: dict[str, tuple[int, int]]) -> list[Buffer]:
  """The buffers of the temp and host allocations: values at one offset whose live
  ranges touch are one buffer (an in-place update, an alias)."""
  out: list[Buffer] = []
  for a in allocs:
    if a.resident or a.color < 0:
      continue
    slots: dict[tuple[int, int], list[tuple[int, int, str]]] = {}
    for value, offset, size in a.values:
      if value in ranges:
        slots.setdefault((offset, size), []).append((*ranges[value], value))

    def reused(offset: int, size: int, lo: int, hi: int) -> bool:
      """Whether another value of the allocation occupies these bytes in ``[lo, hi]``."""
      return any(o < offset + size and offset < o + z and s2 <= hi and lo <= e2
                 for (o, z), vs in slots.items() if (o, z) != (offset, size)
                 for s2, e2, _ in vs)

    for (offset, size), vals in slots.items():
      vals.sort()
      cur: list[Any] | None = None
      for s, e, v in vals:
        # Touching ranges are one buffer (an in-place update); so is a loop's initial
        # value and what the loop body writes into it later (the loop carries it), unless
        # the compiler put another value in those bytes in between.
        if cur is not None and (s <= cur[1] or (
            feeds_loop(prog, cur[2][-1]) and not reused(offset, size, cur[1] + 1, s - 1))):
          cur[1] = max(cur[1], e)
          cur[2].append(v)
        else:
          if cur is not None:
            out.append(Buffer(a, offset, size, cur[0], cur[1], tuple(cur[2])))
          cur = [s, e, [v]]
      if cur is not None:
        out.append(Buffer(a, offset, size, cur[0], cur[1], tuple(cur[2])))
  return out


def primitive(op_name: str) -> str | None:
  """The jaxpr primitive at the end of an HLO ``op_name`` ("jit(f)/jvp()/exp" -> "exp")."""
  if not op_name:
    return None
  last = op_name.rsplit("/", 1)[-1]
  return re.sub(r"\(.*\)$", "", last) or None


def feeds_loop(prog: _dumps.Program, value: str) -> bool:
  """Whether ``value`` is a while loop's initial value (through tuples, bitcasts, ...)."""
  frontier, seen = [instr_of(value)], set()
  for _ in range(4):
    nxt = []
    for instr in frontier:
      for user in prog.users.get(instr, []):
        op = prog.info.get(user, ("",))[0]
        if op == "while":
          return True
        if op in ("tuple", "get-tuple-element", "bitcast", "copy") and user not in seen:
          seen.add(user)
          nxt.append(user)
    frontier = nxt
  return False


# Backward ops XLA often schedules early, before any forward work is done.
_EARLY = frozenset("broadcast_in_dim convert_element_type reshape iota".split())
# HLO ops that compute nothing (a constant cotangent, a view of a buffer).
_NO_WORK = frozenset("constant parameter iota bitcast tuple get-tuple-element".split())
# A transpose scope ending at the remat itself (its constants), not an op of its body.
_REMAT_OP = re.compile(r"/(remat2?|checkpoint)$")


def backward_start(prog: _dumps.Program, ranges: dict[str, tuple[int, int]],
                   horizon: int) -> int:
  """When the backward pass starts: the first transpose op doing real work."""
  starts = [r[0] for v, r in ranges.items()
            if "transpose(" in (info := prog.info.get(instr_of(v), ("", "", None)))[1]
            and primitive(info[1]) not in _EARLY and info[0] not in _NO_WORK
            and not _REMAT_OP.search(info[1])]
  return min(starts, default=horizon)


def temp_kind(prog: _dumps.Program, value: str) -> str:
  """Backward temporary (made by the transpose), activation (made in the forward
  pass and read by the backward), forward temporary, or temporary (neither)."""
  instr = instr_of(value)
  _, op_name, _ = prog.info.get(instr, ("", "", None))
  if "transpose(" in op_name:
    return "backward temporary"
  if "jvp(" in op_name:
    if "while/body" in op_name and primitive(op_name) == "dynamic_update_slice":
      return "activation"  # a forward scan stacking what its backward reads
    readers = prog.users.get(instr, [])
    if any("transpose(" in prog.info.get(u, ("", "", None))[1] for u in readers):
      return "activation"
    return "forward temporary"
  return "temporary"


def is_host(a: _dumps.Alloc) -> bool:
  return a.color == 5  # XLA's pinned-host memory space on GPU and TPU


def memory_of(a: _dumps.Alloc) -> str:
  return "device" if a.color == 0 else "host" if a.color == 5 else "on-chip"


def buffer_kind(prog: _dumps.Program, value: str, made_by: str, opcode: str, dtype: str
                ) -> str:
  """What a buffer holding ``value`` (made by ``made_by``, an ``opcode``) is: "activation",
  or the kind of a buffer that holds no tensor of the model (``Compilation.residuals``)."""
  own_op = prog.own(instr_of(value))[0]
  index = value.partition("{")[2].rstrip("}")
  own_shape = prog.shape_text(instr_of(value))
  if not index and (own_op == "tuple" or own_shape.lstrip().startswith("(")):
    return "tuple table"  # the addresses of a kernel's or a loop's outputs
  if own_op in ("copy-start", "copy-done") or opcode == "copy-start":
    if index in ("1", "2") or dtype.startswith(("uint", "int")):
      return "copy context"
  if own_op == "custom-call" and index not in ("", "0") and dtype in ("uint8", "int8"):
    return "workspace"
  if opcode == "parameter" and prog.comp_of.get(made_by) in prog.entry_computations():
    return "prefetch" if own_op in ("copy-start", "copy-done") else "argument"
  return "activation"
