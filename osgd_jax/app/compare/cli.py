"""The ``osgd-compare`` command: train a comparison, or report one.

``osgd-compare [training flags]`` runs both phases
(:mod:`osgd_jax.app.compare.experiment`) in ``--out``, writes
``results.json`` there, then the report. ``osgd-compare --report
results.json`` makes the report from the file alone, trains nothing, and
with ``--readme docs/results.md --section NAME`` also puts the tables
between that section's markers in that Markdown file. Bad input is one
line and exit status 2, a failed write 1, Ctrl-C 130 (the finished runs
are kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence

from osgd_jax import zoo
from osgd_jax.app.checkpoint import CheckpointWriteError
from osgd_jax.app.commands import (
  EXIT_BAD_INPUT,
  EXIT_FAILED,
  EXIT_INTERRUPTED,
  OneLineArgumentParser,
  print_error,
  quiet_library_logs,
  stdout_closed,
)
from osgd_jax.app.compare import experiment, variants
from osgd_jax.app.compare.report import replace_section, write_report
from osgd_jax.app.compare.results import load_results
from osgd_jax.app.compare.tables import render_markdown
from osgd_jax.app.report import write_json
from osgd_jax.app.train import TrainConfig, prepare_output_dir

__all__ = [
  "DEFAULT_LR_GRID",
  "DEFAULT_MODELS",
  "DEFAULT_OPTIMIZERS",
  "RESULTS_FILE",
  "build_parser",
  "main",
  "parse_lr_grid",
]

#: The comparison's results, in its output directory.
RESULTS_FILE = "results.json"
#: The optimizers compared without ``--optimizers``.
DEFAULT_OPTIMIZERS = ("sgd", "osgd", variants.MATCHED)
#: The models trained without ``--models``: two MLPs, so that the default
#: plan fits a CPU (the ResNets and CIFAR are for a GPU or TPU).
DEFAULT_MODELS = ("branched-mlp", "nested-depth-mlp")
#: Steps of about 2 (1-2-5 per decade) from a fifth of the training default
#: (0.05) to ten times it. Optimizers whose updates are about the size of one
#: exit's gradient (MGDA, UPGrad, 1/K of a sum at K = 4) find their match of
#: 0.05, about 0.2, inside the grid, and with momentum 0.9 rates above 0.5
#: make the summed-loss step diverge on the digits models.
DEFAULT_LR_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
# Test runs per optimizer without --seeds (seeds 0..4).
_DEFAULT_SEEDS = 5
# The share of the training set the tuning runs validate on.
_DEFAULT_VALIDATION = 0.2
_SWITCH_PERCENT = 100 * (1 - variants.VARIANTS["osgd-switch"]["switch_to_sgd"])
# The training flags, which --report (it trains nothing) does not take.
_TRAINING = (
  "models",
  "optimizers",
  "seeds",
  "lr_grid",
  "validation",
  "dataset",
  "preset",
  "data_dir",
  "text_file",
  "text_bytes",
  "epochs",
  "batch_size",
  "out",
)


def parse_lr_grid(text: str) -> tuple[float, ...]:
  """The rates of ``--lr-grid``, ascending.

  Args:
    text: comma-separated numbers, such as ``0.01,0.05,0.1``.

  Returns:
    The rates, sorted.

  Raises:
    ValueError: an empty grid, a rate that is not a finite number > 0, or
      one given twice.

  Example:
    >>> parse_lr_grid("0.1, 0.01")
    (0.01, 0.1)
  """
  advice = "give finite rates > 0 separated by commas, such as 0.01,0.05,0.1"
  try:
    rates = [float(v) for v in text.split(",")]
  except ValueError:
    raise ValueError(
      f"--lr-grid {text!r} is not a list of numbers; {advice}."
    ) from None
  bad = [r for r in rates if not (math.isfinite(r) and r > 0)]
  if bad:
    raise ValueError(
      f"--lr-grid {text!r} has {bad[0]}, not a finite rate > 0; {advice}."
    )
  if len(set(rates)) < len(rates):
    raise ValueError(f"--lr-grid {text!r} names a rate twice; {advice}.")
  return tuple(sorted(rates))


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of ``osgd-compare``.

  Returns:
    The parser.

  Example:
    >>> build_parser().parse_args([]).seeds
    5
  """
  defaults = TrainConfig()
  default_runs = experiment.Plan(
    defaults,
    DEFAULT_MODELS,
    DEFAULT_OPTIMIZERS,
    DEFAULT_LR_GRID,
    _DEFAULT_VALIDATION,
    tuple(range(_DEFAULT_SEEDS)),
  ).num_runs
  p = OneLineArgumentParser(
    prog="osgd-compare",
    description="Compare optimizers on the same models, data and seeds:"
    " tune each one's learning rate on a validation split of the training"
    " set, train the chosen rate with every seed, and report the test"
    " accuracy per exit, the paired differences from sgd with 95%"
    " intervals, and the accuracy over the whole grid (results.json,"
    " report.md, figures). With --report, make the report from a"
    " results.json without training. Without flags it makes"
    f" {default_runs} runs of two small MLPs on the digits, 10 to 25"
    " minutes on 2 CPU cores (one run of 15 epochs takes 10 to 30 s);"
    " the ResNets and CIFAR take hours there: give them a GPU or TPU.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument(
    "--models",
    nargs="+",
    default=list(DEFAULT_MODELS),
    choices=zoo.names(),
    metavar="MODEL",
    help="zoo models to train: any of " + ", ".join(zoo.names()),
  )
  p.add_argument(
    "--optimizers",
    nargs="+",
    default=list(DEFAULT_OPTIMIZERS),
    metavar="OPTIMIZER",
    help="any of: " + ", ".join(variants.VARIANTS) + ";"
    " osgd-global: one basis over all parameters; osgd-rescale:"
    " components keep their exit's norm; osgd-switch: plain SGD"
    f" for the last {_SWITCH_PERCENT:g}%% of the steps;"
    " sgd-matched: summed-loss"
    " SGD at osgd's rate times the measured ratio of the update"
    " norms (needs osgd)",
  )
  p.add_argument(
    "--seeds",
    type=int,
    default=_DEFAULT_SEEDS,
    help="test runs per optimizer, seeds 0..N-1; the intervals need N >= 2",
  )
  p.add_argument(
    "--lr-grid",
    default=",".join(map(str, DEFAULT_LR_GRID)),
    help="the peak learning rates to tune over, comma-separated",
  )
  p.add_argument(
    "--validation",
    type=float,
    default=_DEFAULT_VALIDATION,
    help="fraction of the training set the tuning runs validate"
    " on (stratified, fixed split)",
  )
  p.add_argument(
    "--dataset",
    default=defaults.dataset,
    help="the data set, as osgd-train's --dataset",
  )
  p.add_argument(
    "--preset",
    default=defaults.preset,
    help="the zoo preset of every model, as osgd-train's --preset (e.g."
    " text-small, a language model sized for a CPU); None: the data set's",
  )
  p.add_argument(
    "--data-dir",
    default=defaults.data_dir,
    help="directory holding the CIFAR archives, as osgd-train's"
    " --data-dir; None: digits, mnist1d and synthetic need none",
  )
  p.add_argument(
    "--text-file",
    default=defaults.text_file,
    metavar="PATH",
    help="--dataset text: the text, as osgd-train's --text-file; None:"
    " the source of Python standard-library modules",
  )
  p.add_argument(
    "--text-bytes",
    type=int,
    default=defaults.text_bytes,
    metavar="N",
    help="--dataset text: use only the text's first N bytes, as"
    " osgd-train's --text-bytes; None: all of it",
  )
  p.add_argument(
    "--epochs",
    type=int,
    default=defaults.epochs,
    help="training epochs of every run",
  )
  p.add_argument(
    "--batch-size",
    type=int,
    default=defaults.batch_size,
    help="examples per step of every run",
  )
  p.add_argument(
    "--out",
    default="runs/compare",
    help="the comparison's directory: one per run, results.json and the report",
  )
  p.add_argument(
    "--report",
    metavar="RESULTS",
    help="make the report from this results.json; trains nothing; None: train",
  )
  p.add_argument(
    "--report-out",
    metavar="DIR",
    help="where --report writes report.md and the figures;"
    " None: the results file's directory",
  )
  p.add_argument(
    "--readme",
    metavar="FILE",
    help="with --report: put the tables between the --section's"
    " markers in this Markdown file; None: no file",
  )
  p.add_argument(
    "--section",
    metavar="NAME",
    help="with --readme: the section to fill, which the lines"
    " <!-- compare:NAME:begin --> and <!-- compare:NAME:end -->"
    " enclose",
  )
  return p


def _plan(args: argparse.Namespace) -> experiment.Plan:
  if not 1 <= args.seeds <= experiment.MAX_SEEDS:
    raise ValueError(
      f"--seeds must be an integer from 1 to"
      f" {experiment.MAX_SEEDS}, got {args.seeds}."
    )
  grid = parse_lr_grid(args.lr_grid)
  if not (math.isfinite(args.validation) and 0 < args.validation < 1):
    raise ValueError(
      "--validation must be a finite number in (0, 1): the"
      " tuning runs validate on that fraction of the training"
      f" set; got {args.validation}."
    )
  variants.check_names(args.optimizers)
  base = TrainConfig(
    dataset=args.dataset,
    preset=args.preset,
    data_dir=args.data_dir,
    text_file=args.text_file,
    text_bytes=args.text_bytes,
    epochs=args.epochs,
    batch_size=args.batch_size,
    out=args.out,
    progress=False,
  )
  for model in args.models:  # every run's settings, before any work
    for name in args.optimizers:
      variants.config_for(
        base, name, model=model, lr=grid[0], validation=args.validation
      ).validate()
  base = dataclasses.replace(base, out=prepare_output_dir(args.out))
  return experiment.Plan(
    base,
    tuple(args.models),
    tuple(args.optimizers),
    grid,
    args.validation,
    tuple(range(args.seeds)),
  )


def _report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  given = [
    f"--{d.replace('_', '-')}"
    for d in _TRAINING
    if getattr(args, d) != parser.get_default(d)
  ]
  if given:
    raise ValueError(
      f"--report makes the report from a results file and"
      f" trains nothing; leave out {', '.join(given)}."
    )
  payload = load_results(args.report)
  out = args.report_out or os.path.dirname(os.path.abspath(args.report))
  if args.readme is not None:
    if not os.path.isfile(args.readme):
      raise ValueError(
        f"--readme {args.readme} does not exist; name the"
        " Markdown file whose section to fill."
      )
    with open(args.readme) as f:
      text = replace_section(
        f.read(), args.section, render_markdown(payload), where=args.readme
      )
  paths = write_report(payload, out)
  if args.readme is not None:
    with open(args.readme, "w") as f:
      f.write(text)
    paths.append(args.readme)
  print(render_markdown(payload))
  print("wrote " + ", ".join(paths))


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``osgd-compare``.

  Args:
    argv: the command's arguments; ``None`` reads ``sys.argv``.

  Returns:
    The process exit status: 0, ``EXIT_BAD_INPUT``, ``EXIT_FAILED`` (a
    failed write) or ``EXIT_INTERRUPTED``.

  Example:
    >>> main(["--report", "/nonexistent/results.json"])  # one line on stderr
    2
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  quiet_library_logs()
  try:
    if (args.readme is None) != (args.section is None):
      raise ValueError(
        "--readme and --section go together: the file and"
        " the section of it to fill."
      )
    if args.report is None:
      if args.readme is not None or args.report_out is not None:
        raise ValueError(
          "--report-out, --readme and --section go with"
          " --report RESULTS, the results file to report."
        )
    else:
      _report(args, parser)
      return 0
    plan = _plan(args)
    print(
      f"output directory: {plan.out}; {plan.num_runs} runs to make"
      " (any finished before are read, not trained again)",
      flush=True,
    )
    payload = experiment.run_comparison(plan)
    path = os.path.join(plan.out, RESULTS_FILE)
    write_json(path, payload)
    written = write_report(payload, plan.out)
  except ValueError as e:
    print_error("osgd-compare", e)
    return EXIT_BAD_INPUT
  except BrokenPipeError:  # stdout's reader went away (`osgd-compare | head`)
    if args.report is not None:
      return stdout_closed(
        "osgd-compare",
        "the report's files were written before its tables were printed."
        " Run the same command again with its output to a file to see them.",
      )
    return stdout_closed(
      "osgd-compare",
      f"the finished runs are kept in {args.out}. Run the same command again"
      " with its output to a file to continue: it skips them.",
    )
  except (CheckpointWriteError, OSError) as e:
    print_error("osgd-compare", e)
    return EXIT_FAILED
  except KeyboardInterrupt:
    if args.report is not None:
      print_error(
        "osgd-compare",
        "interrupted; the report may be"
        " incomplete. Run the same command again.",
      )
    else:
      print_error(
        "osgd-compare",
        "interrupted; the finished runs are kept"
        f" in {args.out}. Run the same command again to continue:"
        " it skips them and resumes the interrupted one.",
      )
    return EXIT_INTERRUPTED
  print(render_markdown(payload))
  print("wrote " + ", ".join([path, *written]))
  return 0
