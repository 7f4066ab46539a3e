"""The documentation site builds cleanly and covers the whole public API.

The slow test builds docs/ as a user would (``sphinx-build -W --keep-going
-n -b html``): a docstring that fails to render, a broken cross-reference or
a page left out of the table of contents fails it. It runs in a subprocess,
so that Sphinx's global state never reaches the other tests of its worker.
From the ``objects.inv`` it writes, every name in the ``__all__`` of every
public module must have an entry, so a public symbol without documentation
fails the suite. The fast tests check that the command-line guide names every
flag of both commands.
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


def public_modules() -> list[str]:
  """Every module of the package but ``__main__``."""
  return ["osgd_jax"] + sorted(
      m.name for m in pkgutil.walk_packages(osgd_jax.__path__, "osgd_jax.")
      if not m.name.endswith(".__main__"))


def undocumented(inventory: dict[str, set[str]],
                 modules: list[str]) -> list[str]:
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
  objects_documented = set().union(*(
      names for kind, names in inventory.items()
      if kind.startswith("py:") and kind != "py:module"))
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
        home = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        if not (full in modules_documented and home in objects_documented):
          missing.append(full)
  return missing


def test_undocumented_reports_modules_and_names_without_an_entry():
  inventory = {
      "py:module": {"osgd_jax.zoo", "osgd_jax.transform"},
      "py:function": {"osgd_jax.transform.osgd", "osgd_jax.transform.osgd_sgd",
                      "osgd_jax.transform.METHODS"},  # the wrong type is fine
      "std:doc": {"osgd_jax.transform.OsgdState"},  # not a Python entry
  }
  assert undocumented(inventory, ["osgd_jax.transform"]) == [
      "osgd_jax.transform.OsgdState", "osgd_jax.transform.SwitchToSumState",
      "osgd_jax.transform.switch_to_sum"]
  missing = undocumented(inventory, ["osgd_jax.zoo.registry"])
  assert missing[0] == "osgd_jax.zoo.registry"  # the module itself
  assert "osgd_jax.zoo.registry.create" in missing
  # osgd_jax.app.data.augment names a module and, in __all__, a function.
  shadowed = {"py:module": {"osgd_jax.app.data.augment"}, "py:function": set()}
  assert "osgd_jax.app.data.augment" in undocumented(
      shadowed, ["osgd_jax.app.data"])
  shadowed["py:function"].add("osgd_jax.app.data.augment.augment")
  assert "osgd_jax.app.data.augment" not in undocumented(
      shadowed, ["osgd_jax.app.data"])


@pytest.mark.slow
def test_docs_build_without_warnings_and_index_every_public_name(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q",
       "-b", "html", "-d", str(tmp_path / "doctrees"), str(DOCS),
       str(tmp_path / "html")],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, (
      "the docs do not build cleanly:\n" + result.stderr[-6000:])
  with open(tmp_path / "html" / "objects.inv", "rb") as f:
    loaded = InventoryFile.load(f, "", posixpath.join)
  inventory = {kind: set(entries) for kind, entries in loaded.items()}
  modules = public_modules()
  assert {"osgd_jax", "osgd_jax.app.train", "osgd_jax.zoo.registry"} <= set(
      modules)
  assert undocumented(inventory, modules) == []
  # Re-exports resolve to the one entry of their definition.
  assert {"osgd_jax.osgd", "osgd_jax.transform.osgd", "osgd_jax.zoo.create",
          "osgd_jax.OsgdState.cosine"} <= inventory["py:function"] | inventory[
              "py:attribute"]
  # The guides, the notebooks (rendered, not run) and the benchmarks.
  pages = inventory["std:doc"]
  for page in ("index", "guides/quickstart", "guides/cli", "design", "faults",
               "experiments", "_generated/notebooks/01_quickstart",
               "_generated/benchmarks/RESULTS", "api/osgd_jax"):
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
