"""The training loop: epochs of jitted steps, evaluation, checkpoints.

The data order of epoch e is fixed by ``(seed, e)`` and the augmentation key
of step s by ``(seed, e, s)``, so a run resumed from the checkpoint of epoch
e reproduces the uninterrupted run's metrics exactly. A NaN or Inf loss stops
the run and keeps the checkpoints of the epochs before it.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from osgd_jax import anytime, sharding
from osgd_jax.app import data as data_lib
from osgd_jax.app.train.artefacts import TrainResult, finish_run, write_metrics
from osgd_jax.app.train.config import TrainConfig
from osgd_jax.app.train.run import Run, TrainState, start_run

__all__ = ["TrainingDiverged", "TrainingInterrupted", "epoch_record",
           "save_epoch", "train", "train_epoch"]


class TrainingDiverged(RuntimeError):
  """A loss became NaN or Inf; the last good checkpoint was kept."""


class TrainingInterrupted(KeyboardInterrupt):
  """Training was interrupted (Ctrl-C); the finished epochs are saved.

  A ``KeyboardInterrupt``, so that code catching that still does.

  Attributes:
    out: the run's output directory.
    last_epoch: the newest saved epoch, or ``None`` if none was saved.
  """

  def __init__(self, out: str, last_epoch: int | None):
    super().__init__(out, last_epoch)
    self.out = out
    self.last_epoch = last_epoch


def _progress_bar(config: TrainConfig, epoch: int, steps: int) -> tqdm:
  return tqdm(total=steps, desc=f"epoch {epoch}/{config.epochs}",
              disable=not config.progress or jax.process_index() != 0,
              leave=False, dynamic_ncols=True)


def _check_finite(losses: np.ndarray, run: Run, epoch: int, step: int) -> None:
  if np.all(np.isfinite(losses)):
    return
  last = run.store.latest_epoch()
  kept = (f"the last good checkpoint (epoch {last}) is kept in"
          f" {run.store.directory}" if last is not None
          else "no checkpoint was written yet")
  raise TrainingDiverged(
      f"non-finite loss at epoch {epoch + 1}, step {step + 1}: exit"
      f" losses {losses.tolist()}; {kept}. Check the data, or train again"
      " with a lower --lr and a new --out.")


def train_epoch(run: Run, state: TrainState, epoch: int,
                ) -> tuple[TrainState, np.ndarray, list[float]]:
  """Runs the steps of one epoch.

  Each process reads its own slice of every global batch.

  Args:
    run: the started run.
    state: the state before the epoch.
    epoch: the 0-based epoch index.

  Returns:
    ``(state, mean_losses, step_times)``: the state after the epoch, the
    ``(K,)`` mean unweighted exit losses of its batches, and each step's
    time in seconds.

  Raises:
    TrainingDiverged: a batch's loss was NaN or Inf.
  """
  config, dataset = run.config, run.dataset
  run_key = jax.random.key(config.seed)
  loss_sum = np.zeros(run.num_exits)
  step_times = []
  batches = data_lib.iterate_batches(
      dataset.x_train, dataset.y_train, config.batch_size, seed=config.seed,
      epoch=epoch, process_index=jax.process_index(),
      process_count=jax.process_count())
  with _progress_bar(config, epoch + 1, run.steps_per_epoch) as bar:
    for step, (x, y) in enumerate(batches):
      key = data_lib.augment_key(run_key, epoch, step)
      if run.mesh is not None:
        x, y = sharding.shard_batch((x, y), run.mesh)
        key = sharding.shard_params(key, run.mesh)  # replicated
      start = time.perf_counter()
      *new_state, losses = run.step(*state, x, y, key)
      losses = np.asarray(losses)  # syncs: an honest step time
      step_times.append(time.perf_counter() - start)
      state = TrainState(*new_state)
      _check_finite(losses, run, epoch, step)
      loss_sum += losses
      bar.set_postfix_str(
          " ".join(f"l{k + 1}={v:.3f}" for k, v in enumerate(losses))
          + f" {config.batch_size / step_times[-1]:.0f} ex/s")
      bar.update()
  return state, loss_sum / run.steps_per_epoch, step_times


def epoch_record(run: Run, state: TrainState, epoch: int,
                 train_loss: np.ndarray, step_times: list[float],
                 ) -> dict[str, Any]:
  """The ``metrics.json`` record of an epoch, evaluated on the test set if due.

  Args:
    run: the run.
    state: the state after the epoch.
    epoch: the 0-based epoch index.
    train_loss: ``(K,)`` mean training loss per exit.
    step_times: the times of this process's steps so far, in seconds.

  Returns:
    ``{"epoch", "train_loss", "step_time_s"}``, and ``"test_loss"`` and
    ``"test_accuracy"`` every ``eval_every`` epochs and after the last.
  """
  config = run.config
  record: dict[str, Any] = {
      "epoch": epoch + 1,
      "train_loss": train_loss.tolist(),
      # The process's first step includes compilation; leave it out.
      "step_time_s": float(np.median(step_times[1:] or step_times)),
  }
  if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
    metrics = anytime.evaluate(run.host_model(state), run.dataset.x_test,
                               run.dataset.y_test)
    record["test_loss"] = metrics.loss.tolist()
    record["test_accuracy"] = metrics.accuracy.tolist()
  return record


def _print_epoch(config: TrainConfig, record: dict[str, Any]) -> None:
  # Printed with or without the progress bar: a log of a run in the
  # background should still say how far it got.
  if jax.process_index() != 0:
    return
  tested = (" test acc " + " ".join(
      f"{100 * a:.1f}" for a in record["test_accuracy"])
            if "test_accuracy" in record else "")
  print(f"epoch {record['epoch']}/{config.epochs}: train loss "
        + " ".join(f"{v:.3f}" for v in record["train_loss"]) + tested,
        flush=True)


def save_epoch(run: Run, state: TrainState) -> None:
  """Checkpoints ``state`` as the newest epoch of ``run.history``.

  Every process takes part in the checkpoint; process 0 also rewrites
  ``metrics.json`` with the history so far.

  Args:
    run: the run, its latest record last in ``run.history``.
    state: the state after that epoch.
  """
  epoch = run.history[-1]["epoch"]
  run.store.save(epoch, tuple(state),
                 {"config": run.config.to_json(), "history": run.history})
  if jax.process_index() == 0:
    write_metrics(run.out, run.config, run.history)


def train(config: TrainConfig) -> TrainResult:
  """Trains ``config.model`` and writes metrics, checkpoints and a figure.

  Args:
    config: the run's settings.

  Returns:
    A :class:`~osgd_jax.app.train.TrainResult`.

  Raises:
    ValueError: a bad setting, missing data, an unwritable ``out``, or a
      checkpoint that cannot be resumed; the message says what to do.
    TrainingDiverged: a loss became NaN or Inf. Checkpoints of earlier
      epochs are kept.
    TrainingInterrupted: a ``KeyboardInterrupt`` during training, raised
      once every checkpoint already started is complete.

  Example:
    >>> result = train(TrainConfig(epochs=1, out="/tmp/osgd-run"))  # doctest: +SKIP
    >>> result.test_accuracy.shape                                  # doctest: +SKIP
    (4,)
  """
  run, state = start_run(config)
  step_times: list[float] = []
  try:
    for epoch in range(len(run.history), config.epochs):
      state, train_loss, epoch_step_times = train_epoch(run, state, epoch)
      step_times += epoch_step_times
      run.history.append(
          epoch_record(run, state, epoch, train_loss, step_times))
      save_epoch(run, state)
      _print_epoch(config, run.history[-1])  # once it is saved
  except KeyboardInterrupt as e:
    run.store.wait()  # a save in flight completes: its epoch counts as done
    raise TrainingInterrupted(run.out, run.store.latest_epoch()) from e
  finally:
    # Orbax's background threads end here, so a failure leaves no
    # half-finished write and no noise at interpreter exit.
    run.store.close()
  return finish_run(run, state)
