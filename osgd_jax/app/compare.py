"""The OSGD-vs-baselines experiment: ``osgd-compare``.

Trains every requested model with each optimizer (by default OSGD and SGD; any
subset of ``osgd_jax.app.train.OPTIMIZERS``) on the same data and seeds,
then prints and saves the mean ± std test accuracy per exit (``compare.md``,
``compare.json``) and a figure per model (``compare-<model>.png``).

Run it as ``osgd-compare`` or ``python -m osgd_jax.app.compare``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Sequence

import numpy as np

from osgd_jax import zoo
from osgd_jax.app.command_line import (EXIT_BAD_INPUT, OneLineArgumentParser,
                                       print_error, quiet_library_logs)
from osgd_jax.app.report import plot_exit_accuracy, write_json
from osgd_jax.app.train import (OPTIMIZERS, TrainConfig, prepare_output_dir,
                                train)

__all__ = ["DEFAULT_MODELS", "DEFAULT_OPTIMIZERS", "compare", "format_table", "main"]

DEFAULT_OPTIMIZERS = ("osgd", "sgd")
DEFAULT_MODELS = ("branched-resnet", "nested-width-resnet",
                  "nested-depth-resnet", "nested-width-depth-resnet")


def compare(base: TrainConfig, models: Sequence[str], optimizers: Sequence[str],
            seeds: Sequence[int]) -> dict[str, dict[str, np.ndarray]]:
  """Trains every (model, optimizer, seed) and collects test accuracy per exit.

  Args:
    base: settings shared by all runs; ``model``, ``optimizer``, ``seed`` and
      ``out`` are replaced per run (``out`` becomes a sub-directory).
    models: zoo model names.
    optimizers: names from ``osgd_jax.app.train.OPTIMIZERS``.
    seeds: the seeds, the same for every model and optimizer.

  Returns:
    ``results[model][optimizer]``: an array ``(len(seeds), K)`` of accuracies.
  """
  results: dict[str, dict[str, np.ndarray]] = {}
  for model in models:
    results[model] = {}
    for optimizer in optimizers:
      rows = []
      for seed in seeds:
        config = dataclasses.replace(
            base, model=model, optimizer=optimizer, seed=seed,
            out=os.path.join(base.out, model, optimizer, f"seed{seed}"))
        print(f"training {model} with {optimizer}, seed {seed}", flush=True)
        rows.append(train(config).test_accuracy)
      results[model][optimizer] = np.stack(rows)
  return results


def format_table(results: dict[str, dict[str, np.ndarray]]) -> str:
  """A Markdown table: one row per (model, optimizer), mean ± std per exit.

  Args:
    results: ``results[model][optimizer]``, accuracies ``(seeds, K)`` in
      [0, 1], as :func:`compare` returns them.

  Returns:
    The table, in percent.

  Example:
    >>> runs = {"osgd": np.array([[0.5, 0.9], [0.7, 0.9]])}
    >>> print(format_table({"branched-mlp": runs}))
    | model | optimizer | exit 1 | exit 2 |
    | --- | --- | --- | --- |
    | branched-mlp | osgd | 60.0 ± 10.0 | 90.0 ± 0.0 |
  """
  num_exits = max(a.shape[1] for runs in results.values() for a in runs.values())
  header = "| model | optimizer | " + " | ".join(
      f"exit {k}" for k in range(1, num_exits + 1)) + " |"
  lines = [header, "|" + " --- |" * (num_exits + 2)]
  for model, runs in results.items():
    for optimizer, acc in runs.items():
      cells = [f"{100 * m:.1f} ± {100 * s:.1f}"
               for m, s in zip(acc.mean(0), acc.std(0))]
      lines.append(f"| {model} | {optimizer} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``osgd-compare``.

  Args:
    argv: the command's arguments; ``None`` reads ``sys.argv``.

  Returns:
    The process exit status: 0, or ``EXIT_BAD_INPUT``.
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
    base.validate()
    results = compare(base, args.models, args.optimizers, range(args.seeds))
  except ValueError as e:
    print_error("osgd-compare", e)
    return EXIT_BAD_INPUT
  table = format_table(results)
  print(table)
  with open(os.path.join(base.out, "compare.md"), "w") as f:
    f.write(table + "\n")
  write_json(os.path.join(base.out, "compare.json"),
             {"config": base.to_json(), "seeds": args.seeds,
              "accuracy": {m: {o: a for o, a in r.items()}
                           for m, r in results.items()}})
  for model, runs in results.items():
    plot_exit_accuracy({o: (a.mean(0), a.std(0)) for o, a in runs.items()},
                       os.path.join(base.out, f"compare-{model}.png"),
                       title=f"{model} on {args.dataset}, {args.seeds} seeds")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
