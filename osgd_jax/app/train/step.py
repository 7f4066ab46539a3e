"""The jitted training step: per-exit gradients, aggregation, the update.

One jitted function computes the per-exit gradients (one forward; by default
the staged Jacobian, where exit k's backward pass covers stages 1..k only;
with ``--engine gramian`` an :class:`osgd_jax.Gramian` of them, without
their K×P stack), aggregates them with OSGD or a baseline (or
differentiates the summed, weighted exit losses for ``sgd``), applies weight
decay, momentum and the learning-rate schedule, and carries the BatchNorm
statistics. There is no Python loop over exits at run time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import osgd_jax
from osgd_jax import sharding
from osgd_jax.app import data as data_lib
from osgd_jax.app.train.config import TrainConfig
from osgd_jax.app.train.optimizer import make_optimizer
from osgd_jax.losses import per_exit_cross_entropy

__all__ = ["STEP_FIELDS", "exit_weight_vector", "make_train_step"]

#: The fields that shape the compiled step; runs that agree on them (e.g. the
#: seeds of one experiment) share one compiled function.
STEP_FIELDS = (
  "optimizer",
  "granularity",
  "method",
  "rescale",
  "switch_to_sgd",
  "exit_weights",
  "lr",
  "schedule",
  "momentum",
  "weight_decay",
  "per_exit_grads",
  "engine",
)


def exit_weight_vector(config: TrainConfig, num_exits: int) -> jax.Array:
  """The ``(K,)`` loss weights of the exits: ``--exit-weights``, or all 1.

  Args:
    config: ``exit_weights``, one weight per exit, or ``None``.
    num_exits: K, the model's number of exits.

  Returns:
    A float32 vector of length K.

  Raises:
    ValueError: ``exit_weights`` does not have K values.

  Example:
    >>> exit_weight_vector(TrainConfig(exit_weights=(1.0, 2.0)), 2)
    Array([1., 2.], dtype=float32)
  """
  if config.exit_weights is None:
    return jnp.ones((num_exits,), jnp.float32)
  if len(config.exit_weights) != num_exits:
    raise ValueError(
      f"--exit-weights has {len(config.exit_weights)} values but the model"
      f" has {num_exits} exits."
    )
  return jnp.asarray(config.exit_weights, jnp.float32)


def make_train_step(
  config: TrainConfig,
  graphdef: Any,
  num_exits: int,
  total_steps: int,
  augment: bool,
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
  projection reduces only K×K Gram blocks across devices (a Gramian's Gram
  matrices are such contractions too, and it holds no stack to place).

  Args:
    config: the run's settings; only :data:`STEP_FIELDS` and ``seed`` are read.
    graphdef: the model's graph definition, from
      ``nnx.split(model, nnx.Param, ...)``.
    num_exits: K.
    total_steps: the run's number of optimizer steps (for the schedule).
    augment: apply the random crop and flip to each batch (CIFAR).
    mesh: the run's device mesh, or ``None`` for one device.

  Returns:
    ``(tx, step)``.

  Example:
    >>> from flax import nnx
    >>> from osgd_jax import zoo
    >>> model = zoo.create("branched-mlp", rngs=nnx.Rngs(0), in_features=4,
    ...                    num_classes=3, stages=2, width=4)
    >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    >>> tx, step = make_train_step(TrainConfig(), graphdef, 2, 10, False)
    >>> x, y = jnp.ones((8, 4)), jnp.zeros(8, jnp.int32)
    >>> *_, losses = step(params, rest, tx.init(params), x, y,
    ...                   jax.random.key(0))
    >>> losses.shape
    (2,)
  """
  settings = tuple(getattr(config, f) for f in STEP_FIELDS)
  step = _cached_step(settings, graphdef, num_exits, total_steps, augment, mesh)
  # The seed (PCGrad's key) only sets the optimizer's initial state, not the
  # compiled step, which runs of different seeds share.
  return make_optimizer(config, total_steps, num_exits), step


def _grad_fn(
  config: TrainConfig, graphdef: Any, weights: jax.Array
) -> Callable:
  """``(params, rest, x, y) -> ((weighted, (losses, rest)), grads)``.

  ``grads`` are stacked per exit for every optimizer but ``sgd``, whose
  gradient is of the summed weighted losses (and ``weighted`` is ``None``);
  with ``config.uses_gramian`` they are an :class:`osgd_jax.Gramian` of the
  same per-exit gradients, which the aggregator takes in their place.
  """

  def exit_losses(params, rest, x, y):
    model = nnx.merge(graphdef, params, rest, copy=True)
    losses = per_exit_cross_entropy(model(x), y)
    return losses * weights, (losses, nnx.state(model, nnx.Not(nnx.Param)))

  if config.optimizer == "sgd":

    def summed_grad(params, rest, x, y):
      def total(*a):
        return (lambda out: (out[0].sum(), out[1]))(exit_losses(*a))

      (_, aux), grads = jax.value_and_grad(total, has_aux=True)(
        params, rest, x, y
      )
      return (None, aux), grads

    return summed_grad

  if not config.per_exit_grads.startswith("staged"):
    if config.uses_gramian:
      return osgd_jax.value_and_gramian(exit_losses, has_aux=True)
    return osgd_jax.value_and_per_exit_grads(exit_losses, has_aux=True)

  def weighted_losses(logits, y):
    losses = per_exit_cross_entropy(logits, y)
    return losses * weights, losses

  rows = config.per_exit_grads.partition("-")[2] or "auto"
  staged_fn = (
    osgd_jax.staged_value_and_gramian
    if config.uses_gramian
    else osgd_jax.staged_value_and_per_exit_grads
  )
  staged = staged_fn(graphdef, weighted_losses, has_aux=True, rows=rows)

  def staged_grad(params, rest, x, y):
    (weighted, losses, rest), grads = staged(params, rest, x, y)
    return (weighted, (losses, rest)), grads

  return staged_grad


@functools.lru_cache(maxsize=16)
def _cached_step(settings, graphdef, num_exits, total_steps, augment, mesh):
  config = TrainConfig(**dict(zip(STEP_FIELDS, settings, strict=True)))
  tx = make_optimizer(config, total_steps, num_exits)
  grad_fn = _grad_fn(config, graphdef, exit_weight_vector(config, num_exits))
  gramian = config.uses_gramian

  def step(params, rest, opt_state, x, y, key):
    if augment:
      x = data_lib.augment(key, x)
    (weighted, (losses, rest)), grads = grad_fn(params, rest, x, y)
    if mesh is not None and config.optimizer != "sgd" and not gramian:
      # Row k of a stacked leaf is split like its parameter; K never is. A
      # Gramian holds no stack: its Gram matrices are K×K contractions and
      # its weighted sum comes out parameter-shaped, constrained below.
      grads = sharding.constrain(grads, mesh, stacked=True)
    # AdaLoss balances the losses the gradients are of; others ignore them.
    extra = {} if weighted is None else {"losses": weighted}
    # Named, so that profiles can tell the optimizer's kernels from the
    # network's (benchmarks/bench_step.py does).
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
      params = optax.apply_updates(params, updates)
    if mesh is not None:
      params, rest, opt_state = sharding.constrain(
        (params, rest, opt_state), mesh
      )
      # Replicated, so that every process can read the losses it logs.
      losses = jax.lax.with_sharding_constraint(
        losses, sharding.replicated(mesh)
      )
    return params, rest, opt_state, losses

  return jax.jit(step, donate_argnums=(0, 1, 2))
