"""Every Example in the package's docstrings runs and prints what it shows.

Examples are documentation users copy; one that no longer runs is a bug.
They run as ``doctest`` runs them, with their module's globals. (An example
that needs data that is not here is marked ``# doctest: +SKIP``.)
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import osgd_jax


def _modules() -> list[str]:
  return sorted(
    m.name for m in pkgutil.walk_packages(osgd_jax.__path__, prefix="osgd_jax.")
  )


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
  module = importlib.import_module(name)
  finder = doctest.DocTestFinder(exclude_empty=True)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  for test in finder.find(module, name):
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, (
    f"{result.failed} of {result.attempted} docstring examples in {name}"
    " failed; the report is above"
  )


def test_the_examples_are_found():
  # The finder sees the examples of the public API (guards the test above
  # against passing vacuously).
  finder = doctest.DocTestFinder(exclude_empty=True)
  found = {
    t.name
    for name in _modules()
    for t in finder.find(importlib.import_module(name), name)
  }
  for public in (
    "osgd_jax.aggregation._osgd.osgd",
    "osgd_jax.aggregation._osgd.osgd_sgd",
    "osgd_jax.grads.value_and_per_exit_grads",
    "osgd_jax.staged.staged_value_and_per_exit_grads",
  ):
    assert public in found, sorted(found)
