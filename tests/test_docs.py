"""The documentation site builds cleanly and covers the whole public API.

The slow test builds docs/ as a user would (``sphinx-build -W --keep-going
-n -b html``): a docstring that fails to render, a broken cross-reference or
a page left out of the table of contents fails it. It runs in a subprocess,
so that Sphinx's global state never reaches the other tests of its worker.
From the ``objects.inv`` it writes, every name in the ``__all__`` of every
public module must have an entry, so a public symbol without documentation
fails the suite; every public name of one object must lead to one entry, on
the page of a public face (``docs/api/index.rst``), and no private name may
have one. The fast tests check that the command-line guide names every flag
of both commands.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import pathlib
import pkgutil
import posixpath
import re
import subprocess
import sys

import pytest
from sphinx.util.inventory import InventoryFile

import osgd_jax
from osgd_jax.app import compare
from osgd_jax.app.train import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CLI_GUIDE = DOCS / "guides" / "cli.md"


def is_private(module_name: str) -> bool:
  """Whether a part of the dotted name starts with an underscore."""
  return any(part.startswith("_") for part in module_name.split("."))


def public_modules() -> list[str]:
  """Every module but ``__main__`` and the private ones (``_osgd``, ...).

  A package's ``__init__`` and every module with no underscore in its
  dotted name: every name of their ``__all__`` is public API. What a
  private module defines is public only where one of them lists it.
  """
  return ["osgd_jax"] + sorted(
    m.name
    for m in pkgutil.walk_packages(osgd_jax.__path__, "osgd_jax.")
    if not m.name.endswith(".__main__") and not is_private(m.name)
  )


def faces(modules: list[str]) -> list[str]:
  """The public modules with a page: packages and top-level modules."""
  return [
    m
    for m in modules
    if m.count(".") == 1 or hasattr(importlib.import_module(m), "__path__")
  ]


def _uri(entry) -> str:
  return entry.uri if hasattr(entry, "uri") else entry[2]


def undocumented(
  inventory: dict[str, set[str]], modules: list[str]
) -> list[str]:
  """The public names of ``modules`` that have no entry in ``inventory``.

  Args:
    inventory: object type (``"py:function"``, ...) -> the names it holds.
    modules: dotted module names.

  Returns:
    ``module`` for a module without its own entry, and ``module.name`` for
    each name of its ``__all__`` without one: a module needs a
    ``py:module`` entry, anything else an entry of another Python type.
    A name that a module of the same name takes (``osgd_jax.app.data``
    re-exports the function ``augment`` of its module ``augment``) cannot
    have one: the entry of its definition counts instead.
  """
  modules_documented = inventory.get("py:module", set())
  objects_documented = set().union(
    *(
      names
      for kind, names in inventory.items()
      if kind.startswith("py:") and kind != "py:module"
    )
  )
  missing = []
  for name in modules:
    module = importlib.import_module(name)
    if name not in modules_documented:
      missing.append(name)
    for public in getattr(module, "__all__", ()):
      full = f"{name}.{public}"
      if inspect.ismodule(getattr(module, public)):
        if getattr(module, public).__name__ not in modules_documented:
          missing.append(full)
      elif full not in objects_documented:
        obj = getattr(module, public)
        home = (
          f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        )
        if not (full in modules_documented and home in objects_documented):
          missing.append(full)
  return missing


def test_undocumented_reports_modules_and_names_without_an_entry():
  inventory = {
    "py:module": {"osgd_jax.zoo", "osgd_jax.grads"},
    "py:function": {
      "osgd_jax.grads.value_and_per_exit_grads",
      "osgd_jax.grads.check_aux_pair",
      "osgd_jax.staged.ROWS",
    },  # the wrong type is fine
    # Not a Python entry:
    "std:doc": {"osgd_jax.staged.staged_value_and_per_exit_grads"},
  }
  assert undocumented(inventory, ["osgd_jax.grads"]) == [
    "osgd_jax.grads.check_loss_vector"
  ]
  assert undocumented(inventory, ["osgd_jax.staged"]) == [
    "osgd_jax.staged",  # the module itself
    "osgd_jax.staged.staged_value_and_per_exit_grads",
  ]
  # osgd_jax.app.data.augment names a module and, in __all__, a function.
  shadowed = {"py:module": {"osgd_jax.app.data.augment"}, "py:function": set()}
  assert "osgd_jax.app.data.augment" in undocumented(
    shadowed, ["osgd_jax.app.data"]
  )
  shadowed["py:function"].add("osgd_jax.app.data.augment.augment")
  assert "osgd_jax.app.data.augment" not in undocumented(
    shadowed, ["osgd_jax.app.data"]
  )


def test_the_public_modules_are_the_faces_and_what_they_hold():
  modules = public_modules()
  assert {
    "osgd_jax",
    "osgd_jax.aggregation",
    "osgd_jax.weightings",
    "osgd_jax.app.train",
    "osgd_jax.zoo.registry",
  } <= set(modules)
  assert not any(is_private(m) for m in modules)
  assert "osgd_jax.aggregation._osgd" in {  # private, so left out
    m.name for m in pkgutil.walk_packages(osgd_jax.__path__, "osgd_jax.")
  }
  assert {
    "osgd_jax",
    "osgd_jax.aggregation",
    "osgd_jax.weightings",
    "osgd_jax.grads",
    "osgd_jax.zoo",
    "osgd_jax.app",
    "osgd_jax.app.train",
    "osgd_jax.app.compare",
    "osgd_jax.app.data",
  } <= set(faces(modules))
  assert "osgd_jax.zoo.registry" not in faces(modules)  # a section of zoo's


@pytest.mark.slow
def test_docs_build_without_warnings_and_index_every_public_name(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "sphinx",
      "-W",
      "--keep-going",
      "-n",
      "-q",
      "-b",
      "html",
      "-d",
      str(tmp_path / "doctrees"),
      str(DOCS),
      str(tmp_path / "html"),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, (
    "the docs do not build cleanly:\n" + result.stderr[-6000:]
  )
  with open(tmp_path / "html" / "objects.inv", "rb") as f:
    loaded = InventoryFile.load(f, "", posixpath.join)
  inventory = {kind: set(entries) for kind, entries in loaded.items()}
  modules = public_modules()
  assert undocumented(inventory, modules) == []
  # No private name has an entry: private modules are documented at a face.
  assert [
    name
    for entries in inventory.values()
    for name in entries
    if name.startswith("osgd_jax") and is_private(name)
  ] == []
  # Every public name of an object leads to the same entry, on the page of
  # the face that defines it: osgd_jax.osgd is osgd_jax.aggregation.osgd.
  uris = {
    name: _uri(entry)
    for kind, entries in loaded.items()
    if kind.startswith("py:")
    for name, entry in entries.items()
  }
  entries_of = {}
  for module_name in modules:
    module = importlib.import_module(module_name)
    for name in getattr(module, "__all__", ()):
      obj, full = getattr(module, name), f"{module_name}.{name}"
      if inspect.ismodule(obj) or full in inventory["py:module"]:
        continue  # a module, or a name a module of the same name takes
      key = (
        id(obj)
        if inspect.isfunction(obj) or inspect.isclass(obj)
        else (name, id(obj))
      )
      entries_of.setdefault(key, set()).add(uris[full])
  assert [sorted(u) for u in entries_of.values() if len(u) > 1] == []
  for alias, home, face in (
    ("osgd_jax.osgd", "osgd_jax.aggregation.osgd", "osgd_jax.aggregation"),
    (
      "osgd_jax.OsgdState.cosine",
      "osgd_jax.aggregation.OsgdState.cosine",
      "osgd_jax.aggregation",
    ),
    (
      "osgd_jax.weightings.Weighting",
      "osgd_jax.aggregation.Weighting",
      "osgd_jax.aggregation",
    ),
    ("osgd_jax.zoo.registry.create", "osgd_jax.zoo.create", "osgd_jax.zoo"),
    (
      "osgd_jax.app.train.loop.train",
      "osgd_jax.app.train.train",
      "osgd_jax.app.train",
    ),
  ):
    assert uris[alias] == uris[home] == f"api/{face}.html#{home}", alias
  # One page per face, and no other API page.
  pages = inventory["std:doc"]
  assert {p for p in pages if p.startswith("api/")} == {"api/index"} | {
    f"api/{face}" for face in faces(modules)
  }
  # The guides, the notebooks (rendered, not run) and the benchmarks.
  for page in (
    "index",
    "guides/quickstart",
    "guides/cli",
    "design",
    "faults",
    "experiments",
    "_generated/notebooks/01_quickstart",
    "_generated/benchmarks/RESULTS",
    "api/osgd_jax",
  ):
    assert page in pages, page


def _flags(text: str) -> set[str]:
  """The long options (``--name``) that ``text`` names."""
  return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def test_the_cli_guide_names_every_flag_of_osgd_train():
  flags = _flags(cli.build_parser().format_help()) - {"--help"}
  assert {"--model", "--optimizer", "--mesh", "--no-progress"} <= flags
  assert sorted(flags - _flags(CLI_GUIDE.read_text())) == []


def test_the_cli_guide_names_every_flag_of_osgd_compare():
  out = io.StringIO()
  with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
    compare.main(["--help"])
  assert exit_.value.code == 0
  flags = _flags(out.getvalue()) - {"--help"}
  assert {"--models", "--optimizers", "--seeds"} <= flags
  assert sorted(flags - _flags(CLI_GUIDE.read_text())) == []
