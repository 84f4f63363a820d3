"""The package's shape: no import cycles (module- and function-level
imports both count), files of one concept (<= 400 lines), functions of
<= 60 lines (docstrings aside) unless a ``# long:`` comment inside says why."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "cdc_jax"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, str]:
  """Module name -> file, for every .py file in the package."""
  out = {}
  for root, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = path
  return out


def _imported(module: str, path: str, node: ast.AST) -> list[str]:
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if not isinstance(node, ast.ImportFrom):
    return []
  base = node.module or ""
  if node.level:
    parts = module.split(".")
    if not path.endswith("__init__.py"):
      parts = parts[:-1]
    parts = parts[: len(parts) - node.level + 1]
    base = ".".join(parts + ([base] if base else []))
  return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
  """Edges module -> package modules it imports, and their parents
  (importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` too)."""
  mods = _modules()
  graph = {m: set() for m in mods}
  for m, path in mods.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      names = _imported(m, path, node)
      for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
          target = ".".join(parts[:i])
          if target in mods and target != m and not m.startswith(target + "."):
            graph[m].add(target)
      # ``from a.b import c`` inside a/b/ reads a/b/__init__'s namespace:
      # the module needs its own package, which must not need it back.
      named = names[1:] if isinstance(node, ast.ImportFrom) else []
      for name in [names[0]] + named if named else []:
        if name in mods and m.startswith(name + "."):
          graph[m].add(name)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(u):
    state[u] = 1
    stack.append(u)
    for v in sorted(graph[u]):
      if state.get(v) == 1:
        return stack[stack.index(v) :] + [v]
      if not state.get(v):
        found = visit(v)
        if found:
          return found
    state[u] = 2
    stack.pop()
    return None

  for m in sorted(graph):
    if not state.get(m):
      found = visit(m)
      if found:
        return found
  return None


def test_no_import_cycles():
  graph = import_graph()
  assert len(graph) > 30 and graph["cdc_jax.train"]
  cycle = find_cycle(graph)
  assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [
    "a",
    "b",
    "c",
    "a",
  ]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_importing_from_the_own_package_counts():
  graph = import_graph()
  # codec/cli.py does ``from cdc_jax import codec``: it needs the package.
  assert "cdc_jax.codec" in graph["cdc_jax.codec.cli"]


def test_function_level_imports_count():
  graph = import_graph()
  # cdc_jax.main imports cdc_jax.jobs inside main() only.
  assert "cdc_jax.jobs" in graph["cdc_jax.main"]


@pytest.mark.parametrize("module,path", sorted(_modules().items()))
def test_file_and_function_lengths(module, path):
  with open(path) as f:
    source = f.read()
  lines = source.splitlines()
  assert len(lines) <= MAX_FILE_LINES, f"{path}: {len(lines)} lines"
  for node in ast.walk(ast.parse(source, path)):
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
      n = node.end_lineno - node.lineno + 1
      doc = node.body[0]
      if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
        n -= doc.end_lineno - doc.lineno + 1  # docstrings do not count
      body = "\n".join(lines[node.lineno - 1 : node.end_lineno])
      assert n <= MAX_FUNCTION_LINES or "# long:" in body, (
        f"{path}:{node.lineno} {node.name} has {n} lines; split it or say "
        "why in a '# long:' comment"
      )


def test_docs_layout_names_every_module_and_benchmark():
  """docs/layout.md cannot go stale: every module of cdc_jax/ (top level
  by file name, subpackages by folder) and every benchmark script is
  named there."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "docs", "layout.md")) as f:
    text = f.read()
  pkg = os.path.join(root, "cdc_jax")
  missing = []
  for name in sorted(os.listdir(pkg)):
    path = os.path.join(pkg, name)
    if os.path.isdir(path) and os.path.isfile(
      os.path.join(path, "__init__.py")
    ):
      if f"cdc_jax/{name}/" not in text:
        missing.append(f"cdc_jax/{name}/")
    elif name.endswith(".py") and name != "__init__.py":
      if name not in text:
        missing.append(f"cdc_jax/{name}")
  for name in sorted(os.listdir(os.path.join(root, "benchmarks"))):
    if name.endswith(".py") and name not in text:
      missing.append(f"benchmarks/{name}")
  assert not missing, f"docs/layout.md does not name: {missing}"
