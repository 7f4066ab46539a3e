"""What ``--help`` tells a newcomer: each option's default, once.

argparse's own ``ArgumentDefaultsHelpFormatter`` writes every default; the
tests read the help a user reads (``format_help``), split it into one entry
per option, and count the ``(default: ...)`` notes in each.
"""

from __future__ import annotations

import pathlib
import re

import pytest

from osgd_jax.app.compare import cli as compare_cli
from osgd_jax.app.compare import experiment
from osgd_jax.app.train import TrainConfig
from osgd_jax.app.train import cli as train_cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
PARSERS = {
  "osgd-train": train_cli.build_parser,
  "osgd-compare": compare_cli.build_parser,
}


def _option_entries(help_text: str) -> dict[str, str]:
  """Each option's entry of ``help_text``, keyed by its first flag."""
  options = help_text.split("\noptions:\n", 1)[1]
  # An entry starts on a line indented by two spaces and a dash; its
  # wrapped help continues on more deeply indented lines.
  entries = re.split(r"\n(?=  -)", "\n" + options.strip("\n"))
  found = {}
  for entry in entries:
    entry = " ".join(entry.split())  # one line, whatever the width
    if entry:
      found[entry.split()[0].rstrip(",")] = entry
  return found


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
  # argparse wraps help to $COLUMNS; the entries are joined either way, but
  # a wide terminal keeps each flag on its entry's first line.
  monkeypatch.setenv("COLUMNS", "120")


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_option_shows_its_default_once(command):
  parser = PARSERS[command]()
  entries = _option_entries(parser.format_help())
  flags = {
    action.option_strings[0]
    for action in parser._actions  # pylint: disable=protected-access
    if action.option_strings and action.dest != "help"
  }
  assert flags <= set(entries), flags - set(entries)
  for flag in flags:
    notes = re.findall(r"\(default: ", entries[flag])
    assert len(notes) == 1, (flag, entries[flag])


def test_osgd_train_shows_the_training_defaults_a_newcomer_asks_for():
  entries = _option_entries(train_cli.build_parser().format_help())
  d = TrainConfig()
  for flag, value in (
    ("--epochs", d.epochs),
    ("--batch-size", d.batch_size),
    ("--schedule", d.schedule),
    ("--momentum", d.momentum),
    ("--weight-decay", d.weight_decay),
    ("--lr", d.lr),
  ):
    assert entries[flag].endswith(f"(default: {value})"), entries[flag]


def test_the_progress_flag_reads_as_what_it_does():
  # `--no-progress` used to read "hide the progress bar (default: True)".
  parser = train_cli.build_parser()
  entry = _option_entries(parser.format_help())["--progress"]
  assert entry.startswith("--progress, --no-progress show the progress bar")
  assert entry.endswith("(default: True)")
  assert parser.parse_args([]).progress is True
  assert parser.parse_args(["--no-progress"]).progress is False


def test_osgd_compare_defaults_to_a_plan_a_cpu_finishes(
  tmp_path, monkeypatch, capsys
):
  # Its defaults used to train the four ResNets: hours on a CPU, unsaid.
  # Now: MLPs only, a run count the help states, printed before the runs.
  parser = compare_cli.build_parser()
  args = parser.parse_args([])
  assert args.models and all(m.endswith("-mlp") for m in args.models)
  runs = experiment.Plan(
    TrainConfig(),
    tuple(args.models),
    tuple(args.optimizers),
    compare_cli.parse_lr_grid(args.lr_grid),
    args.validation,
    tuple(range(args.seeds)),
  ).num_runs
  assert runs <= 60
  help_text = " ".join(parser.format_help().split())
  assert f"Without flags it makes {runs} runs of two small MLPs" in help_text
  # The durations the README gives (measured on a 2-core CPU) are the
  # help's.
  readme = " ".join((ROOT / "README.md").read_text().split())
  compare_time = "10 to 25 minutes on 2 CPU cores"
  assert compare_time in help_text and compare_time in readme
  assert f"({runs} runs, {compare_time})" in readme
  train_help = " ".join(train_cli.build_parser().format_help().split())
  assert "about a minute on 2 CPU cores" in train_help
  assert "about a minute on 2 CPU cores" in readme

  def stop(plan):  # the runs would start here
    raise KeyboardInterrupt

  monkeypatch.setattr(experiment, "run_comparison", stop)
  assert compare_cli.main(["--out", str(tmp_path / "cmp")]) == 130
  out = capsys.readouterr().out
  assert out.startswith(f"output directory: {tmp_path / 'cmp'}; {runs} runs")
