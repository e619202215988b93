"""What every experiment program shares: writing its results and reading its rows."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
LOCAL = RESULTS / "local"  # git-ignored: `make bench` writes here; `--refresh` writes RESULTS


def write_json(path: Path | str, result: Any, *, say: bool = True) -> Path:
  """Writes ``result`` as indented JSON (the folder made if needed) and says where."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1, default=str) + "\n")
  if say:
    print(f"wrote {path}")
  return path


def save_figure(fig: Any, path: Path | str, *, dpi: int = 120, say: bool = True) -> Path:
  """Saves a matplotlib figure tightly (the folder made if needed), closes it, says where."""
  import matplotlib.pyplot as plt  # noqa: PLC0415 - only programs that plot need it

  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  if say:
    print(f"wrote {path}")
  return path


def model_rows(result: dict[str, Any], model: str) -> tuple[list[dict[str, Any]],
                                                           dict[str, Any] | None]:
  """A bench result's rows for ``model`` and its no-remat row (None if that failed)."""
  rows = [r for r in result["rows"] if r["model"] == model]
  base = next((r for r in rows if r["strategy"] == "no remat" and not r.get("error")), None)
  return rows, base


def check_out(path: Path) -> str | None:
  """Why ``path`` cannot take the results, or None."""
  if path.suffix != ".json":
    return "must end in .json (the plot goes beside it as .png)"
  if path.is_dir():
    return "is a directory; give a file name ending in .json"
  try:  # the one honest test of writability: make the folder and a file in it
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent):
      pass
  except OSError as e:
    return f"cannot write in {str(path.parent)!r} ({e.strerror or e})"
  return None


def write_atomic(path: Path, data: dict[str, Any]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(data, f, indent=1)
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)


def finish(out: Path, result: dict[str, Any], print_table: Callable[[dict[str, Any]], None],
           plot: Callable[[dict[str, Any], Path], bool]) -> None:
  """A bench's last steps: the table, the JSON (atomically) and the plot beside it."""
  print_table(result)
  write_atomic(out, result)
  print(f"\nwrote {out}")
  if plot(result, out.with_suffix(".png")):
    print(f"wrote {out.with_suffix('.png')}")
