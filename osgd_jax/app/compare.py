"""The OSGD-vs-baselines experiment: ``osgd-compare``.

Trains every requested model with each optimizer (by default OSGD and SGD; any
subset of ``osgd_jax.app.train.OPTIMIZERS``) on the same data and seeds,
then prints and saves the mean ± std test accuracy per exit (``compare.md``,
``compare.json``) and a figure per model (``compare-<model>.png``).

Each run records its outcome in ``result.json`` in its own directory, so the
same command can be run again: finished runs are skipped, interrupted ones
resumed from their checkpoints, and a run whose loss diverged is recorded
as diverged in the table instead of ending the comparison.

Run it as ``osgd-compare`` or ``python -m osgd_jax.app.compare``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any, Sequence

import numpy as np

from osgd_jax import zoo
from osgd_jax.app.checkpoint import CheckpointWriteError
from osgd_jax.app.command_line import (EXIT_BAD_INPUT, EXIT_FAILED,
                                       EXIT_INTERRUPTED, OneLineArgumentParser,
                                       print_error, quiet_library_logs)
from osgd_jax.app.report import plot_exit_accuracy, write_json
from osgd_jax.app.train import (OPTIMIZERS, TrainConfig, TrainingDiverged,
                                config_differences, describe_differences,
                                prepare_output_dir, train)

__all__ = ["DEFAULT_MODELS", "DEFAULT_OPTIMIZERS", "RESULT_FILE", "compare",
           "format_table", "main", "run_once"]

#: A finished (or diverged) run's outcome, in the run's own directory.
RESULT_FILE = "result.json"

#: The optimizers ``osgd-compare`` compares without ``--optimizers``.
DEFAULT_OPTIMIZERS = ("osgd", "sgd")
#: The models ``osgd-compare`` trains without ``--models``.
DEFAULT_MODELS = ("branched-resnet", "nested-width-resnet",
                  "nested-depth-resnet", "nested-width-depth-resnet")


def _read_result(config: TrainConfig) -> dict[str, Any] | None:
  path = os.path.join(config.out, RESULT_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      result = json.load(f)
    saved = result["config"]
    status = result["status"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f"cannot read {path} ({e}); run the comparison with a new --out.") from None
  changed = config_differences(saved, config)
  if changed:
    raise ValueError(
        f"{config.out} holds a finished run with other settings than this"
        f" comparison's ({describe_differences(saved, config, changed)});"
        " run the comparison with its settings or a new --out.")
  if status not in ("finished", "diverged"):
    raise ValueError(f"{path} has an unknown status {status!r}; run the"
                     " comparison with a new --out.")
  return result


def _has_checkpoints(out: str) -> bool:
  # Orbax names a complete checkpoint by its step; a partial one has a suffix.
  directory = os.path.join(out, "checkpoints")
  return os.path.isdir(directory) and any(
      name.isdigit() for name in os.listdir(directory))


def run_once(config: TrainConfig) -> tuple[str, np.ndarray | None]:
  """Trains one run of a comparison, or reads its recorded outcome.

  A run with a ``result.json`` of the same settings is not trained again;
  one with checkpoints but no result is resumed; a run whose loss diverges
  is recorded as diverged.

  Args:
    config: the run's settings; ``config.out`` is its own directory.

  Returns:
    ``(status, accuracy)``: ``status`` is ``"trained"``, ``"resumed"``,
    ``"skipped"`` (finished earlier) or ``"diverged"``; ``accuracy`` is the
    ``(K,)`` test accuracy per exit, or ``None`` for a diverged run.

  Raises:
    ValueError: the directory holds a run with other settings.
  """
  recorded = _read_result(config)
  if recorded is not None:
    if recorded["status"] == "diverged":
      return "diverged", None
    return "skipped", np.asarray(recorded["test_accuracy"])
  resume = _has_checkpoints(config.out)
  try:
    result = train(dataclasses.replace(config, resume=resume))
  except TrainingDiverged as e:
    write_json(os.path.join(config.out, RESULT_FILE),
               {"status": "diverged", "config": config.to_json(),
                "reason": str(e)})
    return "diverged", None
  write_json(os.path.join(config.out, RESULT_FILE),
             {"status": "finished", "config": config.to_json(),
              "test_accuracy": result.test_accuracy})
  return ("resumed" if resume else "trained"), result.test_accuracy


def compare(base: TrainConfig, models: Sequence[str], optimizers: Sequence[str],
            seeds: Sequence[int]) -> dict[str, dict[str, np.ndarray]]:
  """Trains every (model, optimizer, seed) and collects test accuracy per exit.

  Runs finished by an earlier call with the same ``base.out`` are read, not
  trained again (see :func:`run_once`); each run prints a progress line.

  Args:
    base: settings shared by all runs; ``model``, ``optimizer``, ``seed`` and
      ``out`` are replaced per run (``out`` becomes a sub-directory).
    models: zoo model names.
    optimizers: names from ``osgd_jax.app.train.OPTIMIZERS``.
    seeds: the seeds, the same for every model and optimizer.

  Returns:
    ``results[model][optimizer]``: an array ``(len(seeds), K)`` of accuracies,
    a row of NaN for a run that diverged.
  """
  results: dict[str, dict[str, np.ndarray]] = {}
  total = len(models) * len(optimizers) * len(seeds)
  done = 0
  for model in models:
    results[model] = {}
    for optimizer in optimizers:
      rows = []
      for seed in seeds:
        config = dataclasses.replace(
            base, model=model, optimizer=optimizer, seed=seed,
            out=os.path.join(base.out, model, optimizer, f"seed{seed}"))
        done += 1
        name = f"[{done}/{total}] {model}, {optimizer}, seed {seed}"
        print(name, flush=True)  # the run's epochs print below it
        start = time.perf_counter()
        status, accuracy = run_once(config)
        rows.append(accuracy)
        summary = ("" if accuracy is None else " (last exit "
                   f"{100 * accuracy[-1]:.1f}%)")
        print(f"{name}: {status} in {time.perf_counter() - start:.0f} s"
              f"{summary}", flush=True)
      num_exits = max((len(r) for r in rows if r is not None), default=0)
      results[model][optimizer] = np.stack(
          [np.full(num_exits, np.nan) if r is None else r for r in rows])
  return results


def format_table(results: dict[str, dict[str, np.ndarray]]) -> str:
  """A Markdown table: one row per (model, optimizer), mean ± std per exit.

  Args:
    results: ``results[model][optimizer]``, accuracies ``(seeds, K)`` in
      [0, 1], as :func:`compare` returns them; a NaN row is a diverged run.

  Returns:
    The table, in percent, over the runs that did not diverge; an
    optimizer with diverged runs says how many.

  Example:
    >>> runs = {"osgd": np.array([[0.5, 0.9], [0.7, 0.9]])}
    >>> print(format_table({"branched-mlp": runs}))
    | model | optimizer | exit 1 | exit 2 |
    | --- | --- | --- | --- |
    | branched-mlp | osgd | 60.0 ± 10.0 | 90.0 ± 0.0 |
    >>> runs["sgd"] = np.array([[0.4, 0.8], [np.nan, np.nan]])
    >>> print(format_table({"branched-mlp": runs}).splitlines()[-1])
    | branched-mlp | sgd (1/2 diverged) | 40.0 ± 0.0 | 80.0 ± 0.0 |
  """
  num_exits = max(a.shape[1] for runs in results.values() for a in runs.values())
  header = "| model | optimizer | " + " | ".join(
      f"exit {k}" for k in range(1, num_exits + 1)) + " |"
  lines = [header, "|" + " --- |" * (num_exits + 2)]
  for model, runs in results.items():
    for optimizer, acc in runs.items():
      finished = acc[~np.isnan(acc).any(axis=1)] if acc.size else acc
      diverged = len(acc) - len(finished)
      label = optimizer + (f" ({diverged}/{len(acc)} diverged)" if diverged
                           else "")
      if len(finished):
        cells = [f"{100 * m:.1f} ± {100 * s:.1f}"
                 for m, s in zip(finished.mean(0), finished.std(0))]
      else:
        cells = ["diverged"] * num_exits
      lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``osgd-compare``.

  Args:
    argv: the command's arguments; ``None`` reads ``sys.argv``.

  Returns:
    The process exit status: 0, ``EXIT_BAD_INPUT``, ``EXIT_FAILED`` (a
    failed write) or ``EXIT_INTERRUPTED``.
  """
  defaults = TrainConfig()
  p = OneLineArgumentParser(
      prog="osgd-compare",
      description="Train optimizers (default: osgd and sgd) on the same"
      " models, data and seeds and"
      " report the mean ± std test accuracy per exit.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                 choices=zoo.names(), metavar="MODEL")
  p.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS),
                 choices=OPTIMIZERS, metavar="OPTIMIZER",
                 help=f"any of: {', '.join(OPTIMIZERS)}")
  p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
  p.add_argument("--dataset", default=defaults.dataset)
  p.add_argument("--data-dir", default=defaults.data_dir)
  p.add_argument("--epochs", type=int, default=defaults.epochs)
  p.add_argument("--batch-size", type=int, default=defaults.batch_size)
  p.add_argument("--lr", type=float, default=defaults.lr)
  p.add_argument("--out", default="runs/compare")
  args = p.parse_args(argv)
  quiet_library_logs()
  try:
    if args.seeds < 1:
      raise ValueError(f"--seeds must be >= 1, got {args.seeds}.")
    base = TrainConfig(dataset=args.dataset, data_dir=args.data_dir,
                       epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, out=prepare_output_dir(args.out),
                       progress=False)
    for model in args.models:  # each with the data set, before any run
      dataclasses.replace(base, model=model).validate()
    print(f"output directory: {base.out}", flush=True)
    results = compare(base, args.models, args.optimizers, range(args.seeds))
  except ValueError as e:
    print_error("osgd-compare", e)
    return EXIT_BAD_INPUT
  except (CheckpointWriteError, OSError) as e:
    print_error("osgd-compare", e)
    return EXIT_FAILED
  except KeyboardInterrupt:
    print_error("osgd-compare", "interrupted; the finished runs are kept in"
                f" {args.out}. Run the same command again to continue: it"
                " skips them and resumes the interrupted one.")
    return EXIT_INTERRUPTED
  table = format_table(results)
  print(table)
  with open(os.path.join(base.out, "compare.md"), "w") as f:
    f.write(table + "\n")
  write_json(os.path.join(base.out, "compare.json"),
             {"config": base.to_json(), "seeds": args.seeds,
              # null marks a diverged run
              "accuracy": {m: {o: [None if np.isnan(row).any() else row
                                   for row in a] for o, a in r.items()}
                           for m, r in results.items()}})
  for model, runs in results.items():
    finished = {o: a[~np.isnan(a).any(axis=1)] for o, a in runs.items()}
    plot_exit_accuracy({o: (a.mean(0), a.std(0))
                        for o, a in finished.items() if len(a)},
                       os.path.join(base.out, f"compare-{model}.png"),
                       title=f"{model} on {args.dataset}, {args.seeds} seeds")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
