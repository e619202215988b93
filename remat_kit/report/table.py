"""Plain-text tables and byte sizes (no dependencies, so GPU images need nothing extra)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_bytes", "format_table", "short_layer"]


def format_bytes(n: int | float | None) -> str:
  """``n`` bytes as B, KiB, MiB or GiB.

  >>> format_bytes(512), format_bytes(3 * 2**20), format_bytes(None)
  ('512 B', '3.00 MiB', 'n/a')
  """
  if n is None:
    return "n/a"
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
  """A text table; ``align`` has one ``l`` or ``r`` per column.

  >>> print(format_table(["a", "bb"], [["x", "1"], ["yy", "22"]], align="lr"))
  a  | bb
  ---+---
  x  |  1
  yy | 22
  """
  cols = len(headers)
  align = (align or "l" * cols).ljust(cols, "l")
  widths = [max([len(str(headers[i]))] + [len(str(r[i])) for r in rows]) for i in range(cols)]

  def line(cells: Sequence[str]) -> str:
    return " | ".join(str(c).rjust(w) if a == "r" else str(c).ljust(w)
                      for c, w, a in zip(cells, widths, align)).rstrip()

  sep = "-+-".join("-" * w for w in widths)
  return "\n".join([line(headers), sep] + [line(r) for r in rows])


def short_layer(layer: str, width: int = 40) -> str:
  """A layer's path for a table column: without its root module (every row shares it),
  and from the left cut to ``width`` characters (the innermost parts tell rows apart).

  >>> short_layer("GPT/blocks/layers_0/GPTBlock/LayerNorm_0"), short_layer("")
  ('blocks/layers_0/GPTBlock/LayerNorm_0', '-')
  """
  parts = layer.split("/")
  text = "/".join(parts[1:]) if len(parts) > 2 else layer
  if len(text) > width:
    text = "..." + text[-(width - 3):]
  return text or "-"
