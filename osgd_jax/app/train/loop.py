"""The training loop: epochs of jitted steps, evaluation, checkpoints.

The data order of epoch e is fixed by ``(seed, e)`` and the augmentation key
of step s by ``(seed, e, s)``, so a run resumed from the checkpoint of epoch
e reproduces the uninterrupted run's metrics exactly. A NaN or Inf loss stops
the run and keeps the checkpoints of the epochs before it.

Steps are dispatched without waiting for the device: the losses are fetched
every ``log_every`` steps, so an accelerator never idles while Python reads
the next batch. How often they are fetched changes no result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from osgd_jax import anytime, sharding
from osgd_jax.app import data as data_lib
from osgd_jax.app.train.artefacts import TrainResult, finish_run, write_metrics
from osgd_jax.app.train.callbacks import Callback, TensorBoardLogger
from osgd_jax.app.train.config import TrainConfig
from osgd_jax.app.train.run import Run, TrainState, start_run

__all__ = [
  "TrainingDiverged",
  "TrainingInterrupted",
  "epoch_record",
  "save_epoch",
  "seconds_per_step",
  "train",
  "train_epoch",
]


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
  return tqdm(
    total=steps,
    desc=f"epoch {epoch}/{config.epochs}",
    disable=not config.progress or jax.process_index() != 0,
    leave=False,
    dynamic_ncols=True,
  )


def _check_finite(losses: np.ndarray, run: Run, epoch: int, step: int) -> None:
  if np.all(np.isfinite(losses)):
    return
  last = run.store.latest_epoch()
  kept = (
    f"the last good checkpoint (epoch {last}) is kept in {run.store.directory}"
    if last is not None
    else "no checkpoint was written yet"
  )
  raise TrainingDiverged(
    f"non-finite loss at epoch {epoch + 1}, step {step + 1}: exit"
    f" losses {losses.tolist()}; {kept}. Check the data, or train again"
    " with a lower --lr and a new --out."
  )


def _emit(callbacks: Sequence[Callback], record: dict[str, Any]) -> None:
  for callback in callbacks:
    callback(record)


def train_epoch(
  run: Run,
  state: TrainState,
  epoch: int,
  callbacks: Sequence[Callback] = (),
) -> tuple[TrainState, np.ndarray, list[tuple[int, float]]]:
  """Runs the steps of one epoch without waiting on the device every step.

  Steps are dispatched one after another while the device works; their
  losses stay on the device and are fetched together after the epoch's
  first step, then every ``config.log_every`` steps and after the last. Each
  fetch checks the losses, updates the progress bar and sends a ``"step"``
  record to the callbacks. Each process reads its own slice of every global
  batch.

  Args:
    run: the started run.
    state: the state before the epoch.
    epoch: the 0-based epoch index.
    callbacks: called with each fetch's record: ``{"kind": "step",
      "epoch", "step", "global_step", "train_loss", "examples_per_s"}``,
      ``step`` counted within the epoch and ``train_loss`` the ``(K,)`` mean
      exit losses of the steps since the last fetch.

  Returns:
    ``(state, mean_losses, timings)``: the state after the epoch, the
    ``(K,)`` mean unweighted exit losses of its batches, and each fetch's
    ``(steps, seconds)``: how many steps it covered and the wall time
    since the previous fetch (data loading included).

  Raises:
    TrainingDiverged: a batch's loss was NaN or Inf; the message names the
      first such step.
  """
  config, dataset = run.config, run.dataset
  run_key = jax.random.key(config.seed)
  loss_sum = np.zeros(run.num_exits)
  timings: list[tuple[int, float]] = []
  pending: list[jax.Array] = []  # the losses of the steps not yet fetched
  batches = data_lib.iterate_batches(
    dataset.x_train,
    dataset.y_train,
    config.batch_size,
    seed=config.seed,
    epoch=epoch,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  with _progress_bar(config, epoch + 1, run.steps_per_epoch) as bar:
    since = time.perf_counter()
    for step, (x, y) in enumerate(batches):
      key = data_lib.augment_key(run_key, epoch, step)
      if run.mesh is not None:
        x, y = sharding.shard_batch((x, y), run.mesh)
        key = sharding.shard_params(key, run.mesh)  # replicated
      *new_state, losses = run.step(*state, x, y, key)
      state = TrainState(*new_state)
      pending.append(losses)
      bar.update()
      # The first step is fetched alone: its time is mostly compilation,
      # which the reported step time leaves out.
      if not (
        step == 0
        or (step + 1) % config.log_every == 0
        or step + 1 == run.steps_per_epoch
      ):
        continue
      fetched = jax.device_get(pending)  # the only wait on the device
      seconds = time.perf_counter() - since
      first = step + 1 - len(fetched)
      for i, step_losses in enumerate(fetched):
        _check_finite(step_losses, run, epoch, first + i)
        loss_sum += step_losses
      timings.append((len(fetched), seconds))
      window_loss = np.asarray(np.mean(fetched, axis=0, dtype=np.float64))
      examples_per_s = len(fetched) * config.batch_size / seconds
      bar.set_postfix_str(
        " ".join(f"l{k + 1}={v:.3f}" for k, v in enumerate(window_loss))
        + f" {examples_per_s:.0f} ex/s"
      )
      _emit(
        callbacks,
        {
          "kind": "step",
          "epoch": epoch + 1,
          "step": step + 1,
          "global_step": epoch * run.steps_per_epoch + step + 1,
          "train_loss": window_loss.tolist(),
          "examples_per_s": examples_per_s,
        },
      )
      pending = []
      since = time.perf_counter()
  return state, loss_sum / run.steps_per_epoch, timings


def seconds_per_step(timings: Sequence[tuple[int, float]]) -> float:
  """The mean step time of ``timings``, leaving out the first fetch.

  The process's first fetch covers only its first step, whose time is
  mostly compilation.

  Args:
    timings: ``(steps, seconds)`` per fetch, as :func:`train_epoch` returns.

  Returns:
    Seconds per step over every fetch but the first (over the first alone
    when it is the only one).

  Example:
    >>> seconds_per_step([(1, 9.0), (3, 0.3), (1, 0.1)])
    0.1
  """
  steady = timings[1:] or timings
  return sum(s for _, s in steady) / sum(n for n, _ in steady)


def epoch_record(
  run: Run,
  state: TrainState,
  epoch: int,
  train_loss: np.ndarray,
  timings: Sequence[tuple[int, float]],
) -> dict[str, Any]:
  """The ``metrics.json`` record of an epoch, evaluated if due.

  Args:
    run: the run.
    state: the state after the epoch.
    epoch: the 0-based epoch index.
    train_loss: ``(K,)`` mean training loss per exit.
    timings: this process's ``(steps, seconds)`` per fetch so far (see
      :func:`train_epoch`).

  Returns:
    ``{"epoch", "train_loss", "step_time_s"}``, and ``"test_loss"`` and
    ``"test_accuracy"`` every ``eval_every`` epochs and after the last;
    ``"val_loss"`` and ``"val_accuracy"`` instead for a run that evaluates
    on a validation split (``config.validation`` > 0). For a language model
    (next-token labels) the accuracy is per token, and the record adds
    ``"train_bits_per_byte"`` and ``"test_bits_per_byte"`` (or
    ``"val_..."``): the mean next-byte cross-entropy in bits.
  """
  config = run.config
  record: dict[str, Any] = {
    "epoch": epoch + 1,
    "train_loss": train_loss.tolist(),
    "step_time_s": seconds_per_step(timings),
  }
  sequences = run.dataset.sequence_labels
  if sequences:
    record["train_bits_per_byte"] = (train_loss / math.log(2)).tolist()
  if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
    metrics = anytime.evaluate(
      run.host_model(state),
      run.dataset.x_test,
      run.dataset.y_test,
      # A sequence's logits are positions x vocabulary: keep batches small.
      batch_size=config.batch_size if sequences else 500,
    )
    record[f"{config.eval_prefix}_loss"] = metrics.loss.tolist()
    record[f"{config.eval_prefix}_accuracy"] = metrics.accuracy.tolist()
    if sequences:
      record[f"{config.eval_prefix}_bits_per_byte"] = (
        metrics.loss / math.log(2)
      ).tolist()
  return record


def _print_epoch(config: TrainConfig, record: dict[str, Any]) -> None:
  # Printed with or without the progress bar: a log of a run in the
  # background should still say how far it got.
  if jax.process_index() != 0:
    return
  key = f"{config.eval_prefix}_accuracy"
  tested = (
    f" {config.eval_prefix} acc "
    + " ".join(f"{100 * a:.1f}" for a in record[key])
    if key in record
    else ""
  )
  bits = f"{config.eval_prefix}_bits_per_byte"
  if bits in record:  # a language model: its bits per byte say more
    tested += f" {config.eval_prefix} bits/byte " + " ".join(
      f"{b:.3f}" for b in record[bits]
    )
  print(
    f"epoch {record['epoch']}/{config.epochs}: train loss "
    + " ".join(f"{v:.3f}" for v in record["train_loss"])
    + tested,
    flush=True,
  )


def save_epoch(run: Run, state: TrainState) -> None:
  """Checkpoints ``state`` as the newest epoch of ``run.history``.

  Every process takes part in the checkpoint; process 0 also rewrites
  ``metrics.json`` with the history so far.

  Args:
    run: the run, its latest record last in ``run.history``.
    state: the state after that epoch.
  """
  epoch = run.history[-1]["epoch"]
  run.store.save(
    epoch,
    tuple(state),
    {"config": run.config.to_json(), "history": run.history},
  )
  if jax.process_index() == 0:
    write_metrics(run.out, run.config, run.history, data=run.dataset.info)


def train(
  config: TrainConfig, callbacks: Sequence[Callback] = ()
) -> TrainResult:
  """Trains ``config.model`` and writes metrics, checkpoints and a figure.

  The device is waited on only every ``config.log_every`` steps and at the
  ends of epochs (see :func:`train_epoch`).

  Args:
    config: the run's settings.
    callbacks: called with every logged record, on every process (see
      :mod:`osgd_jax.app.train.callbacks`). With ``config.tensorboard``
      set, process 0 also writes the records as TensorBoard scalars.

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
    >>> records = []
    >>> result = train(TrainConfig(epochs=1, out="/tmp/osgd-run"),
    ...                callbacks=[records.append])  # doctest: +SKIP
    >>> result.test_accuracy.shape, records[-1]["kind"]  # doctest: +SKIP
    ((4,), 'epoch')
  """
  run, state = start_run(config)
  timings: list[tuple[int, float]] = []
  callbacks = list(callbacks)
  tensorboard = None
  try:
    if config.tensorboard is not None and jax.process_index() == 0:
      tensorboard = TensorBoardLogger(config.tensorboard)
      callbacks.append(tensorboard)
    for epoch in range(len(run.history), config.epochs):
      state, train_loss, epoch_timings = train_epoch(
        run, state, epoch, callbacks
      )
      timings += epoch_timings
      run.history.append(epoch_record(run, state, epoch, train_loss, timings))
      save_epoch(run, state)
      _print_epoch(config, run.history[-1])  # once it is saved
      _emit(
        callbacks,
        {
          "kind": "epoch",
          "global_step": (epoch + 1) * run.steps_per_epoch,
          **run.history[-1],
        },
      )
  except KeyboardInterrupt as e:
    run.store.wait()  # a save in flight completes: its epoch counts as done
    raise TrainingInterrupted(run.out, run.store.latest_epoch()) from e
  finally:
    # Orbax's background threads end here, so a failure leaves no
    # half-finished write and no noise at interpreter exit.
    run.store.close()
    if tensorboard is not None:
      tensorboard.close()
  return finish_run(run, state)
