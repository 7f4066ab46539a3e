"""The README's Python blocks run as written, imports included.

Users paste them into a fresh interpreter, so each runs in a namespace of its
own, with nothing imported for it. The suite's 8 host devices stand in for
the devices of the multi-device block.
"""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def _blocks() -> list[str]:
  return _BLOCK.findall(README.read_text())


def _first_line(block: str) -> str:
  return next(line for line in block.splitlines()
              if line and not line.startswith(("import", "from")))


def test_the_blocks_are_found():
  # Guards the test below against passing vacuously: the README shows the
  # Optax loop, the staged zoo step, a user weighting and the sharded step.
  blocks = _blocks()
  assert len(blocks) >= 4
  for needle in ("value_and_per_exit_grads", "staged_value_and_per_exit_grads",
                 "from_weighting", "sharding.shard_batch"):
    assert any(needle in block for block in blocks), needle


@pytest.mark.parametrize("block", _blocks(), ids=_first_line)
def test_readme_block_runs_as_written(block):
  namespace = {"__name__": "__readme__"}
  exec(compile(block, str(README), "exec"), namespace)  # pylint: disable=exec-used
  for name in ("losses", "updates"):
    if name in namespace:  # a training step's result is a number, not NaN
      for leaf in jax.tree.leaves(namespace[name]):
        assert np.all(np.isfinite(np.asarray(leaf))), (name, leaf)


def test_the_fault_table_names_tests_that_exist():
  # docs/faults.md gives the test of every fault case; a renamed or deleted
  # test must not leave the table pointing at nothing.
  root = README.parent
  text = (root / "docs" / "faults.md").read_text()
  path, named = None, []
  for ref in re.findall(r"`((?:tests/[\w/]+\.py)?::\w+|tests/[\w/]+\.py)`", text):
    file, _, test = ref.partition("::")
    path = file or path
    if test:
      named.append((path, test))
  assert len(named) >= 15, named
  for file, test in named:
    assert re.search(rf"^def {test}\(", (root / file).read_text(), re.M), (
        file, test)
