"""The package layout the JAX-boundary issue asks for, checked from the source itself.

* one module (``remat_kit/_jax.py``) reaches JAX internals;
* a module's size follows its concept, not a line count (no cap is tested);
* imports between remat_kit modules form no cycle and go down the layers
  ``_jax -> policies -> _dispatch -> transforms -> flax -> models -> report -> planner
  -> testing`` (the pytest plugin, ``pytest_remat_kit``, sits outside the package, so
  that pytest can load it without importing JAX).
"""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1] / "remat_kit"
FILES = sorted(ROOT.rglob("*.py"))

# Lower layers never import higher ones.
LAYERS = ["remat_kit._jax", "remat_kit._args", "remat_kit._xla", "remat_kit.microbatch",
          "remat_kit.targets", "remat_kit._jaxpr", "remat_kit.policies", "remat_kit._dispatch",
          "remat_kit.transforms", "remat_kit.flax", "remat_kit.models", "remat_kit.report",
          "remat_kit.pipelining", "remat_kit.solver", "remat_kit.planner", "remat_kit.testing",
          "remat_kit.__main__"]


def _module(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


MODULES = {_module(p): p for p in FILES}


def _imports(path: pathlib.Path) -> set[str]:
  """remat_kit modules imported anywhere in ``path`` (function bodies included)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("remat_kit"))
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("remat_kit"):
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.add(sub if sub in MODULES else node.module)
  return out


def _layer(mod: str) -> int:
  for i, prefix in enumerate(LAYERS):
    if mod == prefix or mod.startswith(prefix + "."):
      return i
  return -1  # the package itself: re-exports only


def test_one_module_reaches_jax_internals():
  users = [p.name for p in FILES if re.search(r"jax\._src|jax\.interpreters", p.read_text())]
  assert users == ["_jax.py"], users


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """An import cycle of ``graph`` (module -> modules it imports), or None."""
  state: dict[str, int] = {}

  def visit(m: str, stack: list[str]) -> list[str] | None:
    state[m] = 1
    for d in sorted(graph.get(m, ())):
      if state.get(d) == 1:
        return stack + [m, d]
      if d not in state and (found := visit(d, stack + [m])):
        return found
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state and (found := visit(m, [])):
      return found
  return None


def test_no_import_cycle():
  graph = {m: {d for d in _imports(p) if d != m and d != "remat_kit"} for m, p in MODULES.items()}
  assert _cycle(graph) is None, "import cycle: " + " -> ".join(_cycle(graph) or [])


def test_every_module_has_a_layer():
  """No module escapes the layering check (the pipeline's once did)."""
  missing = sorted(m for m in MODULES if m != "remat_kit" and _layer(m) < 0)
  assert not missing, missing


def test_imports_go_down_the_layers():
  bad = []
  for m, p in MODULES.items():
    for d in _imports(p):
      if d != "remat_kit" and _layer(d) > _layer(m) >= 0:
        bad.append(f"{m} imports {d}")
  assert not bad, bad


def test_the_checker_sees_a_cycle(tmp_path):
  """The cycle check can fail: two modules importing each other are reported."""
  a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
  a.write_text("from remat_kit.b import x\n")
  b.write_text("import remat_kit.c\n")
  c.write_text("from remat_kit import a\nimport remat_kit.a\n")
  graph = {f"remat_kit.{p.stem}": _imports(p) - {"remat_kit"} for p in (a, b, c)}
  assert _cycle(graph) == ["remat_kit.a", "remat_kit.b", "remat_kit.c", "remat_kit.a"]
  assert _cycle({"remat_kit.a": {"remat_kit.b"}, "remat_kit.b": set()}) is None


def test_pyproject_bound_matches_the_jax_boundary():
  import tomllib

  from remat_kit import _jax

  meta = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
  bound = next(d for d in meta["project"]["dependencies"] if d.startswith("jax>="))
  assert bound == "jax>=" + ".".join(map(str, _jax.MIN_JAX))
  makefile = (ROOT.parent / "Makefile").read_text()
  assert f"MIN_JAX  := {bound.removeprefix('jax>=')}" in makefile
