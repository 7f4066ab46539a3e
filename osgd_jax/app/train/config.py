"""A training run's configuration: its fields, their validation, and resuming.

Every field mirrors an ``osgd-train`` flag. A checkpoint records the
configuration it was written with, and a run may resume it only with the
same settings, except the few in :data:`RESUMABLE_CHANGES`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import numbers
from typing import Any, get_args

import numpy as np

from osgd_jax import aggregation, sharding, zoo
from osgd_jax.app import data as data_lib

__all__ = [
  "COORDINATE_OPTIMIZERS",
  "DEFAULT_MODELS",
  "ENGINES",
  "OPTIMIZERS",
  "PER_EXIT_GRADS",
  "RESUMABLE_CHANGES",
  "SCHEDULES",
  "TrainConfig",
  "check_resumable",
  "config_differences",
  "describe_differences",
]

#: The optimizers by name, OSGD first. "sgd" differentiates the summed loss;
#: every other name is an aggregator of the library's registry
#: (:func:`osgd_jax.aggregation.names`), which aggregates the stacked
#: per-exit gradients.
OPTIMIZERS = (
  "osgd",
  "sgd",
  *(name for name in aggregation.names() if name != "osgd"),
)
_GRANULARITIES = get_args(aggregation.Granularity)
_METHODS = get_args(aggregation.OsgdMethod)
#: The learning-rate schedules, from the peak ``lr`` (``cosine`` decays to
#: 0, ``step`` divides by 10 at half and three quarters of the run,
#: ``constant`` keeps ``lr``).
SCHEDULES = ("cosine", "step", "constant")
#: How the per-exit gradients are computed. "staged" runs exit k's backward
#: pass through stages 1..k only, its rows looped on CPU and batched on
#: accelerators ("staged-looped" / "staged-batched" force one); "vmap" (the
#: fallback) runs K full backward passes.
PER_EXIT_GRADS = ("staged", "staged-looped", "staged-batched", "vmap")
#: What the aggregator receives. "stacked": the per-exit gradients stacked on
#: a leading K axis (K copies of the parameters); "gramian": an
#: :class:`osgd_jax.Gramian`, their K×K Gram matrices and one weighted
#: backward pass, without the stack (``docs/design.md``, "The Gramian
#: engine"); "auto": "gramian" wherever the optimizer can take one, else
#: "stacked". ``--per-exit-grads`` still says how the backward passes run.
ENGINES = ("auto", "stacked", "gramian")
#: The optimizers that read every coordinate of the per-exit gradients, which
#: a Gramian does not hold: ``--engine gramian`` refuses them and ``auto``
#: gives them stacked gradients (as it does ``--method sequential``).
COORDINATE_OPTIMIZERS = ("excess-mtl", "graddrop", "trimmed-mean")

#: Fields that may change between a run and its resumption. per_exit_grads
#: changes how the same gradients are computed (equal up to rounding), and
#: checkpoints from before the field existed do not record it. ``epochs`` is
#: not one: the learning-rate schedule (and SDN's weights) span all epochs, so
#: a new count would silently change the steps already planned.
RESUMABLE_CHANGES = (
  "out",
  "resume",
  "eval_every",
  "progress",
  "keep_checkpoints",
  "data_dir",
  "per_exit_grads",
  "mesh",
  "log_every",
  "tensorboard",
)

# Integer fields: (smallest, largest) accepted value. The bounds keep step
# counts within the int32 counters of Optax schedules and the seed within
# the 32 bits a PRNG key takes.
_INT_RANGES = {
  "epochs": (1, 100_000),
  "batch_size": (1, 2**31 - 1),
  "eval_every": (1, 100_000),
  "log_every": (1, 2**31 - 1),
  "keep_checkpoints": (1, 10_000),
  "seed": (0, 2**32 - 1),
}
_BOOL_FIELDS = ("resume", "progress", "rescale")
# The zoo preset sized for each data set; the others (digits, and synthetic,
# which is digits-sized) take the digits preset.
_DATASET_PRESETS = {
  "cifar10": "cifar",
  "cifar100": "cifar",
  "mnist1d": "mnist1d",
  "text": "text",
}
#: The model ``osgd-train`` trains on each data set when ``--model`` is not
#: given: one that reads the data set's inputs, at its preset's size. On
#: MNIST-1D the 1-D ResNet's deepest exit reaches CNN-level accuracy in a
#: CPU-sized run (benchmarks/RESULTS.md has the measurement).
DEFAULT_MODELS = {
  "digits": "nested-depth-resnet",
  "synthetic": "nested-depth-resnet",
  "cifar10": "nested-depth-resnet",
  "cifar100": "nested-depth-resnet",
  "mnist1d": "nested-depth-conv1d",
  # The early-exit LM of CALM and LayerSkip: one causal trunk with an exit
  # after each stage, and the cheapest of the transformers per step.
  "text": "branched-transformer",
}


def _reads_tokens(model: str, preset: str) -> bool:
  """Whether ``model`` at ``preset`` reads token ids (a language model)."""
  return np.issubdtype(zoo.input_spec(model, preset).dtype, np.integer)


def _fitting_models(preset: str) -> list[str]:
  """The zoo models that have ``preset``: those that read its data."""
  return [m for m in zoo.names() if preset in zoo.presets(m)]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a training run; fields mirror the CLI flags.

  The default is the library's main job: a nested network on scikit-learn's
  digits, trained with OSGD in about a minute on two CPU cores.

  Example:
    >>> config = TrainConfig(model="branched-mlp", epochs=2)
    >>> config.validate()
    >>> config.preset_name
    'digits'
  """

  # "": the data set's default model (DEFAULT_MODELS), set on creation.
  model: str = ""
  preset: str | None = None  # None: the preset named after the dataset
  dataset: str = "digits"
  data_dir: str | None = None
  # The text of --dataset text; None: the default text, Python
  # standard-library source read from the running interpreter.
  text_file: str | None = None
  # Train on the text's first text_bytes bytes only (its test tail is the
  # end of those); None: all of it.
  text_bytes: int | None = None
  # The fraction of the training set held out (stratified, with a fixed
  # seed) to evaluate on instead of the test set; 0: train on all of it and
  # evaluate on the test set.
  validation: float = 0.0
  optimizer: str = "osgd"
  granularity: str = "leaf"
  method: str = "gram"
  rescale: bool = False  # OSGD: projected components keep their exit's norm
  # From this fraction of the run's steps on, sum the exit gradients (plain
  # SGD) instead of aggregating them; None: never.
  switch_to_sgd: float | None = None
  exit_weights: tuple[float, ...] | None = None
  per_exit_grads: str = "staged"
  engine: str = "auto"
  mesh: str | None = None  # e.g. "data=4,model=2"; None: one device
  epochs: int = 15
  batch_size: int = 64
  lr: float = 0.05
  schedule: str = "cosine"
  momentum: float = 0.9
  weight_decay: float = 5e-4
  seed: int = 0
  out: str | None = (
    None  # None: a new runs/<model>-<dataset>-<optimizer>-... dir
  )
  resume: bool = False
  eval_every: int = 1
  keep_checkpoints: int = 2
  progress: bool = True
  log_every: int = 100  # fetch the losses from the device every N steps
  tensorboard: str | None = None  # a directory for TensorBoard event files

  def __post_init__(self):
    # An alias names its data set everywhere after this, the preset included.
    if (
      isinstance(self.dataset, str) and self.dataset in data_lib.DATASET_ALIASES
    ):
      object.__setattr__(
        self, "dataset", data_lib.DATASET_ALIASES[self.dataset]
      )
    if self.model == "" and isinstance(self.dataset, str):
      default = DEFAULT_MODELS.get(self.dataset, DEFAULT_MODELS["digits"])
      object.__setattr__(self, "model", default)
    if isinstance(self.exit_weights, list):  # as a JSON or YAML file gives it
      object.__setattr__(self, "exit_weights", tuple(self.exit_weights))

  @property
  def preset_name(self) -> str:
    """The zoo preset the model is built with (``preset``, or the dataset's)."""
    if self.preset is not None:
      return self.preset
    return _DATASET_PRESETS.get(self.dataset, "digits")

  @property
  def uses_gramian(self) -> bool:
    """Whether the step hands the aggregator a Gramian (``--engine``).

    ``"auto"`` does wherever the optimizer takes one: not for ``sgd``
    (whose summed-loss gradient needs no aggregation), the
    :data:`COORDINATE_OPTIMIZERS` or OSGD's ``sequential`` method.

    Example:
      >>> TrainConfig(engine="auto").uses_gramian
      True
      >>> TrainConfig(engine="auto", optimizer="graddrop").uses_gramian
      False
    """
    if self.engine == "stacked" or self.optimizer == "sgd":
      return False
    if self.engine == "gramian":
      return True
    return self.optimizer not in COORDINATE_OPTIMIZERS and not (
      self.optimizer == "osgd" and self.method == "sequential"
    )

  @property
  def evaluated_on(self) -> str:
    """The split the run is scored on, ``"validation"`` or ``"test"``.

    Example:
      >>> TrainConfig(validation=0.2).evaluated_on
      'validation'
    """
    return "validation" if self.validation else "test"

  @property
  def eval_prefix(self) -> str:
    """The prefix of the run's evaluation metrics, ``"val"`` or ``"test"``.

    A run on a validation split records ``val_accuracy`` and ``val_loss``,
    never ``test_*``, so that no reader takes one for the other.

    Example:
      >>> TrainConfig().eval_prefix + "_accuracy"
      'test_accuracy'
    """
    return "val" if self.validation else "test"

  def validate(self) -> None:
    """Raises a ``ValueError`` naming the first bad field and the fix.

    Every field is checked for its type and range, so that a value from a
    config file gets the same one-line error as a flag, before any work.
    """
    _check_choice("--model", self.model, zoo.names())
    data_lib.canonical_dataset_name(self.dataset)
    data_preset = _DATASET_PRESETS.get(self.dataset, "digits")
    if data_preset not in zoo.presets(self.model):
      raise ValueError(
        f"--model {self.model} cannot read --dataset {self.dataset}'s"
        f" inputs (it has no {data_preset} preset); choose one that can:"
        f" {', '.join(_fitting_models(data_preset))}, or leave --model out"
        f" for {DEFAULT_MODELS.get(self.dataset, DEFAULT_MODELS['digits'])}."
      )
    if self.text_file is not None and self.dataset != "text":
      raise ValueError(
        f"--text-file is the text of --dataset text, not of --dataset"
        f" {self.dataset}; add --dataset text, or leave out --text-file."
      )
    if self.text_bytes is not None:
      if self.dataset != "text":
        raise ValueError(
          f"--text-bytes limits the text of --dataset text, not --dataset"
          f" {self.dataset}; add --dataset text, or leave out --text-bytes."
        )
      _check_int("--text-bytes", self.text_bytes, 1, 2**62)
    _check_choice("--optimizer", self.optimizer, OPTIMIZERS)
    _check_choice("--granularity", self.granularity, _GRANULARITIES)
    _check_choice("--method", self.method, _METHODS)
    _check_choice("--per-exit-grads", self.per_exit_grads, PER_EXIT_GRADS)
    _check_choice("--schedule", self.schedule, SCHEDULES)
    _check_choice("--engine", self.engine, ENGINES)
    self._check_engine()
    if self.preset is not None:
      _check_choice(
        "--preset",
        self.preset,
        tuple(zoo.presets(self.model)),
        f" for {self.model}",
      )
      self._check_preset_reads_data()
    for name in ("data_dir", "text_file", "out", "mesh", "tensorboard"):
      value = getattr(self, name)
      if value is not None and not (isinstance(value, str) and value.strip()):
        raise ValueError(
          f"{_flag(name)} must be a non-empty path or text, got {value!r};"
          f" leave it out for the default."
        )
    for name in _BOOL_FIELDS:
      if not isinstance(getattr(self, name), bool):
        raise ValueError(
          f"{name} must be true or false, got {getattr(self, name)!r}."
        )
    for name, (low, high) in _INT_RANGES.items():
      _check_int(_flag(name), getattr(self, name), low, high)
    _check_real("--lr", self.lr, "> 0", lambda v: v > 0)
    _check_real(
      "--validation", self.validation, "in [0, 1)", lambda v: 0 <= v < 1
    )
    _check_real("--momentum", self.momentum, "in [0, 1)", lambda v: 0 <= v < 1)
    _check_real("--weight-decay", self.weight_decay, ">= 0", lambda v: v >= 0)
    if self.switch_to_sgd is not None:
      _check_real(
        "--switch-to-sgd",
        self.switch_to_sgd,
        "in [0, 1]",
        lambda v: 0 <= v <= 1,
      )
      if self.optimizer == "sgd":
        raise ValueError(
          "--switch-to-sgd switches an aggregating optimizer to plain SGD;"
          " --optimizer sgd is plain SGD throughout. Leave out"
          " --switch-to-sgd, or choose an --optimizer such as osgd."
        )
    if self.rescale and self.optimizer != "osgd":
      raise ValueError(
        f"--rescale is an option of --optimizer osgd, not"
        f" {self.optimizer}; leave it out or use --optimizer osgd."
      )
    if (
      self.tensorboard is not None
      and importlib.util.find_spec("tensorboardX") is None
    ):
      raise ValueError(
        "--tensorboard needs tensorboardX, which is not installed; install"
        " the extra (python -m pip install 'osgd-jax[tensorboard]') or"
        " leave out --tensorboard."
      )
    if self.mesh is not None:
      sharding.parse_mesh_spec(
        self.mesh
      )  # the device count is checked at start
    if self.exit_weights is not None:
      weights = self.exit_weights
      if (
        not isinstance(weights, tuple)
        or not weights
        or not all(
          _is_number(w) and math.isfinite(w) and w >= 0 for w in weights
        )
      ):
        raise ValueError(
          "--exit-weights must be finite numbers >= 0, one per exit, such"
          f" as 1,1,2,4; got {weights!r}."
        )
      if not any(w > 0 for w in weights):
        raise ValueError(
          f"--exit-weights {','.join(map(str, weights))} are all zero: no"
          " exit would be trained. Give at least one exit a weight > 0."
        )

  def _check_preset_reads_data(self) -> None:
    """Refuses a language model's preset on other data, and the reverse.

    A preset whose input is token ids (``text``, ``text-small``) fits
    ``--dataset text`` alone, and the text fits no other preset.
    """
    text = self.dataset == "text"
    if _reads_tokens(self.model, self.preset_name) == text:
      return
    fitting = [
      p for p in zoo.presets(self.model) if _reads_tokens(self.model, p) == text
    ]
    raise ValueError(
      f"--preset {self.preset} of {self.model} does not read"
      f" --dataset {self.dataset}'s inputs; choose one that does:"
      f" {', '.join(fitting)}, or leave out --preset for the data set's own."
    )

  def _check_engine(self) -> None:
    """Refuses ``--engine gramian`` for an optimizer that cannot take one."""
    if self.engine != "gramian":
      return
    if self.optimizer == "sgd":
      raise ValueError(
        "--engine gramian forms the per-exit gradients' Gram matrices;"
        " --optimizer sgd differentiates the summed loss and has none. Leave"
        " out --engine, or choose an --optimizer such as osgd."
      )
    if self.optimizer in COORDINATE_OPTIMIZERS:
      raise ValueError(
        f"--optimizer {self.optimizer} reads every coordinate of the per-exit"
        " gradients, which --engine gramian does not form; use --engine"
        " stacked (or auto, which picks it)."
      )
    if self.optimizer == "osgd" and self.method == "sequential":
      raise ValueError(
        "--method sequential runs Gram-Schmidt on the gradients themselves,"
        " which --engine gramian does not form; use --method gram (the same"
        " projection from the Gram matrix) or --engine stacked."
      )

  def to_json(self) -> dict[str, Any]:
    """The fields as a JSON-serialisable dict, as checkpoints record them."""
    return dataclasses.asdict(self)


_DEFAULTS = TrainConfig().to_json()


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
  # A run saved before a field existed trained with the field's default.
  return {**_DEFAULTS, **saved}


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def _check_choice(
  flag: str, value: Any, choices: tuple[str, ...], where: str = ""
) -> None:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(
      f"unknown {flag} {value!r}{where}; choose one of: {', '.join(choices)}."
    )


def _check_int(flag: str, value: Any, low: int, high: int) -> None:
  if (
    isinstance(value, bool)
    or not isinstance(value, numbers.Integral)
    or not low <= int(value) <= high
  ):
    raise ValueError(
      f"{flag} must be an integer from {low} to {high}, got {value!r}."
    )


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_real(flag: str, value: Any, condition: str, holds) -> None:
  # A NaN fails every comparison, so it is rejected here and never reaches
  # training as a "divergence".
  if not (_is_number(value) and math.isfinite(value) and holds(value)):
    raise ValueError(
      f"{flag} must be a finite number {condition}, got {value!r}."
    )


def _as_flag(name: str, value: Any) -> str:
  """``value`` of field ``name`` as the command-line flag that sets it."""
  if value is None or value is False:  # a switch: absent, or the default
    return f"no {_flag(name)}"
  if value is True:
    return _flag(name)
  if isinstance(value, (list, tuple)):
    value = ",".join(str(v) for v in value)
  return f"{_flag(name)} {value}"


def config_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
  """The fields, outside :data:`RESUMABLE_CHANGES`, where two runs differ.

  Args:
    saved: a run's recorded configuration (``TrainConfig.to_json``, read
      back from JSON, so tuples are lists). A field it lacks, from a
      version before the field existed, counts as the field's default.
    config: another configuration.

  Returns:
    The differing field names, sorted.

  Example:
    >>> config_differences(TrainConfig().to_json(), TrainConfig(lr=0.1))
    ['lr']
  """
  current = config.to_json()
  saved = _with_defaults(saved)
  return sorted(
    k
    for k in current
    if k not in RESUMABLE_CHANGES
    and saved.get(k) != current[k]
    and not (isinstance(current[k], tuple) and saved.get(k) == list(current[k]))
  )


def describe_differences(
  saved: dict[str, Any], config: TrainConfig, changed: list[str]
) -> str:
  """``--flag was <saved>, now <new>`` for each field in ``changed``, by ``;``.

  Example:
    >>> describe_differences(TrainConfig().to_json(), TrainConfig(lr=0.1),
    ...                      ["lr"])
    '--lr was 0.05, now 0.1'
  """
  current, saved = config.to_json(), _with_defaults(saved)
  return "; ".join(
    f"{_flag(k)} was {saved.get(k)!r}, now {current[k]!r}" for k in changed
  )


def check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
  """Checks that ``config`` may continue the run that was saved with ``saved``.

  Args:
    saved: the configuration the run recorded (``TrainConfig.to_json``,
      read back from JSON, so tuples are lists).
    config: the configuration of the run resuming it.

  Raises:
    ValueError: a field outside :data:`RESUMABLE_CHANGES` differs; the
      message names each one with the saved and the new value, and the flags
      that continue the saved run. Following it changes no file.

  Example:
    >>> check_resumable(TrainConfig().to_json(), TrainConfig(eval_every=5))
  """
  changed = config_differences(saved, config)
  if changed:
    original = ", ".join(
      _as_flag(k, _with_defaults(saved).get(k)) for k in changed
    )
    raise ValueError(
      "--resume with settings that differ from the saved run"
      f" ({describe_differences(saved, config, changed)}). To continue it,"
      f" resume with its settings ({original}); to train with the new ones,"
      " choose a new --out. Its checkpoints were not read or changed."
    )
