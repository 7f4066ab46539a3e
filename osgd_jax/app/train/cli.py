"""The ``osgd-train`` command: flags, config files and one-line errors.

Every flag but ``--config`` and ``--download`` mirrors a
:class:`osgd_jax.app.train.TrainConfig` field. A YAML or JSON file given with
``--config`` supplies defaults whose keys are the flag names (``batch_size``
or ``batch-size``); flags on the command line override it. ``--download``
fetches a CIFAR archive missing from ``--data-dir`` before the run starts;
it says what to fetch, not how to train, so it is no part of the run's
configuration (``config.json``) and never stands in the way of ``--resume``.
Bad input ends with one line on stderr saying what is wrong and what to do,
and exit status 2; a diverged run, a failed write or a failed download
exits with status 1. The run directory is printed first; Ctrl-C keeps the
finished epochs and ends with one line giving the command that resumes the
run (status 130).

Run it as ``osgd-train`` or ``python -m osgd_jax.app``. It lives beside the
trainer it drives (:func:`osgd_jax.app.train.train`), as ``osgd-compare``
lives beside its experiment; ``osgd_jax.app.train`` does not import it, so
that training from Python never loads the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any, get_args

import jax
import yaml

from osgd_jax import aggregation, sharding, zoo
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
from osgd_jax.app.data import (
  CIFAR_ARCHIVES,
  DATASET_ALIASES,
  DATASET_NAMES,
  DownloadError,
  download_cifar,
)
from osgd_jax.app.report import exit_table
from osgd_jax.app.train import (
  COORDINATE_OPTIMIZERS,
  ENGINES,
  OPTIMIZERS,
  PER_EXIT_GRADS,
  SCHEDULES,
  TrainConfig,
  TrainingDiverged,
  TrainingInterrupted,
  default_output_dir,
  train,
)
from osgd_jax.app.train.artefacts import figure_name

__all__ = ["main", "build_parser", "config_from_args", "resume_command"]

# The flags that are no TrainConfig field: they say where the settings come
# from and what to fetch, not how to train.
_COMMAND_ONLY = ("config", "download")


def _float_list(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected comma-separated numbers such as 1,1,2,4; got {text!r}"
    ) from None


def build_parser(prog: str = "osgd-train") -> argparse.ArgumentParser:
  """The argument parser of ``osgd-train``; its defaults are TrainConfig's.

  Args:
    prog: the command's name in usage and error lines.

  Returns:
    The parser; every destination is a
    :class:`~osgd_jax.app.train.TrainConfig` field, plus ``config`` and
    ``download``.

  Example:
    >>> build_parser().parse_args(["--epochs", "3"]).epochs
    3
  """
  d = TrainConfig()
  p = OneLineArgumentParser(
    prog=prog,
    description="Train an anytime network with Orthogonalized SGD (or the"
    " summed-loss SGD baseline), then print per-exit test accuracy, FLOPs"
    " and parameters, and write metrics.json, accuracy_vs_flops.png and"
    " checkpoints to --out. With no arguments: a nested network on"
    " scikit-learn's digits, in about a minute on 2 CPU cores.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument(
    "--config",
    help="YAML or JSON file whose keys mirror these flags; flags given"
    " on the command line override it; None: the flags alone",
  )
  p.add_argument(
    "--model",
    default="",  # TrainConfig picks the data set's default model
    choices=zoo.names(),
    help="zoo model name; '': the data set's default model (e.g."
    " nested-depth-resnet on digits, nested-depth-conv1d on mnist1d)",
  )
  p.add_argument(
    "--preset",
    default=d.preset,
    help="model preset (cifar, digits, mnist1d, text, or text-small: a"
    " language model of half the text preset's context and width, for a"
    " CPU; see osgd_jax.zoo.presets); None: the dataset's",
  )
  p.add_argument(
    "--dataset",
    default=d.dataset,
    choices=DATASET_NAMES + tuple(DATASET_ALIASES),
    help="the data set; CIFAR-10 and the like are aliases",
  )
  p.add_argument(
    "--data-dir",
    default=d.data_dir,
    help="directory holding the CIFAR archives or their extracted"
    " folders (None: digits, mnist1d and synthetic need none)",
  )
  p.add_argument(
    "--text-file",
    default=d.text_file,
    metavar="PATH",
    help="--dataset text: the text to train a byte-level language model"
    " on, its last tenth held out for testing; None: the source of"
    " Python standard-library modules of the running interpreter",
  )
  p.add_argument(
    "--text-bytes",
    type=int,
    default=d.text_bytes,
    metavar="N",
    help="--dataset text: use only the text's first N bytes (the last"
    " tenth of those held out for testing), for a shorter run; None: all",
  )
  p.add_argument(
    "--download",
    action="store_true",
    help="download the CIFAR archive into --data-dir if neither it"
    " nor its extracted folder is there, checking its MD5 (digits"
    " and synthetic have nothing to download)",
  )
  p.add_argument(
    "--validation",
    type=float,
    default=d.validation,
    metavar="FRACTION",
    help="hold out this fraction of the training set (stratified,"
    " with a fixed seed), train on the rest and evaluate on it"
    " instead of the test set, which it then never scores on;"
    " 0: train on all and evaluate on the test set",
  )
  p.add_argument(
    "--optimizer",
    default=d.optimizer,
    choices=OPTIMIZERS,
    help="sgd: gradient of the summed (weighted) exit losses;"
    " every other name aggregates the per-exit gradients, with"
    " its defaults: osgd, orthogonalized; sum, mean, linear,"
    " geometric: fixed exit weights (linear and geometric ramp"
    " up with depth, summing to K); sdn: SDN's early-exit weights"
    " rising over training; adaloss: weights 1/EMA(loss); pcgrad,"
    " mgda, upgrad and the rest: TorchJD's multi-task"
    " aggregators (see the weightings guide; most return"
    " mean-sized updates, about 1/K of a sum: scale --lr)",
  )
  p.add_argument(
    "--granularity",
    default=d.granularity,
    choices=get_args(aggregation.Granularity),
    help="OSGD basis per parameter tensor or over all parameters"
    " (the baseline aggregators always work over all)",
  )
  p.add_argument(
    "--method",
    default=d.method,
    choices=get_args(aggregation.OsgdMethod),
    help="OSGD kernel: two-pass Gram/LDL or sequential Gram-Schmidt",
  )
  p.add_argument(
    "--rescale",
    action="store_true",
    help="OSGD: scale each projected component back to the norm"
    " of its exit's gradient (the paper is silent; an option)",
  )
  p.add_argument(
    "--switch-to-sgd",
    type=float,
    default=d.switch_to_sgd,
    metavar="FRACTION",
    help="after this fraction of the run's steps, sum the exit"
    " gradients (plain SGD) instead of aggregating them, e.g."
    " 0.8; None: never",
  )
  p.add_argument(
    "--exit-weights",
    type=_float_list,
    default=d.exit_weights,
    help="comma-separated loss weight per exit; None: all 1",
  )
  p.add_argument(
    "--per-exit-grads",
    default=d.per_exit_grads,
    choices=PER_EXIT_GRADS,
    help="staged: exit k's backward pass covers stages 1..k only"
    " (its rows looped on CPU, batched on GPU/TPU; -looped or"
    " -batched forces one); vmap: K full backward passes, the"
    " fallback for losses that read later exits",
  )
  p.add_argument(
    "--engine",
    default=d.engine,
    choices=ENGINES,
    help="what the aggregator receives: stacked per-exit gradients (K"
    " copies of the parameters), or a gramian (their K×K Gram matrices"
    " and one weighted backward pass, without the copies); auto: gramian"
    " wherever the optimizer takes one, stacked for sgd, --method"
    f" sequential and {', '.join(COORDINATE_OPTIMIZERS)}",
  )
  p.add_argument(
    "--epochs",
    type=int,
    default=d.epochs,
    help="training epochs; the schedule spans them all",
  )
  p.add_argument(
    "--batch-size",
    type=int,
    default=d.batch_size,
    help="examples per step: the global batch, split over the devices",
  )
  p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
  p.add_argument(
    "--schedule",
    default=d.schedule,
    choices=SCHEDULES,
    help="learning-rate schedule from the peak --lr: cosine decays to 0,"
    " step divides by 10 at half and three quarters of the run",
  )
  p.add_argument(
    "--momentum",
    type=float,
    default=d.momentum,
    help="heavy-ball momentum, in [0, 1)",
  )
  p.add_argument(
    "--weight-decay",
    type=float,
    default=d.weight_decay,
    help="weight decay, added to the update after the aggregation",
  )
  p.add_argument(
    "--seed",
    type=int,
    default=d.seed,
    help="seeds the model, the data order and the augmentation",
  )
  p.add_argument(
    "--out",
    default=d.out,
    help="the run directory; None: a new one under runs/",
  )
  p.add_argument(
    "--resume",
    action="store_true",
    help="continue from the latest checkpoint in --out",
  )
  p.add_argument(
    "--eval-every",
    type=int,
    default=d.eval_every,
    help="evaluate on the test set (or the --validation split)"
    " every N epochs (and at the end)",
  )
  p.add_argument(
    "--keep-checkpoints",
    type=int,
    default=d.keep_checkpoints,
    help="how many of the newest checkpoints to keep",
  )
  p.add_argument(
    "--progress",
    action=argparse.BooleanOptionalAction,
    default=d.progress,
    help="show the progress bar and the compiling line, or hide them",
  )
  p.add_argument(
    "--log-every",
    type=int,
    default=d.log_every,
    help="fetch the losses from the device every N steps (and"
    " at the end of each epoch) for the progress bar, the"
    " divergence check and TensorBoard; changes no result",
  )
  p.add_argument(
    "--tensorboard",
    default=d.tensorboard,
    metavar="DIR",
    help="also write the losses and test accuracies as"
    " TensorBoard scalars to DIR (needs the tensorboard extra);"
    " None: no TensorBoard",
  )
  p.add_argument(
    "--mesh",
    default=d.mesh,
    help="train over devices: data=D,model=M splits each batch"
    " over D devices and each parameter over M (one axis may be"
    " -1: all remaining devices); None: one device",
  )
  return p


def _read_config_file(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise ValueError(f"config file {path} does not exist; check --config.")
  with open(path) as f:
    text = f.read()
  try:
    if path.endswith((".yaml", ".yml")):
      values = yaml.safe_load(text)
    else:
      values = json.loads(text)
  except Exception as e:  # json and yaml raise their own error types
    kind = "YAML" if path.endswith((".yaml", ".yml")) else "JSON"
    raise ValueError(
      f"config file {path} is not valid {kind}: {str(e).splitlines()[0]}"
    ) from None
  if not isinstance(values, dict):
    raise ValueError(
      f"config file {path} must hold a mapping of flag names to values."
    )
  return {k.replace("-", "_"): v for k, v in values.items()}


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
  """Parses ``argv`` (and ``--config``) into a validated TrainConfig.

  Args:
    argv: the command's arguments; ``None`` reads ``sys.argv``.

  Returns:
    The validated configuration.

  Raises:
    SystemExit: with status 2 on an argparse error.
    ValueError: a bad config file or value.

  Example:
    >>> config = config_from_args(["--optimizer", "sgd",
    ...                            "--exit-weights", "1,1,2,4"])
    >>> config.optimizer, config.exit_weights
    ('sgd', (1.0, 1.0, 2.0, 4.0))
  """
  return _parse(argv)[0]


def _parse(argv: Sequence[str] | None) -> tuple[TrainConfig, bool]:
  """The validated configuration, and whether ``--download`` was given."""
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.config:
    file_values = _read_config_file(args.config)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(file_values) - fields)
    if unknown:
      raise ValueError(
        f"unknown key(s) {unknown} in {args.config}; valid keys:"
        f" {', '.join(sorted(fields))}."
      )
    parser.set_defaults(**file_values)
    args = parser.parse_args(argv)
  values = {k: v for k, v in vars(args).items() if k not in _COMMAND_ONLY}
  config = TrainConfig(**values)  # it turns a file's list into a tuple
  config.validate()
  return config, args.download


def _download(config: TrainConfig) -> None:
  """Fetches the run's CIFAR archive when ``--data-dir`` lacks it."""
  if config.dataset not in CIFAR_ARCHIVES:
    return  # digits ship with scikit-learn; synthetic data is generated
  if config.data_dir is None:
    raise ValueError(
      f"--download needs --data-dir: the directory to keep"
      f" {config.dataset}'s archive in."
    )
  # Every process fetches what its own --data-dir lacks; on a shared file
  # system, concurrent downloads each write a file of their own and the
  # last complete one takes the archive's name.
  download_cifar(config.dataset, config.data_dir, progress=config.progress)


def resume_command(
  argv: Sequence[str], out: str, *, resume: bool = True
) -> str:
  """The shell command that resumes the run of ``osgd-train argv`` in ``out``.

  Args:
    argv: the arguments the run was started with.
    out: its output directory.
    resume: add ``--resume``; without it, the command starts the run again.

  Returns:
    ``osgd-train`` with the same arguments, ``--out out`` and ``--resume``.

  Example:
    >>> resume_command(["--epochs", "5", "--out", "a b"], "/runs/a b")
    "osgd-train --epochs 5 --out '/runs/a b' --resume"
  """
  kept, skip = [], False
  for arg in argv:
    if skip or arg == "--resume" or arg.startswith("--out="):
      skip = False
      continue
    if arg == "--out":
      skip = True
      continue
    kept.append(arg)
  return shlex.join(
    ["osgd-train", *kept, "--out", out] + (["--resume"] if resume else [])
  )


def _interrupted(error: TrainingInterrupted, argv: Sequence[str]) -> str:
  if error.last_epoch is None:
    again = resume_command(argv, error.out, resume=False)
    return (
      "interrupted before the first epoch was saved; nothing to"
      f" resume. Start again with: {again}"
    )
  saved = (
    f"epochs 1-{error.last_epoch} are" if error.last_epoch > 1 else "epoch 1 is"
  )
  return (
    f"interrupted; {saved} saved in {error.out}. Resume with:"
    f" {resume_command(argv, error.out)}"
  )


def _closed_stdout_advice(argv: Sequence[str], out: str | None) -> str:
  if out is None:
    return "run the command again with its output to a terminal or a file."
  log = shlex.quote(os.path.join(out, "train.log"))
  return (
    f"the checkpoints of finished epochs are kept in {out}. Resume with the"
    f" output to a file: {resume_command(argv, out)} > {log}"
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``osgd-train``.

  Args:
    argv: the command's arguments; ``None`` reads ``sys.argv``.

  Returns:
    The process exit status: 0, ``EXIT_BAD_INPUT``, ``EXIT_FAILED`` or
    ``EXIT_INTERRUPTED``.
  """
  quiet_library_logs()
  prog = "osgd-train"
  argv = list(sys.argv[1:] if argv is None else argv)
  out = None  # the run directory, once known
  try:
    # Before anything touches a device: a multi-process launch (TPU pod,
    # Slurm, mpirun, or JAX_COORDINATOR_ADDRESS/..._PROCESS_ID) joins here.
    sharding.initialize_distributed()
    config, download = _parse(argv)
    if download:
      _download(config)
    if config.out is None and jax.process_count() == 1:
      # Named now, so that an interrupted run can say where it is.
      config = dataclasses.replace(config, out=default_output_dir(config))
    out = config.out
    if jax.process_index() == 0 and config.out is not None:
      print(f"run directory: {os.path.abspath(config.out)}", flush=True)
    result = train(config)
  except ValueError as e:  # bad input: data, flags, --out, checkpoints
    print_error(prog, e)
    return EXIT_BAD_INPUT
  except (TrainingDiverged, CheckpointWriteError, DownloadError) as e:
    print_error(prog, e)
    return EXIT_FAILED
  except BrokenPipeError:  # stdout's reader went away (`osgd-train | head`)
    return stdout_closed(prog, _closed_stdout_advice(argv, out))
  except OSError as e:  # the file system failed outside a checkpoint
    print_error(
      prog,
      f"{e}; the checkpoints of finished epochs are kept."
      " Fix the file system, then resume with --resume (or run"
      " again if no epoch was saved).",
    )
    return EXIT_FAILED
  except TrainingInterrupted as e:
    print_error(prog, _interrupted(e, argv))
    return EXIT_INTERRUPTED
  except KeyboardInterrupt:
    print_error(prog, "interrupted before training started; nothing was saved.")
    return EXIT_INTERRUPTED
  if jax.process_index() != 0:  # process 0 reports for the run
    return 0
  print(
    f"{config.model} on {config.dataset}, optimizer {config.optimizer},"
    f" {config.epochs} epochs"
  )
  print(
    exit_table(
      result.accuracy,
      result.flops.flops,
      result.params,
      result.flops.source,
      split=result.evaluated_on,
      bits_per_byte=result.bits_per_byte,
    )
  )
  print(
    f"artefacts: {os.path.join(result.out, 'metrics.json')},"
    f" {os.path.join(result.out, figure_name(config.dataset))},"
    f" {os.path.join(result.out, 'checkpoints')}"
  )
  return 0


if __name__ == "__main__":
  # `python -m osgd_jax.app.train.cli`: the command without the app extra
  # check of `python -m osgd_jax.app` and the console script.
  raise SystemExit(main())
