"""The one record of a model's tensor that every row shows: op, source line, layer, size.

The readouts' rows (residuals, peak, timeline) and the per-tensor planner's table
describe the same tensors, so they carry the same :class:`Tensor`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any

__all__ = ["KINDS", "Tensor", "user_source"]

# The one vocabulary of what a row is, shared by the residual, peak and timeline rows
# (and the per-tensor planner's table). The docs' glossary lists the same.
KINDS: dict[str, str] = {
    "parameter": "an argument the gradient is taken for (its buffer, resident for the step)",
    "input": "another argument (data, a flag's array)",
    "optimizer state": "an argument a training step updates (with `arg_kinds`)",
    "constant": "an array the function closes over",
    "gradient": "a gradient the step returns",
    "output": "another output",
    "activation": "a value the forward pass makes and keeps for the backward pass "
                  "(a saved residual)",
    "argument": "a residual that is an argument or a view of one: no extra memory",
    "argument cast": "an argument cast to another dtype and kept (bf16 weights)",
    "forward temporary": "a forward value the backward does not read",
    "backward temporary": "a value the backward pass makes",
    "temporary": "neither (the compiler's own)",
    "packing": "temp memory reserved but unused at that point (the compiler's packing)",
    "split-K partials": "the partial sums XLA keeps of a matmul whose contraction it split, "
                        "beyond the tensor's own bytes",
    "workspace": "a library call's scratch memory (cuBLAS, cuDNN)",
    "copy context": "an async copy's bookkeeping (its source alias, its context word)",
    "prefetch": "an argument copied to on-chip memory ahead of its use (TPU VMEM)",
    "tuple table": "the addresses of a kernel's or a loop's outputs",
    "other": "smaller buffers, summed",
}


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One tensor of the model.

  Attributes:
    op: the operation that made it (``dot_general``, ``tanh``, ...), resolved
      through re-views (reshapes, casts to its own dtype, names) to the op that
      computed it.
    source: the user's source line that made it, ``"path/model.py:42"``
      (frames in JAX, Flax and remat_kit's library skipped; remat_kit's own
      reference models count as user code); "" where JAX recorded none.
    layer: where in the model: a layer of a Python loop (``"layer 3"``), a scan
      body (``"scan body x 12"``), or a module path (``"blocks/GPTBlock_0"``).
    shape: its shape (for a tensor stacked over a scan's iterations, the trip
      count first).
    dtype: its dtype name.
    bytes: its size in bytes (over all iterations of a scan).
    kind: what it is to the step (the glossary's kinds: ``"activation"`` for a
      value the forward computes, ``"argument"``, ...).
    name: its `checkpoint_name`, or None.
  """

  op: str
  source: str
  layer: str
  shape: tuple[int, ...]
  dtype: str
  bytes: int
  kind: str = "activation"
  name: str | None = None

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["shape"] = list(self.shape)
    return d


@functools.cache
def _library_dirs() -> tuple[str, ...]:
  dirs = []
  for mod in ("jax", "jaxlib", "flax", "optax", "chex", "numpy", "contextlib"):
    m = sys.modules.get(mod)
    f = getattr(m, "__file__", None)
    if f:
      d = os.path.dirname(os.path.abspath(f))
      # A package is its folder; the standard library, the folder its modules lie in.
      dirs.append(d + os.sep)
  import remat_kit

  dirs.append(os.path.dirname(os.path.abspath(remat_kit.__file__)) + os.sep)
  return tuple(dirs)


@functools.cache
def _models_dir() -> str:
  import remat_kit.models

  return os.path.dirname(os.path.abspath(remat_kit.models.__file__)) + os.sep


def _is_user(path: str) -> bool:
  if not path or path.startswith("<"):
    return False
  path = os.path.abspath(path)
  if path.startswith(_models_dir()):
    return True
  return not any(path.startswith(d) for d in _library_dirs())


def _show(path: str) -> str:
  path = os.path.abspath(path)
  cwd = os.getcwd() + os.sep
  if path.startswith(cwd):
    return path[len(cwd):]
  marker = os.sep + "site-packages" + os.sep
  if marker in path:
    return path.split(marker, 1)[1]
  return path


def user_source(eqn_or_info: Any) -> str:
  """The user's source line of a jaxpr equation (or its ``source_info``), as
  ``"path/file.py:line"``; "" where JAX recorded no user frame.

  Frames in JAX, Flax, optax, chex, numpy, the standard library and remat_kit's
  library are skipped (remat_kit's reference models are user code): a Dense
  layer's matmul points at the line that called the layer, not at
  ``flax/linen/linear.py``.
  """
  info = getattr(eqn_or_info, "source_info", eqn_or_info)
  tb = getattr(info, "traceback", None)
  frames = getattr(tb, "frames", None) or ()
  for f in frames:  # innermost first
    if _is_user(f.file_name):
      return f"{_show(f.file_name)}:{f.line_num}"
  return ""
