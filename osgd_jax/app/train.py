"""Training loop for anytime networks: OSGD, the baselines, or summed-loss SGD.

One jitted step computes the per-exit gradients (one forward; by default the
staged Jacobian, where exit k's backward pass covers stages 1..k only),
aggregates them with OSGD or a baseline aggregator (or sums the weighted exit
losses for ``sgd``), applies weight decay, momentum and the learning-rate
schedule, and carries the BatchNorm statistics. There is no Python loop over
exits at run time.

The data order of epoch e is fixed by ``(seed, e)`` and the augmentation key
of step s by ``(seed, e, s)``, so a run resumed from the checkpoint of epoch
e reproduces the uninterrupted run's metrics exactly.

Run it as ``osgd-train`` or ``python -m osgd_jax.app.train`` (see
:mod:`osgd_jax.app.cli`), or call :func:`train` with a :class:`TrainConfig`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from osgd_jax import aggregators, anytime, sharding, zoo
from osgd_jax.app import data as data_lib
from osgd_jax.app.checkpoint import CheckpointStore
from osgd_jax.grads import (staged_value_and_per_exit_grads,
                            value_and_per_exit_grads)
from osgd_jax.losses import per_exit_cross_entropy
from osgd_jax.transform import osgd

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train",
           "OPTIMIZERS", "PER_EXIT_GRADS", "SCHEDULES"]

# "sgd" differentiates the summed loss; every other name aggregates the
# stacked per-exit gradients with the transformation of the same name.
OPTIMIZERS = ("osgd", "sgd", "sgd-linear", "sgd-geometric", "sgd-sdn",
              "adaloss", "pcgrad", "mgda", "upgrad")
SCHEDULES = ("cosine", "step", "constant")
# How the per-exit gradients are computed: "staged" runs exit k's backward
# pass through stages 1..k only, its rows looped on CPU and batched on
# accelerators ("staged-looped" / "staged-batched" force one); "vmap" (the
# fallback) runs K full backward passes.
PER_EXIT_GRADS = ("staged", "staged-looped", "staged-batched", "vmap")


class TrainingDiverged(RuntimeError):
  """A loss became NaN or Inf; the last good checkpoint was kept."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a training run; fields mirror the CLI flags.

  The default is the library's main job: a nested network on scikit-learn's
  digits, trained with OSGD in a few minutes on two CPU cores.
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
    return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainResult:
  """What a finished run produced.

  Attributes:
    history: one dict per completed epoch (as written to ``metrics.json``).
    test_accuracy: ``(K,)`` final test accuracy per exit.
    test_loss: ``(K,)`` final test loss per exit.
    flops: ``(K,)`` FLOPs of one example up to each exit, and its source.
    params: ``(K,)`` parameters on each exit's path.
    out: the output directory.
    model: the trained model, in eval mode.
  """

  history: list[dict[str, Any]]
  test_accuracy: np.ndarray
  test_loss: np.ndarray
  flops: anytime.ExitFlops
  params: np.ndarray
  out: str
  model: Any


def _preset_for(config: TrainConfig) -> str:
  if config.preset is not None:
    return config.preset
  return "cifar" if config.dataset.startswith("cifar") else "digits"


def _is_conv(model_name: str) -> bool:
  return "in_channels" in zoo.config_keys(model_name)


def load_data(config: TrainConfig) -> data_lib.Dataset:
  """Loads the run's dataset, shaped for the model's backbone."""
  if config.dataset == "synthetic":
    # Digits-sized, so the digits presets fit it.
    shape = (8, 8, 1) if _is_conv(config.model) else (64,)
    return data_lib.load_dataset("synthetic", shape=shape, difficulty=0.5)
  return data_lib.load_dataset(config.dataset, data_dir=config.data_dir)


def build_model(config: TrainConfig, dataset: data_lib.Dataset) -> Any:
  """Creates the zoo model for the dataset's input shape and classes."""
  shape = dataset.input_shape
  fit = {"num_classes": dataset.num_classes}
  if _is_conv(config.model):
    if len(shape) != 3:
      raise ValueError(
          f"{config.model} takes images, but {dataset.name} has inputs of"
          f" shape {shape}; pick an -mlp model.")
    fit["in_channels"] = shape[-1]
  else:
    fit["in_features"] = int(np.prod(shape))
  return zoo.create(config.model, rngs=nnx.Rngs(config.seed),
                    preset=_preset_for(config), **fit)


def make_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(config.lr, total_steps)
  if config.schedule == "step":
    return optax.piecewise_constant_schedule(
        config.lr, {int(total_steps * 0.5): 0.1, int(total_steps * 0.75): 0.1})
  return optax.constant_schedule(config.lr)


def _aggregator(config: TrainConfig, total_steps: int,
                num_exits: int) -> optax.GradientTransformationExtraArgs | None:
  """The transformation that turns stacked per-exit gradients into one update.

  ``--granularity`` and ``--method`` configure OSGD; the baselines aggregate
  over all parameters (``granularity="global"``), as their papers do.
  """
  name = config.optimizer
  if name == "osgd":
    return osgd(granularity=config.granularity, method=config.method,
                num_exits=num_exits)
  if name.startswith("sgd-"):
    return aggregators.weighted_sum(name[len("sgd-"):], total_steps=total_steps,
                                    num_exits=num_exits)
  if name == "adaloss":
    return aggregators.adaptive_loss_balancing(num_exits=num_exits)
  if name == "pcgrad":
    return aggregators.pcgrad(seed=config.seed, num_exits=num_exits)
  if name == "mgda":
    return aggregators.mgda(num_exits=num_exits)
  if name == "upgrad":
    return aggregators.upgrad(num_exits=num_exits)
  return None  # sgd: the gradient of the summed loss needs no aggregation


def make_optimizer(config: TrainConfig, total_steps: int,
                   num_exits: int) -> optax.GradientTransformation:
  """The gradient pipeline after the (per-exit or summed) gradient.

  Every optimizer but ``sgd`` aggregates the stacked per-exit gradients
  first (OSGD's projection, a weighted sum, PCGrad, MGDA, UPGrad...); ``sgd``
  receives the gradient of the summed, weighted exit losses. All then add
  weight decay, momentum and the scheduled learning rate.
  """
  aggregator = _aggregator(config, total_steps, num_exits)
  head = [] if aggregator is None else [aggregator]
  return optax.chain(
      *head,
      optax.add_decayed_weights(config.weight_decay),
      optax.trace(decay=config.momentum),
      optax.scale_by_learning_rate(make_schedule(config, total_steps)),
  )


def _exit_weights(config: TrainConfig, num_exits: int) -> jax.Array:
  if config.exit_weights is None:
    return jnp.ones((num_exits,), jnp.float32)
  if len(config.exit_weights) != num_exits:
    raise ValueError(
        f"--exit-weights has {len(config.exit_weights)} values but the model"
        f" has {num_exits} exits.")
  return jnp.asarray(config.exit_weights, jnp.float32)


# The fields that shape the compiled step; runs that agree on them (e.g. the
# seeds of one experiment) share one compiled function.
_STEP_FIELDS = ("optimizer", "granularity", "method", "exit_weights", "lr",
                "schedule", "momentum", "weight_decay", "per_exit_grads")


def make_train_step(config: TrainConfig, graphdef: Any, num_exits: int,
                    total_steps: int, augment: bool,
                    mesh: jax.sharding.Mesh | None = None,
                    ) -> tuple[optax.GradientTransformation, Callable]:
  """Builds the optimizer and the jitted step for a run.

  The step maps ``(params, rest, opt_state, x, y, key)`` to the new
  ``(params, rest, opt_state)`` and the ``(K,)`` unweighted exit losses of
  the batch; its first three arguments are donated.

  With a ``mesh``, the step expects its state placed by
  :func:`osgd_jax.sharding.shard_params` and the batch by
  :func:`osgd_jax.sharding.shard_batch`; it keeps the stacked per-exit
  gradients and every output on the same parameter rule, so OSGD's
  projection reduces only K×K Gram blocks across devices.

  Returns:
    ``(tx, step)``.
  """
  settings = tuple(getattr(config, f) for f in _STEP_FIELDS)
  _, step = _build_step(settings, graphdef, num_exits, total_steps, augment,
                        mesh)
  # The seed (PCGrad's key) only sets the optimizer's initial state, not the
  # compiled step, which runs of different seeds share.
  return make_optimizer(config, total_steps, num_exits), step


@functools.lru_cache(maxsize=16)
def _build_step(settings, graphdef, num_exits, total_steps, augment, mesh):
  config = TrainConfig(**dict(zip(_STEP_FIELDS, settings)))
  tx = make_optimizer(config, total_steps, num_exits)
  weights = _exit_weights(config, num_exits)

  def exit_losses(params, rest, x, y):
    model = nnx.merge(graphdef, params, rest, copy=True)
    losses = per_exit_cross_entropy(model(x), y)
    return losses * weights, (losses, nnx.state(model, nnx.Not(nnx.Param)))

  if config.optimizer != "sgd" and config.per_exit_grads.startswith("staged"):
    def weighted_losses(logits, y):
      losses = per_exit_cross_entropy(logits, y)
      return losses * weights, losses

    rows = config.per_exit_grads.partition("-")[2] or "auto"
    staged = staged_value_and_per_exit_grads(graphdef, weighted_losses,
                                             has_aux=True, rows=rows)

    def grad_fn(params, rest, x, y):
      (weighted, losses, rest), grads = staged(params, rest, x, y)
      return (weighted, (losses, rest)), grads
  elif config.optimizer != "sgd":
    grad_fn = value_and_per_exit_grads(exit_losses, has_aux=True)
  else:
    def grad_fn(params, rest, x, y):
      total = lambda *a: (lambda out: (out[0].sum(), out[1]))(exit_losses(*a))
      (_, aux), grads = jax.value_and_grad(total, has_aux=True)(
          params, rest, x, y)
      return (None, aux), grads

  def step(params, rest, opt_state, x, y, key):
    if augment:
      x = data_lib.augment(key, x)
    (weighted, (losses, rest)), grads = grad_fn(params, rest, x, y)
    if mesh is not None and config.optimizer != "sgd":
      # Row k of a stacked leaf is split like its parameter; K never is.
      grads = sharding.constrain(grads, mesh, stacked=True)
    # AdaLoss balances the losses the gradients are of; others ignore them.
    extra = {} if weighted is None else {"losses": weighted}
    # Named, so that profiles can tell the optimizer's kernels from the
    # network's (benchmarks/bench_step.py does).
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
      params = optax.apply_updates(params, updates)
    if mesh is not None:
      params, rest, opt_state = sharding.constrain((params, rest, opt_state),
                                                   mesh)
      # Replicated, so that every process can read the losses it logs.
      losses = jax.lax.with_sharding_constraint(losses, sharding.replicated(mesh))
    return params, rest, opt_state, losses

  return tx, jax.jit(step, donate_argnums=(0, 1, 2))


# Fields that may change between a run and its resumption. per_exit_grads
# changes how the same gradients are computed (equal up to rounding), and
# checkpoints from before the field existed do not record it.
_RESUMABLE_CHANGES = ("epochs", "out", "resume", "eval_every", "progress",
                      "keep_checkpoints", "data_dir", "per_exit_grads", "mesh")


def default_output_dir(config: TrainConfig) -> str:
  """A fresh directory per run, so that repeating a command never collides."""
  if config.resume:
    raise ValueError("--resume needs the --out directory of the run to"
                     " continue.")
  stamp = time.strftime("%Y%m%d-%H%M%S")
  return os.path.join("runs", f"{config.model}-{config.dataset}-"
                      f"{config.optimizer}-seed{config.seed}-{stamp}")


def prepare_output_dir(out: str) -> str:
  """Creates ``out`` and checks that it is writable, or raises a ValueError."""
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
        " directory.") from None
  return out


def _check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
  current = config.to_json()
  changed = sorted(
      k for k in current
      if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k]
      and not (isinstance(current[k], tuple) and saved.get(k) == list(current[k])))
  if changed:
    details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
    raise ValueError(
        f"--resume with a different configuration ({details}); use the"
        " original settings or a new --out.")


def _progress_bar(config: TrainConfig, epoch: int, steps: int):
  from tqdm.auto import tqdm
  return tqdm(total=steps, desc=f"epoch {epoch}/{config.epochs}",
              disable=not config.progress or jax.process_index() != 0,
              leave=False, dynamic_ncols=True)


def _make_mesh(config: TrainConfig) -> jax.sharding.Mesh | None:
  """The run's device mesh, or ``None`` for a single-device run."""
  if config.mesh is None:
    return None
  mesh = sharding.make_mesh(config.mesh)
  data_size = mesh.shape[sharding.DATA_AXIS]
  if config.batch_size % data_size or config.batch_size % jax.process_count():
    raise ValueError(
        f"--batch-size {config.batch_size} does not divide over the"
        f" {data_size} devices of the data axis of --mesh {config.mesh}"
        f" ({jax.process_count()} processes); use a multiple of"
        f" {np.lcm(data_size, jax.process_count())}.")
  return mesh


def train(config: TrainConfig) -> TrainResult:
  """Trains ``config.model`` and writes metrics, checkpoints and a figure.

  Args:
    config: the run's settings.

  Returns:
    A :class:`TrainResult`.

  Raises:
    ValueError: a bad setting, missing data, an unwritable ``out``, or a
      checkpoint that cannot be resumed; the message says what to do.
    TrainingDiverged: a loss became NaN or Inf. Checkpoints of earlier
      epochs are kept.

  Example:
    >>> result = train(TrainConfig(epochs=1, out="/tmp/osgd-run"))  # doctest: +SKIP
    >>> result.test_accuracy.shape                                  # doctest: +SKIP
    (4,)
  """
  config.validate()
  processes, process = jax.process_count(), jax.process_index()
  if processes > 1 and config.out is None:
    raise ValueError(
        f"this is one of {processes} processes: pass --out, a directory on a"
        " file system that every process can write, so that all of them"
        " write one run.")
  mesh = _make_mesh(config)
  out = prepare_output_dir(default_output_dir(config) if config.out is None
                           else config.out)
  dataset = load_data(config)
  model = build_model(config, dataset)
  num_exits = model.num_exits
  steps_per_epoch = data_lib.num_batches(dataset.num_train, config.batch_size)
  if steps_per_epoch == 0:
    raise ValueError(
        f"--batch-size {config.batch_size} exceeds the {dataset.num_train}"
        " training examples; use a smaller batch.")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  augment = dataset.name.startswith("cifar")
  tx, step_fn = make_train_step(config, graphdef, num_exits,
                                steps_per_epoch * config.epochs, augment, mesh)
  if mesh is not None:
    params, rest = sharding.shard_params((params, rest), mesh)
  opt_state = tx.init(params)
  if mesh is not None:
    # The parameter rule depends only on shapes, so a momentum buffer lands
    # on its parameter's devices.
    opt_state = sharding.shard_params(opt_state, mesh)
  # Host copies for evaluation and the final model: every process holds them
  # whole, however the training state is spread.
  host_model = lambda: nnx.merge(graphdef, *(
      sharding.to_host((params, rest)) if mesh is not None else (params, rest)))

  store = CheckpointStore(os.path.join(out, "checkpoints"),
                          keep=config.keep_checkpoints)
  history: list[dict[str, Any]] = []
  if config.resume:
    (params, rest, opt_state), meta = store.restore_latest(
        (params, rest, opt_state))
    _check_resumable(meta["config"], config)
    history = list(meta["history"])
  elif store.latest_epoch() is not None:
    raise ValueError(
        f"{out} already holds checkpoints; pass --resume to continue that"
        " run, or choose a new --out.")
  start_epoch = len(history)

  base_key = jax.random.key(config.seed)
  step_times: list[float] = []

  for epoch in range(start_epoch, config.epochs):
    loss_sum = np.zeros(num_exits)
    bar = _progress_bar(config, epoch + 1, steps_per_epoch)
    batches = data_lib.iterate_batches(
        dataset.x_train, dataset.y_train, config.batch_size,
        seed=config.seed, epoch=epoch, process_index=process,
        process_count=processes)
    for step, (x, y) in enumerate(batches):
      key = data_lib.augment_key(base_key, epoch, step)
      if mesh is not None:
        x, y = sharding.shard_batch((x, y), mesh)
        key = sharding.shard_params(key, mesh)  # replicated
      start = time.perf_counter()
      params, rest, opt_state, losses = step_fn(
          params, rest, opt_state, x, y, key)
      losses = np.asarray(losses)  # syncs: an honest step time
      step_times.append(time.perf_counter() - start)
      if not np.all(np.isfinite(losses)):
        bar.close()
        last = store.latest_epoch()
        kept = (f"the last good checkpoint (epoch {last}) is kept in"
                f" {store.directory}" if last is not None
                else "no checkpoint was written yet")
        raise TrainingDiverged(
            f"non-finite loss at epoch {epoch + 1}, step {step + 1}: exit"
            f" losses {losses.tolist()}; {kept}. Lower --lr or check the"
            " data.")
      loss_sum += losses
      bar.set_postfix_str(
          " ".join(f"l{k + 1}={v:.3f}" for k, v in enumerate(losses))
          + f" {config.batch_size / step_times[-1]:.0f} ex/s")
      bar.update()
    bar.close()

    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": (loss_sum / steps_per_epoch).tolist(),
        # The process's first step includes compilation; leave it out.
        "step_time_s": float(np.median(step_times[1:] or step_times)),
    }
    if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
      metrics = anytime.evaluate(host_model(), dataset.x_test, dataset.y_test)
      record["test_loss"] = metrics.loss.tolist()
      record["test_accuracy"] = metrics.accuracy.tolist()
    history.append(record)
    if config.progress and process == 0:
      tested = (" test acc " + " ".join(
          f"{100 * a:.1f}" for a in record["test_accuracy"])
                if "test_accuracy" in record else "")
      print(f"epoch {epoch + 1}/{config.epochs}: train loss "
            + " ".join(f"{v:.3f}" for v in record["train_loss"]) + tested,
            flush=True)
    store.save(epoch + 1, (params, rest, opt_state),
               {"config": config.to_json(), "history": history})
    if process == 0:
      _write_metrics(out, config, history)
  store.close()

  model = host_model()
  model.eval()
  final = history[-1]
  flops = anytime.flops_per_exit(model, (1,) + dataset.input_shape)
  param_counts = anytime.params_per_exit(model)
  accuracy = np.asarray(final["test_accuracy"])
  summary = {"test_accuracy": accuracy, "test_loss": final["test_loss"],
             "flops": flops.flops, "flops_source": flops.source,
             "params": param_counts}
  from osgd_jax.app.report import plot_accuracy_vs_flops
  thresholds = np.linspace(0.0, 1.0, 21)
  sweep_flops, sweep_accuracy = anytime.early_exit_curve(
      model, dataset.x_test, dataset.y_test, thresholds, flops=flops.flops)
  summary["early_exit"] = {"threshold": thresholds, "mean_flops": sweep_flops,
                           "accuracy": sweep_accuracy}
  if process != 0:  # process 0 writes the run's files
    return TrainResult(history, accuracy, np.asarray(final["test_loss"]),
                       flops, param_counts, out, model)
  _write_metrics(out, config, history, summary)
  plot_accuracy_vs_flops(
      {f"{config.optimizer}: exit k": (flops.flops, accuracy),
       f"{config.optimizer}: early exit by confidence": (sweep_flops, sweep_accuracy)},
      os.path.join(out, "accuracy_vs_flops.png"),
      title=f"{config.model} on {config.dataset}")
  return TrainResult(history, accuracy, np.asarray(final["test_loss"]),
                     flops, param_counts, out, model)


def _write_metrics(out: str, config: TrainConfig, history, summary=None) -> None:
  from osgd_jax.app.report import write_json
  payload = {"config": config.to_json(), "epochs": history}
  if summary is not None:
    payload["final"] = summary
  write_json(os.path.join(out, "metrics.json"), payload)


if __name__ == "__main__":
  from osgd_jax.app.cli import main
  raise SystemExit(main())
