"""Training loop: resume reproduces a run, divergence keeps the last checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from osgd_jax.app import train as train_lib
from osgd_jax.app.checkpoint import CheckpointStore
from osgd_jax.app.train import TrainConfig, TrainingDiverged, train
from osgd_jax.app.train import run as run_lib

# A small, fast configuration: an MLP on digits.
SMALL = TrainConfig(model="nested-depth-mlp", epochs=3, batch_size=128,
                    lr=0.05, progress=False)


def _metrics(history):
  return [(r["train_loss"], r.get("test_loss"), r.get("test_accuracy"))
          for r in history]


def _interrupt_at_step(monkeypatch, step_number, error):
  """Makes the training step raise ``error`` on its ``step_number``-th call."""
  make_step = run_lib.make_train_step
  calls = []

  def patched(*args, **kwargs):
    tx, step = make_step(*args, **kwargs)

    def wrapped(*a):
      calls.append(1)
      if len(calls) == step_number:
        raise error
      return step(*a)
    return tx, wrapped

  monkeypatch.setattr(run_lib, "make_train_step", patched)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["osgd", "sgd"])
def test_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch, optimizer):
  full = train(dataclasses.replace(SMALL, optimizer=optimizer,
                                   out=str(tmp_path / "full")))
  config = dataclasses.replace(SMALL, optimizer=optimizer,
                               out=str(tmp_path / "killed"))
  # Killed during epoch 3 (11 steps per epoch), after two checkpoints.
  with monkeypatch.context() as patch:
    _interrupt_at_step(patch, 2 * 11 + 5, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
      train(config)
  resumed = train(dataclasses.replace(config, resume=True))
  assert len(resumed.history) == 3
  assert _metrics(resumed.history) == _metrics(full.history)
  np.testing.assert_array_equal(resumed.test_accuracy, full.test_accuracy)
  # Every exit learned something on digits (chance is 10%).
  assert np.all(full.test_accuracy > 0.5), full.test_accuracy


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  make_step = run_lib.make_train_step
  calls = []

  def poisoned(*args, **kwargs):
    tx, step = make_step(*args, **kwargs)

    def wrapped(*a):
      *state, losses = step(*a)
      calls.append(1)
      if len(calls) > 11:  # one epoch of digits at batch 128 has 11 steps
        losses = losses * np.nan
      return (*state, losses)
    return tx, wrapped

  monkeypatch.setattr(run_lib, "make_train_step", poisoned)
  config = dataclasses.replace(SMALL, out=str(tmp_path / "run"))
  with pytest.raises(TrainingDiverged, match=r"epoch 2, step 1.*epoch 1.*kept"):
    train(config)
  store = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
  assert store.latest_epoch() == 1
  metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert [r["epoch"] for r in metrics["epochs"]] == [1]


def test_refuses_to_overwrite_an_existing_run(tmp_path):
  config = dataclasses.replace(SMALL, epochs=1, out=str(tmp_path / "run"))
  train(config)
  with pytest.raises(ValueError, match="already holds checkpoints.*--resume"):
    train(config)
  with pytest.raises(ValueError, match=r"different configuration \(lr"):
    train(dataclasses.replace(config, resume=True, lr=0.5))


@pytest.mark.parametrize("field, value, match", [
    ("model", "resnet-1000", "unknown model"),
    ("dataset", "mnist", "unknown dataset"),
    ("optimizer", "adam", "unknown optimizer"),
    ("schedule", "linear", "unknown schedule"),
    ("epochs", 0, "--epochs must be >= 1"),
    ("lr", -1.0, "--lr must be > 0"),
    ("momentum", 1.5, "--momentum"),
    ("preset", "imagenet", "unknown preset"),
    ("per_exit_grads", "loop", "unknown --per-exit-grads"),
])
def test_config_validation(field, value, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(SMALL, **{field: value}).validate()


def test_exit_weights_must_match_exits(tmp_path):
  config = dataclasses.replace(SMALL, exit_weights=(1.0, 2.0),
                               out=str(tmp_path / "run"))
  with pytest.raises(ValueError, match="--exit-weights has 2 values.*4 exits"):
    train(config)


def test_output_dir_check_is_safe_for_processes_sharing_out(tmp_path):
  # Every process of a multi-process run checks the one --out at start-up;
  # the writability probes of concurrent checks must not collide.
  import concurrent.futures
  out = tmp_path / "shared"
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(lambda _: train_lib.prepare_output_dir(str(out)),
                            range(400)))
  assert set(results) == {str(out)}
  assert list(out.iterdir()) == []  # no probe left behind


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match=r"cannot write to --out .*file/run"
                     r".*choose a writable directory"):
    train_lib.prepare_output_dir(str(blocker / "run"))
