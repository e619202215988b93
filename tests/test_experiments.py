"""experiments/ are thin programs over the public API: no private names, no cycles."""

import ast
import importlib
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).parent.parent / "experiments"
# The public modules: remat_kit and its packages (their `__all__`), and the report's
# modules its docstring names for what the package itself does not export; never
# another module inside them or an underscored one.
PUBLIC = {"remat_kit", "remat_kit.flax", "remat_kit.models", "remat_kit.planner",
          "remat_kit.pipelining", "remat_kit.policies",
          "remat_kit.report", "remat_kit.solver", "remat_kit.targets", "remat_kit.testing",
          "remat_kit.microbatch", "remat_kit.transforms",
          *(f"remat_kit.report.{m}" for m in ("timing", "estimate", "compiled", "core",
                                              "timeline", "table", "tensor"))}
PROGRAMS = sorted(p for p in EXPERIMENTS.glob("*.py") if p.name != "__init__.py")


def _imports(path):
  """(module, name) for every import in ``path`` (name None for `import module`)."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        yield node.module, alias.name
    elif isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, None


@pytest.mark.parametrize("path", PROGRAMS, ids=lambda p: p.name)
def test_programs_import_only_public_names(path):
  bad = []
  for module, name in _imports(path):
    if module == "remat_kit" or module.startswith("remat_kit."):
      if module not in PUBLIC:
        bad.append(f"{module} (import from one of {sorted(PUBLIC)})")
        continue
      if name is None:
        continue
      mod = importlib.import_module(module)
      public = set(getattr(mod, "__all__", ())) | {m.split(".")[-1] for m in PUBLIC}
      if name.startswith("_") or name not in public:
        bad.append(f"{module}.{name} (not in its __all__)")
    elif module.startswith("experiments") and name is not None and name.startswith("_"):
      if name != "_io":  # the programs' shared module
        bad.append(f"{module}.{name}")
  assert not bad, f"{path.name} imports private names: {bad}"


def test_programs_import_no_cycle():
  graph = {p.stem: {m.split(".")[-1] if n is None else (n if m == "experiments" else
                                                          m.split(".")[-1])
                    for m, n in _imports(p) if m.startswith("experiments")}
           for p in PROGRAMS}
  seen, path = set(), []

  def visit(node):
    assert node not in path, f"import cycle: {' -> '.join(path + [node])}"
    if node in seen:
      return
    path.append(node)
    for nxt in graph.get(node, ()):
      visit(nxt)
    path.pop()
    seen.add(node)

  for node in graph:
    visit(node)


def test_the_checker_sees_a_private_import(tmp_path):
  fake = tmp_path / "fake.py"
  fake.write_text("from remat_kit.report.buffers import buffer_kind\n"
                  "from remat_kit import _jax\nfrom experiments.bench import _loss\n")
  with pytest.raises(AssertionError, match="remat_kit.report.buffers"):
    test_programs_import_only_public_names(fake)
