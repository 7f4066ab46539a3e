"""Data- and model-parallel training on 8 CPU devices, and two processes.

A step on a ``data=4,model=2`` mesh must give the single-device step's
parameters, BatchNorm statistics and losses to float tolerance, and keep
every array on the parameter rule. Two local processes joined through
``jax.distributed`` (4 devices each) must train the same run as one process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from osgd_jax import sharding, zoo
from osgd_jax.app import data as data_lib
from osgd_jax.app import train as train_lib
from osgd_jax.app.train import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
  jax.device_count() < 8,
  reason="needs 8 devices; tests/conftest.py sets XLA_FLAGS for them",
)

CONFIG = train_lib.TrainConfig(
  model="nested-depth-mlp",
  dataset="synthetic",
  batch_size=32,
  optimizer="osgd",
  progress=False,
)


def _run_steps(config, dataset, steps):
  # Two stages of width 15, not the digits preset's four of width 64: the
  # compile of the step grows with the model's leaves, and two exits already
  # take every path of the sharded step (a K×K Gram block, the staged
  # Jacobian). The odd width leaves some leaves replicated (15 wide), splits
  # others over the model axis on their first (64×15) or last (15×10)
  # dimension.
  model = zoo.create(
    config.model,
    rngs=nnx.Rngs(config.seed),
    in_features=int(np.prod(dataset.input_shape)),
    num_classes=dataset.num_classes,
    stages=2,
    width=15,
  )
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  mesh = train_lib.make_mesh(config)
  tx, step = train_lib.make_train_step(
    config, graphdef, model.num_exits, 100, False, mesh
  )
  if mesh is not None:
    params, rest = sharding.shard_params((params, rest), mesh)
  opt_state = tx.init(params)
  if mesh is not None:
    opt_state = sharding.shard_params(opt_state, mesh)
  batches = data_lib.iterate_batches(
    dataset.x_train, dataset.y_train, config.batch_size, seed=0, epoch=0
  )
  key = jax.random.key(0)
  # The first `steps` batches of the epoch.
  for _, (x, y) in zip(range(steps), batches, strict=False):
    if mesh is not None:
      x, y = sharding.shard_batch((x, y), mesh)
    params, rest, opt_state, losses = step(params, rest, opt_state, x, y, key)
  return params, rest, opt_state, losses


@pytest.mark.parametrize(
  "optimizer,per_exit_grads,engine",
  [
    ("osgd", "staged", "stacked"),
    ("sgd", "staged", "auto"),
    ("upgrad", "vmap", "stacked"),
    # A Gramian: Gram matrices of the global batch's gradients.
    ("osgd", "staged", "gramian"),
  ],
)
def test_mesh_steps_match_single_device_steps(
  optimizer, per_exit_grads, engine
):
  config = dataclasses.replace(
    CONFIG, optimizer=optimizer, per_exit_grads=per_exit_grads, engine=engine
  )
  dataset = train_lib.load_data(config)
  single = _run_steps(config, dataset, steps=3)
  sharded = _run_steps(
    dataclasses.replace(config, mesh="data=4,model=2"), dataset, steps=3
  )
  for want, got in zip(single, sharded, strict=True):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(
        np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6
      ),
      want,
      got,
    )
  params, _, opt_state, _ = sharded
  for leaf in jax.tree.leaves((params, opt_state)):
    want = sharding.param_spec(leaf.shape, 2)
    assert leaf.sharding.is_equivalent_to(
      jax.sharding.NamedSharding(leaf.sharding.mesh, want), leaf.ndim
    )
  assert any(
    "model" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(params)
  )


def test_bad_mesh_settings_are_one_line_errors(tmp_path, capsys):
  base = [
    "--model",
    "nested-depth-mlp",
    "--dataset",
    "synthetic",
    "--epochs",
    "1",
    "--no-progress",
  ]
  assert (
    cli.main(base + ["--mesh", "data=3", "--out", str(tmp_path / "a")]) == 2
  )
  assert "needs 3 devices but 8 are available" in capsys.readouterr().err
  assert (
    cli.main(
      base
      + ["--mesh", "data=8", "--batch-size", "20", "--out", str(tmp_path / "b")]
    )
    == 2
  )
  err = capsys.readouterr().err
  assert "--batch-size 20 does not divide over the 8 devices" in err
  assert "multiple of 8" in err
  assert cli.main(base + ["--mesh", "gpus=8"]) == 2
  assert "unknown axis 'gpus'" in capsys.readouterr().err


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _with_device_count(xla_flags, count):
  """``xla_flags`` with ``count`` host devices, its other flags kept."""
  kept = [
    flag
    for flag in xla_flags.split()
    if not flag.startswith("--xla_force_host_platform_device_count")
  ]
  return " ".join(kept + [f"--xla_force_host_platform_device_count={count}"])


@pytest.mark.slow
def test_two_processes_train_the_same_run_as_one(tmp_path):
  # Two steps of 1024 (128 per device): every step's collectives cross the
  # processes, so each step costs far more than in one process, and a
  # second step already shows the run going on from the first. SGD's step
  # compiles in a fifth of OSGD's time in each of the three runs; OSGD's
  # sharded step (the same program whatever process holds the devices) is
  # checked against one device above.
  flags = [
    "--model",
    "nested-depth-mlp",
    "--dataset",
    "synthetic",
    "--optimizer",
    "sgd",
    "--epochs",
    "1",
    "--batch-size",
    "1024",
    "--no-progress",
    "--keep-checkpoints",
    "1",
  ]
  port = _free_port()
  procs = []
  for rank in range(2):
    env = dict(
      os.environ,
      XLA_FLAGS=_with_device_count(os.environ.get("XLA_FLAGS", ""), 4),
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(rank),
    )
    procs.append(
      subprocess.Popen(
        [
          sys.executable,
          "-m",
          "osgd_jax.app.train.cli",
          *flags,
          "--mesh",
          "data=4,model=2",
          "--out",
          str(tmp_path / "multi"),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  outputs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outputs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert "test acc" in outputs[0][0]  # process 0 reports ...
  assert "test acc" not in outputs[1][0]  # ... and process 1 does not
  assert "artefacts:" not in outputs[1][0]

  single = train_lib.train(
    dataclasses.replace(
      train_lib.TrainConfig(),
      **_config_fields(flags),
      out=str(tmp_path / "single"),
    )
  )
  multi = json.loads((tmp_path / "multi" / "metrics.json").read_text())
  epoch = multi["epochs"][0]
  # Two steps in another reduction order: rounding differences grow a
  # little with every step (the tight per-step check is above).
  np.testing.assert_allclose(
    epoch["train_loss"], single.history[0]["train_loss"], rtol=1e-3
  )
  np.testing.assert_allclose(
    epoch["test_accuracy"], single.history[0]["test_accuracy"], atol=0.005
  )
  assert (tmp_path / "multi" / "checkpoints" / "1").is_dir()


def _config_fields(flags):
  parsed = cli.config_from_args(flags)
  return {
    f.name: getattr(parsed, f.name)
    for f in dataclasses.fields(parsed)
    if f.name != "out"
  }


def test_sharded_checkpoints_restore_onto_any_mesh(tmp_path):
  from osgd_jax.app.checkpoint import CheckpointStore

  rng = np.random.default_rng(0)
  tree = {
    "w": rng.normal(size=(8, 6)).astype(np.float32),
    "b": rng.normal(size=(5,)).astype(np.float32),
  }
  store = CheckpointStore(str(tmp_path / "ckpt"), keep=1)
  store.save(
    1,
    sharding.shard_params(tree, sharding.make_mesh("data=4,model=2")),
    {"epoch": 1},
  )
  # Resume on another mesh: the template's shardings win.
  template = sharding.shard_params(
    jax.tree.map(np.zeros_like, tree), sharding.make_mesh("data=2,model=4")
  )
  restored, meta = store.restore_latest(template)
  store.close()
  assert meta == {"epoch": 1}
  for name in tree:
    np.testing.assert_array_equal(restored[name], tree[name])
    assert restored[name].sharding == template[name].sharding
