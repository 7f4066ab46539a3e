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


def test_the_generated_tables_are_what_their_results_files_give():
  # The experiment's tables are made, never typed: `osgd-compare --report
  # docs/results/<section>.json --readme README.md --section <section>`
  # writes them between the section's markers. Each section must be what
  # its committed results file gives today, and each results file must have
  # its section.
  from osgd_jax.app.compare import load_results, render_markdown  # pylint: disable=g-import-not-at-top
  from osgd_jax.app.compare.report import replace_section  # pylint: disable=g-import-not-at-top
  text = README.read_text()
  sections = re.findall(r"^<!-- compare:([\w.-]+):begin -->$", text, re.M)
  results = README.parent / "docs" / "results"
  assert sorted(sections) == sorted(p.stem for p in results.glob("*.json"))
  for section in sections:
    payload = load_results(str(results / f"{section}.json"))
    assert replace_section(text, section, render_markdown(payload)) == text, (
        f"README's {section} tables differ from docs/results/{section}.json;"
        f" run: osgd-compare --report docs/results/{section}.json --readme"
        f" README.md --section {section}")
