"""The README's and the guides' code blocks run as written, imports included.

A reader follows a page from the top, so each page's Python blocks run in
order in one fresh namespace, with nothing imported for them: a block may
use what an earlier block of its page defined, never what another page did.
The pages are README.md, docs/index.md and docs/guides/*.md. The suite's 8
host devices stand in for the devices of the multi-device guide.

The README's bash blocks are its set-up commands, and what "run as written"
can honestly mean differs per command, so each kind of line is handled on
its own and any other line fails the test:

* ``python -m pip install -e ".[EXTRAS]"``: installing needs a package
  index, which the suite must not reach. The test checks what the line
  would do instead: each extra exists in pyproject.toml, and every
  requirement it brings (the extras it names included) is installed here
  at a version it accepts, so the command has nothing left to change.
* ``osgd-train``: the default run, which
  ``tests/app/test_train_cli.py`` runs in a process of its own, as the
  README says: cut to 3 epochs, stopped with Ctrl-C after the first and
  resumed as its message advises, it must print its per-exit table and
  write its artefacts. The whole default run (15 epochs) is left out for
  time only.
* ``python -m pytest``: this very test runs under it. The test checks that
  the line is the one .ci/run runs and that pytest's configured test paths
  collect this file.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
import shlex
import tomllib

import jax
import numpy as np
import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The generated result tables, which the README links to.
RESULTS_PAGE = ROOT / "docs" / "results.md"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PAGES = [
  README,
  ROOT / "docs" / "index.md",
  *sorted((ROOT / "docs" / "guides").glob("*.md")),
]
_BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
_ANY_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)


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


# The pages that show generated comparison tables: the results page (the
# original MLP runs) and the experiment page (the sequence models').
TABLE_PAGES = (RESULTS_PAGE, ROOT / "docs" / "experiments.md")
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
  # Beside its tables, each section of docs/results.md shows the report's
  # forest plot, copied to docs/results/<section>-differences.png; the
  # README shows one of them. Pixels differ between
  # matplotlib versions, but the size follows the models and optimizers
  # drawn: a figure of another results file would not match.
  from osgd_jax.app.compare import load_results  # pylint: disable=g-import-not-at-top
  from osgd_jax.app.compare.report import (
    DIFFERENCES_FIGURE,
    write_differences_figure,
  )  # pylint: disable=g-import-not-at-top

  shown = re.findall(
    r"\]\((docs/results/[\w.-]+-differences\.png)\)", (README.read_text())
  )
  assert shown and all((ROOT / f).is_file() for f in shown), shown
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


# ---------------------------------------------------------------------------
# The README a newcomer reads first: short, complete, and its set-up
# commands run as written (see the module docstring for what that means for
# each kind of line).

TEST_COMMAND = 'python -m pip install -e ".[test]" && python -m pytest'


def test_the_readme_is_short_and_has_what_a_newcomer_needs():
  text = README.read_text()
  assert len(text.encode()) < 12 * 1024
  headings = re.findall(r"^## (.+)$", text, re.M)
  for heading in (
    "Installation",
    "Set-up: the two commands",
    "OSGD in an Optax loop",
    "OSGD on a Flax NNX model",
    "Does OSGD help?",
  ):
    assert heading in headings, heading
  help_section = text.split("## Does OSGD help?")[1].split("\n## ")[0]
  assert "](docs/results/" in help_section  # the figure
  assert "](docs/results.md)" in help_section  # the full tables
  # The NNX quickstart: a zoo model, per-exit gradients of the model
  # itself, and nnx.Optimizer with OSGD.
  nnx_block = _blocks(README)[1][1]
  for needle in (
    "osgd_jax.zoo.create(",
    "value_and_per_exit_grads(loss_fn)(model, x, y)",
    "nnx.Optimizer(model, osgd_jax.osgd_sgd(",
    "wrt=nnx.Param",
    "optimizer.update(model, grads)",
  ):
    assert needle in nnx_block, needle


def test_every_readme_block_is_python_or_bash():
  # Both kinds are run below or above; a block of another kind would be
  # code that nothing checks.
  kinds = [kind for kind, _ in _ANY_BLOCK.findall(README.read_text())]
  assert set(kinds) == {"python", "bash"}, kinds


def _bash_commands() -> list[str]:
  """Each command of the README's bash blocks (`a && b` gives two)."""
  commands = []
  for kind, block in _ANY_BLOCK.findall(README.read_text()):
    if kind != "bash":
      continue
    for line in block.splitlines():
      line = line.strip()
      if line and not line.startswith("#"):
        commands += [part.strip() for part in line.split("&&")]
  return commands


_INSTALL = re.compile(r'python -m pip install -e "\.\[([\w,-]+)\]"')


def _extra_requirements(extras: list[str]) -> list[Requirement]:
  """The requirements the extras bring, the project's own extras expanded."""
  optional = PYPROJECT["project"]["optional-dependencies"]
  name = PYPROJECT["project"]["name"]
  found, pending, seen = [], list(extras), set()
  while pending:
    extra = pending.pop()
    if extra in seen:
      continue
    seen.add(extra)
    assert extra in optional, f"the README installs an unknown extra {extra}"
    for line in optional[extra]:
      requirement = Requirement(line)
      if requirement.name == name:
        pending += sorted(requirement.extras)
      else:
        found.append(requirement)
  return found


def test_every_readme_command_is_one_the_suite_runs_or_checks():
  commands = _bash_commands()
  assert commands == [
    'python -m pip install -e ".[app]"',
    "osgd-train",
    'python -m pip install -e ".[test]"',
    "python -m pytest",
  ], commands


@pytest.mark.parametrize(
  "command", [c for c in _bash_commands() if _INSTALL.fullmatch(c)]
)
def test_the_readmes_installs_would_change_nothing_here(command):
  extras = _INSTALL.fullmatch(command).group(1).split(",")
  for requirement in _extra_requirements(extras):
    if requirement.marker is not None and not requirement.marker.evaluate():
      continue
    try:
      version = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
      pytest.fail(f"{command}: {requirement} is not installed")
    assert requirement.specifier.contains(version, prereleases=True), (
      command,
      str(requirement),
      version,
    )


def test_the_readmes_osgd_train_is_the_run_the_cli_test_interrupts():
  (command,) = [c for c in _bash_commands() if c.startswith("osgd-train")]
  # The default run, which tests/app/test_train_cli.py runs as a user
  # would, cut to 3 epochs, stopped with Ctrl-C and resumed.
  assert shlex.split(command) == ["osgd-train"]
  readme = " ".join(README.read_text().split())
  assert "stopped with Ctrl-C after its first epoch" in readme
  cli_tests = (ROOT / "tests" / "app" / "test_train_cli.py").read_text()
  assert "def test_default_run_interrupted_then_resumed_as_advised" in cli_tests


def test_the_readmes_test_command_is_the_one_ci_runs_and_runs_this_test():
  assert TEST_COMMAND in README.read_text()
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert ci[-1] == TEST_COMMAND
  testpaths = PYPROJECT["tool"]["pytest"]["ini_options"]["testpaths"]
  assert any(
    pathlib.Path(__file__).resolve().is_relative_to(ROOT / path)
    for path in testpaths
  ), testpaths


def test_no_page_tells_to_install_osgd_jax_from_the_registry():
  # osgd-jax is not on PyPI yet: a newcomer following `pip install
  # osgd-jax` fails at step one. Installs go through a clone, a wheel or
  # the repository's URL.
  docs = ROOT / "docs"
  pages = [README, *sorted(docs.rglob("*.md")), *sorted(docs.rglob("*.rst"))]
  for folder, pattern in (("notebooks", "*"), ("examples", "*.py")):
    pages += sorted((ROOT / folder).glob(pattern))
  registry = re.compile(r"pip install\s+(?:-\S+\s+)*[\"']?osgd-jax\b")
  found = [
    f"{page.relative_to(ROOT)}: {m.group(0)}"
    for page in pages
    if page.is_file()
    for m in registry.finditer(page.read_text(encoding="utf-8"))
  ]
  assert found == []
