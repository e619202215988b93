"""Version shims over JAX internals that remat_kit relies on.

Every private JAX import lives here, so a JAX upgrade touches one file. Both
JAX 0.10 (Python 3.11) and JAX 0.11+ (Python 3.12) are supported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
from jax._src import ad_checkpoint as _ac
from jax._src import config as _config
from jax._src.interpreters import partial_eval as _pe

name_p = _ac.name_p
saved_residuals = _ac.saved_residuals

Saveable = _pe.Saveable
Recompute = _pe.Recompute
Offloadable = _pe.Offloadable

try:  # remat3 tags names with a hi-primitive instead of name_p.
  from jax._src.hijax import call_hi_primitive_p as _call_hi_p

  _CheckpointName = _ac.CheckpointName
except (ImportError, AttributeError):  # pragma: no cover - older JAX
  _call_hi_p = None
  _CheckpointName = None

# JAX's own policy classes, which jax_remat3 recognises by type.
JaxSaveOnlyTheseNames = _ac.SaveOnlyTheseNames
JaxDotsSaveable = _ac.DotsSaveable
JaxSaveAnyNamesButThese = _ac.SaveAnyNamesButThese
ensure_enum = _pe.ensure_enum

# Offloading under remat3 arrived after JAX 0.10: where these classes are
# missing, remat3 cannot offload and remat_kit uses the classic remat instead.
JaxSaveAndOffloadOnlyTheseNames = getattr(_ac, "SaveAndOffloadOnlyTheseNames", None)
JaxOffloadDotWithNoBatchDims = getattr(_ac, "OffloadDotWithNoBatchDims", None)


def checkpoint_name_of(prim: Any, params: dict[str, Any]) -> str | None:
  """The `checkpoint_name` tag carried by an equation, under either remat."""
  if prim is name_p:
    return params["name"]
  if _call_hi_p is not None and prim is _call_hi_p:
    inner = params.get("_prim")
    if _CheckpointName is not None and isinstance(inner, _CheckpointName):
      return inner.name
  return None


def has_remat3() -> bool:
  """Whether the installed JAX has the `jax_remat3` flag."""
  return hasattr(_config, "remat3")


def remat3_enabled() -> bool:
  """Whether `jax_remat3` is on right now."""
  return has_remat3() and bool(_config.remat3.value)


@contextlib.contextmanager
def classic_remat() -> Iterator[None]:
  """Build `jax.checkpoint` with JAX's classic implementation (`remat_p`).

  `jax.checkpoint` picks its implementation when it wraps the function, so a
  wrapper built inside this context keeps binding `remat_p`, whose partial
  evaluation consults any callable policy, even if `jax_remat3` is on later.
  """
  if has_remat3():
    with _config.remat3(False):
      yield
  else:  # pragma: no cover - older JAX
    yield


def classic_checkpoint(fn: Any, **kwargs: Any) -> Any:
  """`jax.checkpoint` built on the classic implementation."""
  with classic_remat():
    return jax.checkpoint(fn, **kwargs)
