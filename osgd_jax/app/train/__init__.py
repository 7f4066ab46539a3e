"""Training anytime networks: OSGD, the baselines, or summed-loss SGD.

``train(TrainConfig(...))`` runs what ``osgd-train`` runs (see
:mod:`osgd_jax.app.train.cli`), in pieces with one job each:

* :mod:`~osgd_jax.app.train.config`: the settings, their validation, and
  which of them a resumed run may change;
* :mod:`~osgd_jax.app.train.optimizer`: the gradient pipeline from the
  optimizer's name;
* :mod:`~osgd_jax.app.train.step`: the jitted step;
* :mod:`~osgd_jax.app.train.run`: starting a run (output directory, data,
  model, mesh, checkpoints, resume);
* :mod:`~osgd_jax.app.train.loop`: the epochs, evaluation and checkpoints;
* :mod:`~osgd_jax.app.train.callbacks`: the records the loop hands out, and
  TensorBoard;
* :mod:`~osgd_jax.app.train.artefacts`: ``metrics.json``, the figure and
  the result;
* :mod:`~osgd_jax.app.train.cli`: the command, which this package does not
  import (it needs this package, and training needs no command).
"""

from osgd_jax.app.train.artefacts import (
  METRICS_FORMAT,
  METRICS_VERSION,
  TrainResult,
  figure_name,
  finish_run,
  read_metrics,
  write_metrics,
)
from osgd_jax.app.train.callbacks import Callback, TensorBoardLogger
from osgd_jax.app.train.config import (
  COORDINATE_OPTIMIZERS,
  ENGINES,
  OPTIMIZERS,
  PER_EXIT_GRADS,
  SCHEDULES,
  TrainConfig,
  check_resumable,
  config_differences,
  describe_differences,
)
from osgd_jax.app.train.loop import (
  TrainingDiverged,
  TrainingInterrupted,
  epoch_record,
  save_epoch,
  seconds_per_step,
  train,
  train_epoch,
)
from osgd_jax.app.train.optimizer import (
  aggregator_for,
  make_optimizer,
  make_schedule,
)
from osgd_jax.app.train.run import (
  CONFIG_FILE,
  Run,
  TrainState,
  build_model,
  default_output_dir,
  load_data,
  make_mesh,
  prepare_output_dir,
  read_saved_config,
  start_run,
)
from osgd_jax.app.train.step import make_train_step

__all__ = [
  "CONFIG_FILE",
  "COORDINATE_OPTIMIZERS",
  "Callback",
  "ENGINES",
  "METRICS_FORMAT",
  "METRICS_VERSION",
  "OPTIMIZERS",
  "PER_EXIT_GRADS",
  "Run",
  "SCHEDULES",
  "TrainConfig",
  "TrainResult",
  "TensorBoardLogger",
  "TrainState",
  "TrainingDiverged",
  "TrainingInterrupted",
  "aggregator_for",
  "build_model",
  "check_resumable",
  "config_differences",
  "default_output_dir",
  "describe_differences",
  "epoch_record",
  "figure_name",
  "finish_run",
  "load_data",
  "make_mesh",
  "make_optimizer",
  "make_schedule",
  "make_train_step",
  "prepare_output_dir",
  "read_metrics",
  "read_saved_config",
  "save_epoch",
  "seconds_per_step",
  "start_run",
  "train",
  "train_epoch",
  "write_metrics",
]
