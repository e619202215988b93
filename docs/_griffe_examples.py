"""A griffe extension for `make docs`: our docstrings' ``Example:`` sections (the house
spelling, as napoleon reads it) are parsed as griffe's ``Examples:``, so their ``>>>``
lines render as code rather than as Markdown block quotes."""

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
  def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
    if obj.docstring is not None:
      obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
