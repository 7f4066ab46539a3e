"""A training run's configuration: its fields, their validation, and resuming.

Every field mirrors an ``osgd-train`` flag. A checkpoint records the
configuration it was written with, and a run may resume it only with the
same settings, except the few in :data:`RESUMABLE_CHANGES`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from osgd_jax import sharding, zoo
from osgd_jax.app import data as data_lib

__all__ = ["OPTIMIZERS", "PER_EXIT_GRADS", "RESUMABLE_CHANGES", "SCHEDULES",
           "TrainConfig", "check_resumable"]

# "sgd" differentiates the summed loss; every other name aggregates the
# stacked per-exit gradients with the transformation of the same name.
OPTIMIZERS = ("osgd", "sgd", "sgd-linear", "sgd-geometric", "sgd-sdn",
              "sgd-mean", "adaloss", "pcgrad", "mgda", "upgrad",
              # The rest of TorchJD 0.18's aggregators, by their papers' names.
              "random", "imtl-g", "aligned-mtl", "krum", "dualproj", "gradvac",
              "cagrad", "config", "fairgrad", "nash-mtl", "modo", "sdmgrad",
              "pcd", "crmogm", "trimmed-mean", "graddrop", "excess-mtl")
SCHEDULES = ("cosine", "step", "constant")
# How the per-exit gradients are computed: "staged" runs exit k's backward
# pass through stages 1..k only, its rows looped on CPU and batched on
# accelerators ("staged-looped" / "staged-batched" force one); "vmap" (the
# fallback) runs K full backward passes.
PER_EXIT_GRADS = ("staged", "staged-looped", "staged-batched", "vmap")

# Fields that may change between a run and its resumption. per_exit_grads
# changes how the same gradients are computed (equal up to rounding), and
# checkpoints from before the field existed do not record it.
RESUMABLE_CHANGES = ("epochs", "out", "resume", "eval_every", "progress",
                     "keep_checkpoints", "data_dir", "per_exit_grads", "mesh")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a training run; fields mirror the CLI flags.

  The default is the library's main job: a nested network on scikit-learn's
  digits, trained with OSGD in a few minutes on two CPU cores.

  Example:
    >>> config = TrainConfig(model="branched-mlp", epochs=2)
    >>> config.validate()
    >>> config.preset_name
    'digits'
  """

  model: str = "nested-depth-resnet"
  preset: str | None = None  # None: the preset named after the dataset
  dataset: str = "digits"
  data_dir: str | None = None
  optimizer: str = "osgd"
  granularity: str = "leaf"
  method: str = "gram"
  exit_weights: tuple[float, ...] | None = None
  per_exit_grads: str = "staged"
  mesh: str | None = None  # e.g. "data=4,model=2"; None: one device
  epochs: int = 15
  batch_size: int = 64
  lr: float = 0.05
  schedule: str = "cosine"
  momentum: float = 0.9
  weight_decay: float = 5e-4
  seed: int = 0
  out: str | None = None  # None: a new runs/<model>-<dataset>-<optimizer>-... dir
  resume: bool = False
  eval_every: int = 1
  keep_checkpoints: int = 2
  progress: bool = True

  @property
  def preset_name(self) -> str:
    """The zoo preset the model is built with: ``preset``, or the dataset's."""
    if self.preset is not None:
      return self.preset
    return "cifar" if self.dataset.startswith("cifar") else "digits"

  def validate(self) -> None:
    """Raises a ``ValueError`` naming the first bad field and the fix."""
    if self.model not in zoo.names():
      raise ValueError(
          f"unknown model {self.model!r}; choose one of: {', '.join(zoo.names())}.")
    if self.dataset.lower().replace("-", "").replace("_", "") not in (
        data_lib.DATASET_NAMES):
      raise ValueError(
          f"unknown dataset {self.dataset!r}; choose one of:"
          f" {', '.join(data_lib.DATASET_NAMES)}.")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(
          f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}.")
    if self.per_exit_grads not in PER_EXIT_GRADS:
      raise ValueError(
          f"unknown --per-exit-grads {self.per_exit_grads!r}; choose one of:"
          f" {', '.join(PER_EXIT_GRADS)}.")
    if self.schedule not in SCHEDULES:
      raise ValueError(
          f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}.")
    if self.preset is not None and self.preset not in zoo.presets(self.model):
      raise ValueError(
          f"unknown preset {self.preset!r} for {self.model}; choose one of:"
          f" {', '.join(zoo.presets(self.model))}.")
    for name in ("epochs", "batch_size", "eval_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got"
                         f" {getattr(self, name)}.")
    if not self.lr > 0:
      raise ValueError(f"--lr must be > 0, got {self.lr}.")
    if not 0 <= self.momentum < 1:
      raise ValueError(f"--momentum must be in [0, 1), got {self.momentum}.")
    if self.weight_decay < 0:
      raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}.")
    if self.mesh is not None:
      sharding.parse_mesh_spec(self.mesh)  # the device count is checked at start
    if self.exit_weights is not None and any(w < 0 for w in self.exit_weights):
      raise ValueError(f"--exit-weights must be >= 0, got {self.exit_weights}.")

  def to_json(self) -> dict[str, Any]:
    """The fields as a JSON-serialisable dict, as checkpoints record them."""
    return dataclasses.asdict(self)


def check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
  """Checks that ``config`` may continue the run that was saved with ``saved``.

  Args:
    saved: the configuration a checkpoint recorded (``TrainConfig.to_json``,
      read back from JSON, so tuples are lists).
    config: the configuration of the run resuming it.

  Raises:
    ValueError: a field outside :data:`RESUMABLE_CHANGES` differs; the
      message names each one, old and new.

  Example:
    >>> check_resumable(TrainConfig().to_json(), TrainConfig(epochs=30))
  """
  current = config.to_json()
  changed = sorted(
      k for k in current
      if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]
      and not (isinstance(current[k], tuple) and saved.get(k) == list(current[k])))
  if changed:
    details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
    raise ValueError(
        f"--resume with a different configuration ({details}); use the"
        " original settings or a new --out.")
