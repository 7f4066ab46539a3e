"""Starting a run: its output directory, data, model, mesh, step and state.

:func:`start_run` turns a validated configuration into a :class:`Run`, the
fixed parts of a run, and its first :class:`TrainState`: fresh, or restored
from the newest checkpoint with ``resume``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from osgd_jax import sharding, zoo
from osgd_jax.app import data as data_lib
from osgd_jax.app.checkpoint import CheckpointStore
from osgd_jax.app.report import write_json
from osgd_jax.app.train.config import TrainConfig, check_resumable
from osgd_jax.app.train.step import make_train_step

__all__ = [
  "CONFIG_FILE",
  "Run",
  "TrainState",
  "build_model",
  "default_output_dir",
  "load_data",
  "make_mesh",
  "prepare_output_dir",
  "read_saved_config",
  "start_run",
  "takes_images",
]

#: The file of a run's configuration, written when the run starts;
#: ``--resume`` compares the new settings with it before it reads any
#: checkpoint.
CONFIG_FILE = "config.json"


class TrainState(NamedTuple):
  """What a training step updates: parameters, other variables, optimizer."""

  params: Any
  rest: Any  # BatchNorm statistics and the model's other non-parameters
  opt_state: Any


@dataclasses.dataclass
class Run:
  """The parts of a started run that do not change from step to step.

  Attributes:
    config: the validated configuration.
    out: the output directory (absolute).
    dataset: the training and test data, in host memory.
    graphdef: the model's graph definition (``nnx.split``'s first part).
    num_exits: K.
    steps_per_epoch: global batches per epoch.
    mesh: the device mesh, or ``None`` for one device.
    step: the jitted step (see :func:`~osgd_jax.app.train.make_train_step`).
    store: the run's checkpoints.
    history: one record per completed epoch, those of a resumed run first.
  """

  config: TrainConfig
  out: str
  dataset: data_lib.Dataset
  graphdef: Any
  num_exits: int
  steps_per_epoch: int
  mesh: jax.sharding.Mesh | None
  step: Callable
  store: CheckpointStore
  history: list[dict[str, Any]]

  def host_model(self, state: TrainState) -> zoo.AnytimeNet:
    """The model of ``state`` with whole arrays in host memory.

    Every process holds them whole, however the training state is spread
    over devices and processes, so that each can evaluate the model.
    """
    params, rest = state.params, state.rest
    if self.mesh is not None:
      params, rest = sharding.to_host((params, rest))
    return nnx.merge(self.graphdef, params, rest)


def takes_images(model_name: str) -> bool:
  """Whether a zoo model reads ``(H, W, C)`` images (else flat vectors).

  Example:
    >>> takes_images("nested-depth-resnet"), takes_images("nested-depth-mlp")
    (True, False)
  """
  return (
    len(zoo.input_spec(model_name, "digits").shape) == 3
    if ("digits" in zoo.presets(model_name))
    else False
  )


def load_data(config: TrainConfig) -> data_lib.Dataset:
  """Loads the run's dataset, shaped for the model's backbone.

  Args:
    config: ``dataset``, ``data_dir``, ``model`` and ``validation``.

  Returns:
    The dataset; ``synthetic`` is digits-sized, so the digits presets fit it,
    and ``text`` is cut into windows of the model preset's context length.
    With ``validation`` > 0, its test arrays are the validation split held
    out of the training set (:func:`osgd_jax.app.data.hold_out_validation`),
    and the test set is dropped.

  Raises:
    ValueError: the data is missing or malformed; the message says where it
      was looked for.

  Example:
    >>> load_data(TrainConfig(dataset="synthetic")).input_shape
    (8, 8, 1)
  """
  if config.dataset == "synthetic":
    shape = (8, 8, 1) if takes_images(config.model) else (64,)
    dataset = data_lib.load_dataset("synthetic", shape=shape, difficulty=0.5)
  elif config.dataset == "text":
    # The windows are as long as the model's context.
    spec = zoo.input_spec(config.model, config.preset_name)
    dataset = data_lib.load_dataset(
      "text",
      text_file=config.text_file,
      context=int(spec.shape[0]),
      max_bytes=config.text_bytes,
    )
  else:
    dataset = data_lib.load_dataset(config.dataset, data_dir=config.data_dir)
  if config.validation:
    dataset = data_lib.hold_out_validation(dataset, config.validation)
  return dataset


def build_model(config: TrainConfig, dataset: data_lib.Dataset) -> Any:
  """Creates the zoo model for the dataset's input shape and classes.

  Args:
    config: ``model``, its preset
      (:attr:`~osgd_jax.app.train.TrainConfig.preset_name`) and ``seed``.
    dataset: the data it will train on.

  Returns:
    The model, a ``zoo.AnytimeNet``.

  Raises:
    ValueError: a convolutional model on data that is not images.

  Example:
    >>> config = TrainConfig(model="branched-mlp", dataset="synthetic")
    >>> build_model(config, load_data(config)).num_exits
    4
  """
  shape = tuple(dataset.input_shape)
  fit: dict[str, Any] = {"num_classes": dataset.num_classes}
  keys = zoo.config_keys(config.model)
  if dataset.sequence_labels:  # a language model, sized by its preset
    spec = zoo.input_spec(config.model, config.preset_name)
    if spec.shape != shape or spec.dtype != dataset.x_train.dtype:
      raise ValueError(
        f"--model {config.model} with --preset {config.preset_name} reads"
        f" {spec.dtype} inputs of shape {spec.shape}, but {dataset.name} has"
        f" {dataset.x_train.dtype} inputs of shape {shape}; leave out"
        " --preset for the data set's own."
      )
    fit["vocab"] = dataset.num_classes
  elif "in_features" in keys:
    fit["in_features"] = int(np.prod(shape))
  else:
    spec = zoo.input_spec(config.model, config.preset_name)
    if len(shape) != len(spec.shape):
      raise ValueError(
        f"{config.model} takes inputs of shape {spec.shape}, but"
        f" {dataset.name} has inputs of shape {shape}; pick an -mlp model."
      )
    fit["in_channels" if "in_channels" in keys else "channels"] = shape[-1]
  return zoo.create(
    config.model, rngs=nnx.Rngs(config.seed), preset=config.preset_name, **fit
  )


def default_output_dir(config: TrainConfig) -> str:
  """A fresh directory per run, so that repeating a command never collides.

  Args:
    config: the run's settings, which name the directory.

  Returns:
    ``runs/<model>-<dataset>-<optimizer>-seed<seed>-<date>-<time>``.

  Raises:
    ValueError: ``resume`` is set: a resumed run must name its ``out``.

  Example:
    >>> default_output_dir(TrainConfig()).startswith(
    ...     "runs/nested-depth-resnet-digits-osgd-seed0-")
    True
  """
  if config.resume:
    raise ValueError(
      "--resume needs the --out directory of the run to continue."
    )
  stamp = time.strftime("%Y%m%d-%H%M%S")
  return os.path.join(
    "runs",
    f"{config.model}-{config.dataset}-"
    f"{config.optimizer}-seed{config.seed}-{stamp}",
  )


def prepare_output_dir(out: str) -> str:
  """Creates ``out`` and checks that it is writable.

  Args:
    out: the directory, relative or absolute.

  Returns:
    Its absolute path.

  Raises:
    ValueError: it cannot be created or written to.

  Example:
    >>> with tempfile.TemporaryDirectory() as root:
    ...   out = prepare_output_dir(os.path.join(root, "run"))
  """
  out = os.path.abspath(out)
  try:
    os.makedirs(out, exist_ok=True)
    # A probe of its own: the processes of a multi-process run check the
    # same directory at once, and a shared name would race.
    with tempfile.NamedTemporaryFile("w", dir=out, prefix=".write-test-") as f:
      f.write("ok")
  except OSError as e:
    raise ValueError(
      f"cannot write to --out {out} ({e.strerror or e}); choose a writable"
      " directory."
    ) from None
  return out


def make_mesh(config: TrainConfig) -> jax.sharding.Mesh | None:
  """The run's device mesh, or ``None`` for a single-device run.

  Args:
    config: ``mesh`` (e.g. ``"data=4,model=2"``) and ``batch_size``.

  Returns:
    The mesh from :func:`osgd_jax.sharding.make_mesh`, or ``None``.

  Raises:
    ValueError: the mesh needs more devices than there are, or the batch
      does not divide over its data axis and the processes.

  Example:
    >>> make_mesh(TrainConfig()) is None
    True
  """
  if config.mesh is None:
    return None
  mesh = sharding.make_mesh(config.mesh)
  data_size = mesh.shape[sharding.DATA_AXIS]
  if config.batch_size % data_size or config.batch_size % jax.process_count():
    raise ValueError(
      f"--batch-size {config.batch_size} does not divide over the"
      f" {data_size} devices of the data axis of --mesh {config.mesh}"
      f" ({jax.process_count()} processes); use a multiple of"
      f" {np.lcm(data_size, jax.process_count())}."
    )
  return mesh


def _require_shared_out(config: TrainConfig) -> None:
  processes = jax.process_count()
  if processes > 1 and config.out is None:
    raise ValueError(
      f"this is one of {processes} processes: pass --out, a directory on a"
      " file system that every process can write, so that all of them"
      " write one run."
    )


def _initial_state(
  tx: Any, params: Any, rest: Any, mesh: jax.sharding.Mesh | None
) -> TrainState:
  if mesh is None:
    return TrainState(params, rest, tx.init(params))
  params, rest = sharding.shard_params((params, rest), mesh)
  # The parameter rule depends only on shapes, so a momentum buffer lands on
  # its parameter's devices.
  return TrainState(params, rest, sharding.shard_params(tx.init(params), mesh))


def read_saved_config(out: str, store: CheckpointStore) -> dict[str, Any]:
  """The configuration a run in ``out`` was started with.

  Args:
    out: the run's output directory.
    store: its checkpoints, read (metadata only) when ``out`` has no
      :data:`CONFIG_FILE`, as runs of earlier versions do not.

  Returns:
    ``TrainConfig.to_json()`` of that run, as read back from JSON.

  Raises:
    ValueError: there is no run in ``out`` to resume, or its record cannot
      be read.
  """
  path = os.path.join(out, CONFIG_FILE)
  if os.path.isfile(path):
    try:
      with open(path) as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(
        f"cannot read {path} ({e}); it records the run's settings. Start"
        " again with a new --out."
      ) from None
    if not isinstance(saved, dict):
      raise ValueError(
        f"{path} does not hold a run's settings; start again with a new --out."
      )
    return saved
  epoch = store.latest_epoch()
  if epoch is None:
    raise ValueError(
      f"no run to resume in {out}: it holds no checkpoint; run without"
      " --resume to start a new run."
    )
  return store.read_metadata(epoch)["config"]


def _resume_point(
  config: TrainConfig, out: str, store: CheckpointStore, state: TrainState
) -> tuple[TrainState, list[dict[str, Any]]]:
  """The state and history to start from: the newest checkpoint's or fresh.

  A resumed run's settings are compared with the saved ones before any
  checkpoint is read, so that a checkpoint of other settings is reported as
  such, never as damaged.
  """
  if config.resume:
    check_resumable(read_saved_config(out, store), config)
    arrays, meta = store.restore_latest(tuple(state))
    check_resumable(meta["config"], config)
    return TrainState(*arrays), list(meta["history"])
  if store.latest_epoch() is not None:
    raise ValueError(
      f"{out} already holds checkpoints; pass --resume to continue that"
      " run, or choose a new --out."
    )
  if jax.process_index() == 0:
    write_json(os.path.join(out, CONFIG_FILE), config.to_json())
  return state, []


def start_run(config: TrainConfig) -> tuple[Run, TrainState]:
  """Sets up a run and its first state, resuming it when ``config.resume``.

  Args:
    config: the run's settings.

  Returns:
    ``(run, state)``: ``run.history`` holds the epochs already done.

  Raises:
    ValueError: a bad setting, missing data, an unwritable ``out``, a batch
      larger than the training set, existing checkpoints without ``resume``,
      or a checkpoint that cannot be resumed.
  """
  config.validate()
  _require_shared_out(config)
  mesh = make_mesh(config)
  out = prepare_output_dir(
    default_output_dir(config) if config.out is None else config.out
  )
  dataset = load_data(config)
  model = build_model(config, dataset)
  steps_per_epoch = data_lib.num_batches(dataset.num_train, config.batch_size)
  if steps_per_epoch == 0:
    held = (
      f" left by --validation {config.validation}" if config.validation else ""
    )
    raise ValueError(
      f"--batch-size {config.batch_size} exceeds the {dataset.num_train}"
      f" training examples{held}; use a smaller batch."
    )
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx, step = make_train_step(
    config,
    graphdef,
    model.num_exits,
    steps_per_epoch * config.epochs,
    augment=dataset.name.startswith("cifar"),
    mesh=mesh,
  )
  store = CheckpointStore(
    os.path.join(out, "checkpoints"), keep=config.keep_checkpoints
  )
  state, history = _resume_point(
    config, out, store, _initial_state(tx, params, rest, mesh)
  )
  run = Run(
    config=config,
    out=out,
    dataset=dataset,
    graphdef=graphdef,
    num_exits=model.num_exits,
    steps_per_epoch=steps_per_epoch,
    mesh=mesh,
    step=step,
    store=store,
    history=history,
  )
  return run, state
