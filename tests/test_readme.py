"""The README's and the guides' Python blocks run as written, imports included.

A reader follows a page from the top, so each page's blocks run in order in
one fresh namespace, with nothing imported for them: a block may use what an
earlier block of its page defined, never what another page did. The pages
are README.md, docs/index.md and docs/guides/*.md. The suite's 8 host devices
stand in for the devices of the multi-device guide.
"""

from __future__ import annotations

import os
import pathlib
import re

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [
  README,
  ROOT / "docs" / "index.md",
  *sorted((ROOT / "docs" / "guides").glob("*.md")),
]
_BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def _blocks(page: pathlib.Path) -> list[tuple[int, str]]:
  """The page's Python blocks, each with the line number it starts on."""
  text = page.read_text()
  return [
    (text.count("\n", 0, m.start(1)), m.group(1)) for m in _BLOCK.finditer(text)
  ]


def _page_id(page: pathlib.Path) -> str:
  return str(page.relative_to(ROOT))


def test_the_blocks_are_found():
  # Guards the test below against passing vacuously: the pages show the
  # Optax loop, the staged zoo step, a user weighting, a stateful one, the
  # sharded step and early exit, and the README has its example.
  assert len(_blocks(README)) >= 1
  blocks = [block for page in PAGES for _, block in _blocks(page)]
  assert len(blocks) >= 12
  for needle in (
    "value_and_per_exit_grads",
    "staged_value_and_per_exit_grads",
    "from_weighting",
    "StatefulWeighting",
    "sharding.shard_batch",
    "anytime.early_exit",
  ):
    assert any(needle in block for block in blocks), needle


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=_page_id)
def test_page_blocks_run_in_order(page):
  namespace = {"__name__": "__docs__"}
  for line, block in _blocks(page):
    # Padded so that a traceback gives the line in the page.
    exec(compile("\n" * line + block, str(page), "exec"), namespace)  # pylint: disable=exec-used
    for name in ("losses", "updates"):
      if name in namespace:  # a training step's result is a number, not NaN
        for leaf in jax.tree.leaves(namespace[name]):
          assert np.all(np.isfinite(np.asarray(leaf))), (page.name, line, name)


def test_the_fault_table_names_tests_that_exist():
  # docs/faults.md gives the test of every fault case; a renamed or deleted
  # test must not leave the table pointing at nothing.
  text = (ROOT / "docs" / "faults.md").read_text()
  path, named = None, []
  for ref in re.findall(
    r"`((?:tests/[\w/]+\.py)?::\w+|tests/[\w/]+\.py)`", text
  ):
    file, _, test = ref.partition("::")
    path = file or path
    if test:
      named.append((path, test))
  assert len(named) >= 15, named
  for file, test in named:
    assert re.search(rf"^def {test}\(", (ROOT / file).read_text(), re.M), (
      file,
      test,
    )


# The pages that show generated comparison tables: the README (the
# original MLP runs) and the experiment page (the sequence models').
TABLE_PAGES = (README, ROOT / "docs" / "experiments.md")
RESULTS = ROOT / "docs" / "results"


def _sections() -> dict[str, pathlib.Path]:
  """Each comparison section's name -> the page that holds it."""
  found = {}
  for page in TABLE_PAGES:
    names = re.findall(
      r"^<!-- compare:([\w.-]+):begin -->$", page.read_text(), re.M
    )
    for name in names:
      assert name not in found, f"section {name} is on two pages"
      found[name] = page
  return found


def test_the_generated_tables_are_what_their_results_files_give():
  # The experiment's tables are made, never typed: `osgd-compare --report
  # docs/results/<section>.json --readme PAGE --section <section>` writes
  # them between the section's markers. Each section must be what its
  # committed results file gives today, and each results file must have
  # its section, on the README or the experiment page.
  from osgd_jax.app.compare import load_results, render_markdown  # pylint: disable=g-import-not-at-top
  from osgd_jax.app.compare.report import replace_section  # pylint: disable=g-import-not-at-top

  sections = _sections()
  assert sorted(sections) == sorted(p.stem for p in RESULTS.glob("*.json"))
  for section, page in sections.items():
    text = page.read_text()
    payload = load_results(str(RESULTS / f"{section}.json"))
    assert replace_section(text, section, render_markdown(payload)) == text, (
      f"{page.name}'s {section} tables differ from docs/results/"
      f"{section}.json; run: osgd-compare --report docs/results/"
      f"{section}.json --readme {page.relative_to(ROOT)} --section {section}"
    )


def _png_size(data: bytes) -> tuple[int, int]:
  """A PNG's (width, height), from its IHDR chunk."""
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
  return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_each_comparison_shows_its_differences_figure(tmp_path):
  # Beside its tables, each section shows the report's forest plot, copied
  # to docs/results/<section>-differences.png. Pixels differ between
  # matplotlib versions, but the size follows the models and optimizers
  # drawn: a figure of another results file would not match.
  from osgd_jax.app.compare import load_results  # pylint: disable=g-import-not-at-top
  from osgd_jax.app.compare.report import (
    DIFFERENCES_FIGURE,
    write_differences_figure,
  )  # pylint: disable=g-import-not-at-top

  sections = _sections()
  assert sections
  for section, page in sections.items():
    figure = f"docs/results/{section}-differences.png"
    # Linked relative to the page: docs/experiments.md links results/...
    link = os.path.relpath(ROOT / figure, page.parent)
    assert f"]({link})" in page.read_text(), f"{page.name} does not show {link}"
    payload = load_results(str(RESULTS / f"{section}.json"))
    made = write_differences_figure(payload, str(tmp_path))
    assert _png_size((ROOT / figure).read_bytes()) == _png_size(
      pathlib.Path(made).read_bytes()
    ), (
      f"{figure} is not docs/results/{section}.json's; run:"
      f" osgd-compare --report docs/results/{section}.json"
      f" --report-out /tmp/{section} && cp /tmp/{section}/"
      f"{DIFFERENCES_FIGURE} {figure}"
    )
