"""Training loop: runs are reproducible, resume reproduces a run, divergence
keeps the last checkpoint, and every refusal's advice is safe to follow."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from osgd_jax import zoo
from osgd_jax.app import data as data_lib
from osgd_jax.app import train as train_lib
from osgd_jax.app.checkpoint import CheckpointStore
from osgd_jax.app.train import TrainConfig, TrainingDiverged, train
from osgd_jax.app.train import run as run_lib
from osgd_jax.app.train.config import DEFAULT_MODELS

# A small, fast configuration: an MLP on digits.
SMALL = TrainConfig(
  model="nested-depth-mlp", epochs=3, batch_size=128, lr=0.05, progress=False
)


def _metrics(history):
  return [
    (r["train_loss"], r.get("test_loss"), r.get("test_accuracy"))
    for r in history
  ]


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


def _interrupt_while_saving(monkeypatch, epoch):
  """Ctrl-C while the checkpoint of ``epoch`` is being written.

  The interrupt arrives in the wait for Orbax's write, which goes on in the
  background: the run must report it only once it is complete.
  """
  save, wait = (
    ocp.CheckpointManager.save,
    ocp.CheckpointManager.wait_until_finished,
  )
  started, interrupted = [], []

  def recording_save(manager, step, *args, **kwargs):
    result = save(manager, step, *args, **kwargs)
    started.append(step)  # Orbax writes it in the background from here
    return result

  def patched(manager):
    if started[-1:] == [epoch] and not interrupted:
      interrupted.append(1)
      raise KeyboardInterrupt
    return wait(manager)

  monkeypatch.setattr(ocp.CheckpointManager, "save", recording_save)
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", patched)


@pytest.mark.slow
@pytest.mark.parametrize(
  "model, optimizer, interrupt, learned",
  [
    ("nested-depth-mlp", "osgd", "mid-step", 0.5),
    ("nested-depth-mlp", "osgd", "while-saving", 0.5),
    # A convolutional model learns more slowly in 3 short epochs.
    ("branched-resnet", "sgd", "mid-step", 0.1),
  ],
)
def test_runs_are_reproducible_and_resume_exactly(
  tmp_path, monkeypatch, model, optimizer, interrupt, learned
):
  # Two runs with the same flags and seed: the full one, and one killed and
  # resumed. Their epochs before the kill were computed independently, so
  # equal metrics show that a run is reproducible; equal metrics after it,
  # that resuming is exact.
  base = dataclasses.replace(SMALL, model=model, optimizer=optimizer)
  full = train(dataclasses.replace(base, out=str(tmp_path / "full")))
  config = dataclasses.replace(base, out=str(tmp_path / "killed"))
  with monkeypatch.context() as patch:
    if interrupt == "mid-step":  # during epoch 3 (11 steps per epoch)
      _interrupt_at_step(patch, 2 * 11 + 5, KeyboardInterrupt())
    else:
      _interrupt_while_saving(patch, epoch=2)
    with pytest.raises(train_lib.TrainingInterrupted) as interrupted:
      train(config)
  assert interrupted.value.out == config.out
  assert interrupted.value.last_epoch == 2
  resumed = train(dataclasses.replace(config, resume=True))
  assert len(resumed.history) == 3
  assert _metrics(resumed.history) == _metrics(full.history)
  np.testing.assert_array_equal(resumed.test_accuracy, full.test_accuracy)
  # Every exit learned something on digits (chance is 10%).
  assert np.all(full.test_accuracy > learned), full.test_accuracy
  assert full.test_accuracy[-1] > 0.5, full.test_accuracy


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  make_step = run_lib.make_train_step
  calls = []

  def poisoned(*args, **kwargs):
    tx, step = make_step(*args, **kwargs)

    def wrapped(*a):
      *state, losses = step(*a)
      calls.append(1)
      # One epoch of digits at batch 128 has 11 steps; the losses of epoch
      # 2's steps 4 to 11 are fetched together, after its 11th.
      if len(calls) > 11 + 3:
        losses = losses * np.nan
      return (*state, losses)

    return tx, wrapped

  monkeypatch.setattr(run_lib, "make_train_step", poisoned)
  config = dataclasses.replace(SMALL, out=str(tmp_path / "run"))
  with pytest.raises(TrainingDiverged, match=r"epoch 2, step 4.*epoch 1.*kept"):
    train(config)
  store = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
  assert store.latest_epoch() == 1
  metrics = train_lib.read_metrics(str(tmp_path / "run" / "metrics.json"))
  assert [r["epoch"] for r in metrics["epochs"]] == [1]


def _checkpoint_files(out):
  return {
    str(path.relative_to(out)): path.read_bytes()
    for path in sorted((out / "checkpoints").rglob("*"))
    if path.is_file()
  }


def test_refusals_keep_the_run_and_their_advice_works(tmp_path):
  out = tmp_path / "run"
  # SGD: the refusals are the same for every optimizer, and its step
  # compiles in a fraction of OSGD's time.
  config = dataclasses.replace(SMALL, epochs=1, optimizer="sgd", out=str(out))
  first = train(config)
  saved = json.loads((out / train_lib.CONFIG_FILE).read_text())
  assert saved == json.loads(json.dumps(config.to_json()))
  before = _checkpoint_files(out)
  with pytest.raises(
    ValueError,
    match="already holds checkpoints; pass --resume to continue that run",
  ):
    train(config)
  # A new --epochs, --lr and model: each is named, with its saved value,
  # before any checkpoint is read; the checkpoints are untouched.
  changed = dataclasses.replace(
    config, resume=True, lr=0.5, epochs=2, model="branched-mlp"
  )
  with pytest.raises(ValueError) as refused:
    train(changed)
  message = str(refused.value)
  for fragment in (
    "--epochs was 1, now 2",
    "--lr was 0.05, now 0.5",
    "--model was 'nested-depth-mlp', now 'branched-mlp'",
    "(--epochs 1, --lr 0.05, --model nested-depth-mlp)",
  ):
    assert fragment in message, message
  assert "corrupt" not in message and "damaged" not in message
  assert _checkpoint_files(out) == before
  # Its advice, followed literally: resume with the saved settings.
  advised = dataclasses.replace(
    changed, epochs=1, lr=0.05, model="nested-depth-mlp"
  )
  resumed = train(advised)
  np.testing.assert_array_equal(resumed.test_accuracy, first.test_accuracy)
  assert _checkpoint_files(out) == before


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("model", "resnet-1000", "unknown --model 'resnet-1000'; choose one of"),
    ("model", 3, "unknown --model 3"),
    ("dataset", "mnist", "unknown dataset 'mnist'; choose one of"),
    ("dataset", "Cifar10", "unknown dataset 'Cifar10'.*aliases CIFAR-10"),
    ("optimizer", "adam", "unknown --optimizer"),
    ("schedule", "linear", "unknown --schedule"),
    ("granularity", "layer", "unknown --granularity"),
    ("method", "qr", "unknown --method"),
    ("preset", "imagenet", "unknown --preset 'imagenet' for nested-depth-mlp"),
    ("per_exit_grads", "loop", "unknown --per-exit-grads"),
    ("epochs", 0, "--epochs must be an integer from 1 to"),
    ("epochs", 2.5, "--epochs must be an integer .* got 2.5"),
    ("epochs", True, "--epochs must be an integer"),
    ("epochs", 10**9, "--epochs must be an integer from 1 to 100000"),
    ("seed", -1, "--seed must be an integer from 0 to 4294967295"),
    ("seed", 2**40, "--seed must be an integer"),
    ("batch_size", "64", "--batch-size must be an integer"),
    ("lr", -1.0, "--lr must be a finite number > 0"),
    ("lr", float("nan"), "--lr must be a finite number > 0, got nan"),
    ("lr", float("inf"), "--lr must be a finite number"),
    ("lr", "0.1", "--lr must be a finite number"),
    ("momentum", 1.5, r"--momentum must be a finite number in \[0, 1\)"),
    ("momentum", float("nan"), "--momentum must be a finite number"),
    ("weight_decay", float("nan"), "--weight-decay must be a finite number"),
    ("out", "", "--out must be a non-empty path"),
    ("out", "  ", "--out must be a non-empty path"),
    ("data_dir", "", "--data-dir must be a non-empty path"),
    ("progress", "yes", "progress must be true or false"),
    ("log_every", 0, "--log-every must be an integer from 1 to"),
    ("log_every", 2.0, "--log-every must be an integer"),
    ("tensorboard", "", "--tensorboard must be a non-empty path"),
    ("exit_weights", (0.0, 0.0, 0.0, 0.0), "are all zero: no exit would be"),
    ("exit_weights", (1.0, float("nan")), "--exit-weights must be finite"),
    ("exit_weights", (1.0, -1.0), "--exit-weights must be finite numbers >= 0"),
    ("exit_weights", (), "--exit-weights must be finite"),
    ("validation", 1.0, r"--validation must be a finite number in \[0, 1\)"),
    ("validation", -0.1, r"--validation must be a finite number in \[0, 1\)"),
    ("validation", float("nan"), "--validation must be a finite number"),
    ("validation", "0.2", "--validation must be a finite number"),
  ],
)
def test_config_validation(field, value, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(SMALL, **{field: value}).validate()


@pytest.mark.parametrize(
  "alias, name", [("CIFAR-10", "cifar10"), ("cifar-100", "cifar100")]
)
def test_a_dataset_alias_names_its_dataset_and_preset(alias, name):
  config = TrainConfig(dataset=alias)
  config.validate()
  assert (config.dataset, config.preset_name) == (name, "cifar")


@pytest.mark.parametrize("alias", ["mnist1d", "MNIST-1D", "mnist-1d"])
def test_mnist1d_takes_the_mnist1d_preset(alias):
  config = TrainConfig(model="nested-width-mlp", dataset=alias)
  config.validate()
  assert (config.dataset, config.preset_name) == ("mnist1d", "mnist1d")


@pytest.mark.parametrize("preset", [None, "cifar", "digits"])
@pytest.mark.parametrize(
  "model",
  [
    "branched-resnet",
    "nested-depth-resnet",
    "nested-width-resnet",
    "nested-width-depth-resnet",
  ],
)
def test_a_resnet_on_mnist1d_is_refused_before_any_work(model, preset):
  # Whatever the preset: a 2-D convolution cannot take a 1-D signal.
  config = TrainConfig(model=model, preset=preset, dataset="MNIST-1D")
  with pytest.raises(ValueError) as refused:
    config.validate()
  fitting = [m for m in zoo.names() if not m.endswith("-resnet")]
  assert str(refused.value) == (
    f"--model {model} cannot read --dataset mnist1d's inputs (it has no"
    f" mnist1d preset); choose one that can: {', '.join(fitting)}, or"
    " leave --model out for nested-depth-conv1d."
  )


@pytest.mark.parametrize("dataset", ["digits", "cifar10", "mnist1d"])
def test_every_dataset_has_a_default_model_that_reads_it(dataset):
  config = TrainConfig(dataset=dataset)
  config.validate()
  assert config.model == DEFAULT_MODELS[dataset]
  assert config.preset_name in zoo.presets(config.model)
  assert TrainConfig(dataset="MNIST-1D").model == "nested-depth-conv1d"
  # An explicit model stays.
  assert TrainConfig(dataset=dataset, model="branched-mlp").model == (
    "branched-mlp"
  )
  assert set(DEFAULT_MODELS) == set(data_lib.DATASET_NAMES)


@pytest.mark.slow
def test_one_epoch_on_mnist1d_learns(tmp_path):
  # SGD: the point is the data set reaching the model; its step compiles in
  # a fraction of OSGD's time.
  config = TrainConfig(
    model="nested-depth-mlp",
    dataset="mnist1d",
    optimizer="sgd",
    epochs=1,
    batch_size=125,
    lr=0.1,
    progress=False,
    out=str(tmp_path / "run"),
  )
  result = train(config)
  assert result.model.backbone.in_features == 40
  # 32 steps: every exit is already well above chance (10%).
  assert np.all(result.test_accuracy > 0.25), result.test_accuracy


def test_exit_weights_must_match_exits(tmp_path):
  config = dataclasses.replace(
    SMALL, exit_weights=(1.0, 2.0), out=str(tmp_path / "run")
  )
  with pytest.raises(ValueError, match="--exit-weights has 2 values.*4 exits"):
    train(config)


def test_output_dir_check_is_safe_for_processes_sharing_out(tmp_path):
  # Every process of a multi-process run checks the one --out at start-up;
  # the writability probes of concurrent checks must not collide.
  import concurrent.futures

  out = tmp_path / "shared"
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(
      pool.map(lambda _: train_lib.prepare_output_dir(str(out)), range(400))
    )
  assert set(results) == {str(out)}
  assert list(out.iterdir()) == []  # no probe left behind


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(
    ValueError,
    match=r"cannot write to --out .*file/run"
    r".*choose a writable directory",
  ):
    train_lib.prepare_output_dir(str(blocker / "run"))


def test_a_run_saved_before_a_field_existed_resumes_with_its_default():
  saved = SMALL.to_json()
  for new_field in ("rescale", "switch_to_sgd", "log_every", "tensorboard"):
    del saved[new_field]
  train_lib.check_resumable(saved, SMALL)  # the defaults: nothing differs
  with pytest.raises(
    ValueError,
    match=r"--rescale was False, now True.*"
    r"resume with its settings \(no --rescale\)",
  ):
    train_lib.check_resumable(saved, dataclasses.replace(SMALL, rescale=True))


@pytest.mark.parametrize(
  "field, value, match",
  [
    (
      "switch_to_sgd",
      1.5,
      r"--switch-to-sgd must be a finite number in \[0, 1\]",
    ),
    ("switch_to_sgd", float("nan"), "--switch-to-sgd must be a finite number"),
    ("rescale", "yes", "rescale must be true or false"),
  ],
)
def test_paper_option_validation(field, value, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(SMALL, **{field: value}).validate()


def test_paper_options_refuse_optimizers_they_do_not_apply_to():
  with pytest.raises(
    ValueError,
    match="--optimizer sgd is plain SGD throughout. Leave out --switch-to-sgd",
  ):
    dataclasses.replace(SMALL, optimizer="sgd", switch_to_sgd=0.5).validate()
  with pytest.raises(
    ValueError, match="--rescale is an option of --optimizer osgd, not pcgrad"
  ):
    dataclasses.replace(SMALL, optimizer="pcgrad", rescale=True).validate()


def test_switch_to_sgd_sums_the_exit_gradients_from_its_step_on():
  # 10 steps, switching after 0.3 of them: steps 0-2 aggregate with OSGD,
  # steps 3-9 sum the exit gradients, as the summed-loss gradient would.
  config = dataclasses.replace(
    SMALL,
    switch_to_sgd=0.3,
    rescale=True,
    momentum=0.0,
    weight_decay=0.0,
    schedule="constant",
    lr=1.0,
  )
  tx = train_lib.make_optimizer(config, total_steps=10, num_exits=2)
  params = {"w": np.zeros(2, np.float32)}
  grads = {"w": np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)}
  state = tx.init(params)
  updates = []
  for _ in range(5):
    update, state = tx.update(grads, state, params)
    updates.append(np.asarray(update["w"]).tolist())
  # OSGD with rescale: [1, 0] and the component [0, 1] of [1, 1], scaled to
  # that gradient's norm, √2.
  projected = [-1.0, -np.sqrt(2)]
  np.testing.assert_allclose(
    updates, [projected] * 3 + [[-2.0, -1.0]] * 2, rtol=1e-6
  )


def test_a_validation_split_is_held_out_of_the_training_set_only():
  full = train_lib.load_data(SMALL)
  config = dataclasses.replace(SMALL, validation=0.2)
  split = train_lib.load_data(config)
  assert (config.evaluated_on, config.eval_prefix) == ("validation", "val")
  # A stratified part of the training set, the rest to train on; the test
  # set is dropped, so no run on the split can score on it.
  assert split.num_train + split.num_test == full.num_train
  pool = {row.tobytes() for row in full.x_train}
  assert all(row.tobytes() in pool for row in split.x_test)
  assert not {row.tobytes() for row in full.x_test} & {
    row.tobytes() for row in split.x_test
  }
  np.testing.assert_allclose(
    np.bincount(split.y_test), 0.2 * np.bincount(full.y_train), atol=0.5
  )
  # The same examples whatever the run's seed: every run of an experiment
  # validates on one split.
  again = train_lib.load_data(dataclasses.replace(config, seed=7))
  np.testing.assert_array_equal(again.x_test, split.x_test)
  # Not a change a resumed run may make.
  assert train_lib.config_differences(SMALL.to_json(), config) == ["validation"]


def test_a_validation_split_that_leaves_too_little_is_one_line(tmp_path):
  config = dataclasses.replace(SMALL, validation=1e-4, out=str(tmp_path / "a"))
  with pytest.raises(
    ValueError,
    match=r"^--validation 0.0001 holds out none"
    r" of the 1438 training examples of digits; choose a"
    r" fraction such as 0.2.$",
  ):
    train(config)
  config = dataclasses.replace(
    SMALL, validation=0.9, batch_size=512, out=str(tmp_path / "b")
  )
  with pytest.raises(
    ValueError,
    match=r"--batch-size 512 exceeds the 143"
    r" training examples left by --validation 0.9",
  ):
    train(config)


def test_metrics_json_has_a_version_that_readers_check(tmp_path):
  # A newer osgd-jax may change metrics.json's layout: the file says which
  # layout it is in, and a reader refuses one it does not know by name.
  # Files from before the version entry (the same keys) still read.
  config = TrainConfig(epochs=1)
  train_lib.write_metrics(str(tmp_path), config, [{"epoch": 1}])
  path = tmp_path / "metrics.json"
  written = json.loads(path.read_text())
  assert written["format"] == "osgd-train metrics"
  assert written["version"] == 1 == train_lib.METRICS_VERSION
  assert train_lib.read_metrics(str(path)) == written
  old = {"config": config.to_json(), "epochs": [{"epoch": 1}]}
  path.write_text(json.dumps(old))
  assert train_lib.read_metrics(str(path)) == written
  for version in (2, "1", None):
    path.write_text(json.dumps({**written, "version": version}))
    with pytest.raises(ValueError) as error:
      train_lib.read_metrics(str(path))
    assert str(error.value) == (
      f"{path} is a metrics.json of version {version!r}; this osgd-jax"
      " reads version 1. Read it with the osgd-jax that wrote it (a newer"
      " one: upgrade osgd-jax)."
    )
  for payload in ({"format": "osgd-compare results"}, [1], {"config": {}}):
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="is not an osgd-train metrics.json"):
      train_lib.read_metrics(str(path))
  path.write_text("{")
  with pytest.raises(ValueError, match=r"cannot read .*; pass the metrics"):
    train_lib.read_metrics(str(path))
