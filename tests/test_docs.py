"""The Markdown the README and the docs site are made of: faults that render wrong.

* A code fence left open (or closed with text on its line) swallows the rest of
  the page as code: GitHub showed the README's auto section so.
* Python-Markdown needs a blank line between a paragraph and a list that follows
  it; without one, "It compiles: - every preset - every subset" is one paragraph.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ITEM = re.compile(r"^\s*([-*+]|\d+\.) ")


def faults(text: str) -> list[str]:
  """The fence and list faults of one Markdown text, with line numbers."""
  out: list[str] = []
  fence_at = None
  prev = ""
  for i, line in enumerate(text.split("\n"), 1):
    stripped = line.strip()
    if fence_at is None and stripped.startswith("```"):
      fence_at = i
      prev = ""
      continue
    if fence_at is not None:
      if stripped.startswith("```"):
        if stripped.strip("`").strip():
          out.append(f"line {i}: text after a closing fence: {stripped[:40]!r}")
        fence_at = None
        prev = ""
      continue
    if ITEM.match(line) and prev.strip() and not ITEM.match(prev) \
        and not prev.startswith((" ", "\t", "|", "#", ">")):
      out.append(f"line {i}: a list right after a paragraph (add a blank line): {prev[:40]!r}")
    prev = line
  if fence_at is not None:
    out.append(f"line {fence_at}: a code fence that is never closed")
  return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_have_no_open_fence_or_glued_list(page):
  assert faults(page.read_text()) == []


def test_the_check_finds_both_faults():
  assert faults("A paragraph:\n- one\n- two\n") == [
      "line 2: a list right after a paragraph (add a blank line): 'A paragraph:'"]
  assert faults("text\n\n```python\ncode\n``` The page goes on\nmore\n") == [
      "line 5: text after a closing fence: '``` The page goes on'"]
  assert faults("```\nnever closed\n") == ["line 1: a code fence that is never closed"]
  assert faults("A paragraph:\n\n- one\n- two\n\n```\n- not a list\n```\n") == []
