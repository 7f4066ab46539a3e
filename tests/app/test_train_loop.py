"""The training loop waits on the device only every ``log_every`` steps.

Fetching the losses less often changes no result; callbacks see every fetch
and every epoch; TensorBoard gets the same scalars the callbacks get.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import re
import struct

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from osgd_jax.app.train import TrainConfig, seconds_per_step, train
from osgd_jax.app.train import run as run_lib

# 11 steps per epoch: digits' 1,437 training images (after the validation
# split) in batches of 128. The loop is the same for every optimizer: SGD's
# step compiles in a fraction of OSGD's time.
SMALL = TrainConfig(
  model="nested-depth-mlp",
  optimizer="sgd",
  epochs=2,
  batch_size=128,
  lr=0.05,
  progress=False,
)
STEPS = 11


def _read_scalars(logdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """Every scalar in the TFRecord event files under ``logdir``.

  The framing, read here without TensorBoard: a little-endian uint64
  length, its masked CRC (uint32), the serialised ``Event``, its CRC.
  """
  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack_from("<Q", data, offset)
      event = event_pb2.Event.FromString(
        data[offset + 12 : offset + 12 + length]
      )
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append(
          (event.step, value.simple_value)
        )
  return scalars


def _record_dispatches_and_reads(monkeypatch) -> list[tuple[str, int]]:
  """Logs ``("dispatch", i)`` per training step and ``("read", i)`` each
  time the host reads the values of step i's losses.

  A loop that waits on the device every step reads step i's losses before
  it dispatches step i + 1. Reads are seen through ``__array__``, which
  NumPy calls for an array on several devices (one on a single CPU device
  it reads through the buffer protocol instead): the runs below train
  data-parallel over the test session's 8 CPU devices.
  """
  events: list[tuple[str, int]] = []
  step_of: dict[int, int] = {}
  outputs = []  # keeps the arrays alive, so that their ids stay unique
  make_step = run_lib.make_train_step

  def patched(*args, **kwargs):
    tx, step = make_step(*args, **kwargs)

    def wrapped(*a):
      *state, losses = step(*a)
      events.append(("dispatch", len(step_of)))
      step_of[id(losses)] = len(step_of)
      outputs.append(losses)
      return (*state, losses)

    return tx, wrapped

  array_type = type(jax.numpy.zeros(()))
  to_numpy = array_type.__array__

  def reading(array, *args, **kwargs):
    if id(array) in step_of:
      events.append(("read", step_of[id(array)]))
    return to_numpy(array, *args, **kwargs)

  monkeypatch.setattr(run_lib, "make_train_step", patched)
  monkeypatch.setattr(array_type, "__array__", reading)
  return events


def test_fetch_interval_changes_no_result_and_callbacks_see_each_fetch(
  tmp_path, monkeypatch
):
  records = {1: [], 4: []}
  results = {}
  for every in records:
    config = dataclasses.replace(
      SMALL,
      log_every=every,
      mesh="data=-1",
      out=str(tmp_path / f"every-{every}"),
      tensorboard=str(tmp_path / f"tb-{every}"),
    )
    with monkeypatch.context() as patch:
      events = _record_dispatches_and_reads(patch)
      results[every] = train(config, callbacks=[records[every].append])
    # Step i's losses are read once, after the last step of its fetch was
    # dispatched and before the next one is: the host waits on the device
    # once per fetch, not once per step.
    fetch_steps = range(1, STEPS + 1) if every == 1 else (1, 4, 8, 11)
    expected, first = [], 0
    for last in [e * STEPS + s - 1 for e in (0, 1) for s in fetch_steps]:
      expected += [("dispatch", i) for i in range(first, last + 1)]
      expected += [("read", i) for i in range(first, last + 1)]
      first = last + 1
    assert events == expected

  # Fetching after every step or after every 4th: the same run.
  history = [dict(r, step_time_s=None) for r in results[1].history]
  assert history == [dict(r, step_time_s=None) for r in results[4].history]

  steps = [r for r in records[4] if r["kind"] == "step"]
  epochs = [r for r in records[4] if r["kind"] == "epoch"]
  # The first step alone, every 4th, and the last of each epoch.
  assert [(r["epoch"], r["step"]) for r in steps] == [
    (e, s) for e in (1, 2) for s in (1, 4, 8, 11)
  ]
  assert [r["global_step"] for r in steps] == [1, 4, 8, 11, 12, 15, 19, 22]
  assert [r["global_step"] for r in epochs] == [STEPS, 2 * STEPS]
  assert [
    {k: v for k, v in r.items() if k not in ("kind", "global_step")}
    for r in epochs
  ] == results[4].history
  # Each fetch's mean, weighted by its steps, is the epoch's mean loss; with
  # a fetch per step the records are the single steps' losses.
  per_step = np.array(
    [r["train_loss"] for r in records[1] if r["kind"] == "step"]
  )
  assert per_step.shape == (2 * STEPS, 4)
  sizes = np.diff([0, 1, 4, 8, 11])
  for epoch in (0, 1):
    window_means = np.array(
      [r["train_loss"] for r in steps[4 * epoch : 4 * epoch + 4]]
    )
    np.testing.assert_allclose(
      window_means,
      [
        per_step[STEPS * epoch + a : STEPS * epoch + b].mean(0)
        for a, b in zip([0, 1, 4, 8], [1, 4, 8, 11], strict=True)
      ],
      rtol=1e-12,
    )
    np.testing.assert_allclose(
      sizes @ window_means / STEPS,
      results[4].history[epoch]["train_loss"],
      rtol=1e-12,
    )
  assert all(r["examples_per_s"] > 0 for r in steps)

  # TensorBoard holds the same scalars, at the same global steps.
  scalars = _read_scalars(tmp_path / "tb-4")
  assert sorted(scalars) == sorted(
    f"{group}/exit_{k}"
    for group in ("train/loss", "test/accuracy", "test/loss")
    for k in range(1, 5)
  )
  for k in range(4):
    assert scalars[f"train/loss/exit_{k + 1}"] == [
      (r["global_step"], pytest.approx(r["train_loss"][k], rel=1e-6))
      for r in steps
    ]
    assert scalars[f"test/accuracy/exit_{k + 1}"] == [
      (r["global_step"], pytest.approx(r["test_accuracy"][k], rel=1e-6))
      for r in epochs
    ]


def test_seconds_per_step_leaves_out_the_first_fetch():
  assert seconds_per_step([(1, 10.0)]) == 10.0
  assert seconds_per_step([(1, 10.0), (4, 2.0), (2, 1.0)]) == 0.5


def test_tensorboard_without_tensorboardx_is_refused_before_any_work(
  monkeypatch,
):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda name, *a: (
      None if name == "tensorboardX" else real_find_spec(name, *a)
    ),
  )
  config = dataclasses.replace(SMALL, tensorboard="tb")
  with pytest.raises(
    ValueError,
    match=r"--tensorboard needs tensorboardX.*"
    r"pip install 'osgd-jax\[tensorboard\]'",
  ):
    config.validate()


def test_the_first_step_says_it_is_compiling_and_how_long_it_took(
  tmp_path, capsys
):
  # XLA compiles the step before the run's first step runs: a newcomer
  # should read that, not a first step's ETA of minutes. Without the
  # progress bar (osgd-compare's runs) nothing is said.
  config = dataclasses.replace(SMALL, epochs=1, progress=True)
  # A test before this one in the same worker may have compiled the same
  # step already; from an empty cache this run's first step compiles.
  jax.clear_caches()
  train(dataclasses.replace(config, out=str(tmp_path / "shown")))
  lines = capsys.readouterr().out.splitlines()
  starts = [line.split(" ")[0] for line in lines]
  assert starts.count("compiling") == starts.count("compiled") == 1, lines
  compiling, compiled = starts.index("compiling"), starts.index("compiled")
  assert compiling < compiled < starts.index("epoch"), lines
  assert lines[compiling] == "compiling the train step (XLA, once per run) ..."
  seconds = re.fullmatch(
    r"compiled the train step in (\d+\.\d) s", lines[compiled]
  )
  assert seconds is not None and float(seconds.group(1)) > 0, lines
  train(dataclasses.replace(SMALL, epochs=1, out=str(tmp_path / "hidden")))
  assert "compil" not in capsys.readouterr().out
