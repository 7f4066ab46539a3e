"""The package's import structure: no cycles, and a library without the app.

The import graph is read from the source with ``ast`` (every ``import``
statement, at module level or inside a function), so that a cycle hidden
behind a deferred import counts too. The library (every module outside
``osgd_jax.app``) must import neither the application nor the application's
dependencies; a fresh interpreter that cannot import them proves it.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from osgd_jax.app.commands import COMMANDS

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "osgd_jax"
APP = "osgd_jax.app"
# The app extra, and chex, which only the tests use.
APP_ONLY = ("orbax", "sklearn", "scipy", "matplotlib", "tqdm", "yaml", "chex")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
LIBRARY_MODULES = sorted(
  m for m in MODULES if m != APP and not m.startswith(APP + ".")
)


def _is_package(module: str) -> bool:
  return MODULES[module].name == "__init__.py"


def _deepest_module(dotted: str) -> str | None:
  """The longest prefix of ``dotted`` that is a module of the package."""
  parts = dotted.split(".")
  for end in range(len(parts), 0, -1):
    if ".".join(parts[:end]) in MODULES:
      return ".".join(parts[:end])
  return None


def imported_names(module: str, source: str | None = None) -> set[str]:
  """The absolute dotted names that ``module``'s import statements name.

  ``from a.b import c`` names ``a.b.c``: a module, or an attribute of the
  module ``a.b``. The parent packages that an import also runs are left out:
  a package's own modules import it that way without forming a cycle.
  ``source`` stands in for the module's file when given.
  """
  if source is None:
    source = MODULES[module].read_text(encoding="utf-8")
  tree = ast.parse(source)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolved against the importing package
        package = module if _is_package(module) else module.rpartition(".")[0]
        base = (
          package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        )
        base = f"{base}.{node.module}" if node.module else base
      else:
        base = node.module
      names.update(f"{base}.{alias.name}" for alias in node.names)
  return names


def import_graph() -> dict[str, set[str]]:
  """Module -> the package's modules it imports (the deepest one named)."""
  graph = {}
  for module in MODULES:
    targets = {_deepest_module(name) for name in imported_names(module)}
    graph[module] = {t for t in targets if t is not None and t != module}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle ``[a, b, ..., a]`` of ``graph``, or None; depth-first search."""
  state = {}  # node -> "open" while on the stack, "done" after
  stack = []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_and_names_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [
    "a",
    "b",
    "c",
    "a",
  ]
  assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]


def test_the_graph_sees_deferred_and_relative_imports():
  # Deferred, inside a function, as a console script would import its
  # command after checking the app extra (the package has no such import
  # now: osgd_jax.app.commands names its commands instead).
  deferred = (
    "def osgd_train():\n"
    "  from osgd_jax.app.train import cli\n"
    "  return cli.main()\n"
  )
  assert imported_names("osgd_jax.app.commands", deferred) == {
    "osgd_jax.app.train.cli"
  }
  graph = import_graph()
  assert "osgd_jax.app.train" in graph["osgd_jax.app.train.cli"]
  assert "osgd_jax.app.data.base" in graph["osgd_jax.app.data.digits"]


def test_the_package_has_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _reachable(graph, start):
  seen, todo = set(), [start]
  while todo:
    node = todo.pop()
    if node not in seen:
      seen.add(node)
      todo.extend(graph[node])
  return seen


def test_training_never_imports_the_commands():
  graph = import_graph()
  commands = {
    "osgd_jax.app.train.cli",
    "osgd_jax.app.compare",
    "osgd_jax.app.compare.cli",
    "osgd_jax.app.commands",
    "osgd_jax.app.__main__",
  }
  assert commands <= set(MODULES)
  for module in MODULES:
    if (
      module.startswith("osgd_jax.app.train")
      and module != "osgd_jax.app.train.cli"
    ):
      assert not _reachable(graph, module) & commands, module


def test_the_console_scripts_import_only_the_standard_library():
  # They report a missing app extra, so they must run without it; they
  # reach the commands by name (COMMANDS) once it is there, and the
  # commands import them for what the commands share.
  names = imported_names("osgd_jax.app.commands")
  assert {name.partition(".")[0] for name in names} <= (sys.stdlib_module_names)
  graph = import_graph()
  for target in COMMANDS.values():
    module = target.partition(":")[0]
    assert "osgd_jax.app.commands" in graph[module], module


def test_library_source_imports_neither_the_app_nor_its_dependencies():
  for module in LIBRARY_MODULES:
    for name in imported_names(module):
      assert name != APP and not name.startswith(APP + "."), (module, name)
      assert name.partition(".")[0] not in APP_ONLY, (module, name)


# Run in a fresh interpreter: every import statement executed by a library
# module is checked (builtins.__import__ sees cached modules too, which flax
# imports of its own, such as yaml), and osgd_jax.app cannot be imported at
# all.
_WITHOUT_APP = """
import builtins, importlib, json, sys

BLOCKED = set(sys.argv[1].split(","))
sys.modules["osgd_jax.app"] = None
_import = builtins.__import__

def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
  importer = (globals or {}).get("__name__", "")
  if (level == 0 and importer.partition(".")[0] == "osgd_jax"
      and name.partition(".")[0] in BLOCKED):
    raise ImportError(f"{importer} imports {name}")
  return _import(name, globals, locals, fromlist, level)

builtins.__import__ = guarded_import

refused = []  # the guard itself must refuse these
for probe in ("import yaml", "import osgd_jax.app.train"):
  try:
    exec(probe, {"__name__": "osgd_jax.probe"})
  except ImportError:
    refused.append(probe)

for module in sys.argv[2:]:
  importlib.import_module(module)

import jax.numpy as jnp
import osgd_jax
tx = osgd_jax.osgd(num_exits=2)
params = {"w": jnp.zeros(3)}
grads = {"w": jnp.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])}
updates, _ = tx.update(grads, tx.init(params), params)
print(json.dumps({"refused": refused, "update": updates["w"].tolist()}))
"""


def test_library_imports_and_runs_without_the_app():
  assert {"osgd_jax", "osgd_jax.zoo.registry"} <= set(LIBRARY_MODULES)
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(
      p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
    ),
  )
  result = subprocess.run(
    [sys.executable, "-c", _WITHOUT_APP, ",".join(APP_ONLY), *LIBRARY_MODULES],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["refused"] == ["import yaml", "import osgd_jax.app.train"]
  # Gram-Schmidt by hand: exit 2's gradient (1, 1, 0) loses its component
  # along exit 1's (1, 0, 0), leaving (0, 1, 0); the update is their sum.
  np.testing.assert_allclose(report["update"], [1.0, 1.0, 0.0], atol=1e-6)
