"""A run's gradient pipeline, from the optimizer's name to one Optax chain.

Every optimizer but ``sgd`` first aggregates the stacked per-exit gradients
(leaves of shape ``(K, *param.shape)``) into one update-shaped gradient, with
the transformation :func:`aggregator_for` names; ``sgd`` receives the gradient
of the summed, weighted exit losses. All then add weight decay, momentum and
the scheduled learning rate.
"""

from __future__ import annotations

import optax

from osgd_jax import aggregation
from osgd_jax.app.train.config import TrainConfig

__all__ = ["aggregator_for", "make_optimizer", "make_schedule"]


def make_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
  """The learning rate over the run's steps.

  Args:
    config: ``lr`` (the peak) and ``schedule``: ``cosine`` decays to 0,
      ``step`` divides by 10 at half and three quarters of the run,
      ``constant`` keeps ``lr``.
    total_steps: the run's number of optimizer steps.

  Returns:
    An Optax schedule.

  Example:
    >>> schedule = make_schedule(TrainConfig(lr=0.1, schedule="step"), 100)
    >>> [round(float(schedule(s)), 6) for s in (0, 50, 75)]
    [0.1, 0.01, 0.001]
  """
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(config.lr, total_steps)
  if config.schedule == "step":
    return optax.piecewise_constant_schedule(
      config.lr, {int(total_steps * 0.5): 0.1, int(total_steps * 0.75): 0.1}
    )
  return optax.constant_schedule(config.lr)


def aggregator_for(
  config: TrainConfig,
  total_steps: int,
  num_exits: int,
) -> optax.GradientTransformationExtraArgs | None:
  """The transformation that turns stacked per-exit gradients into one update.

  The optimizer's name is a name of the library's registry
  (:func:`osgd_jax.aggregation.create`), with its defaults, but for what a
  run sets: ``--granularity``, ``--method`` and ``--rescale`` configure
  OSGD; ``seed`` seeds the random ones (PCGrad's orders, ...); the run's
  steps are what SDN's weights rise over. The baselines aggregate over all
  parameters (their ``granularity="global"`` default), as their papers do.

  Args:
    config: ``optimizer`` (one of ``OPTIMIZERS``), OSGD's ``granularity``,
      ``method`` and ``rescale``, and ``seed``.
    total_steps: the run's number of steps.
    num_exits: K, which fixes the state's shapes at ``init``.

  Returns:
    The transformation, or ``None`` for ``sgd``, whose summed-loss gradient
    needs no aggregation.

  Example:
    >>> aggregator_for(TrainConfig(optimizer="sgd"), 100, num_exits=4) is None
    True
  """
  name = config.optimizer
  if name == "sgd":
    return None
  if name == "osgd":
    return aggregation.create(
      name,
      num_exits=num_exits,
      granularity=config.granularity,
      method=config.method,
      rescale=config.rescale,
    )
  settings = {"seed": config.seed, "total_steps": total_steps}
  accepted = aggregation.options(name)
  return aggregation.create(
    name,
    num_exits=num_exits,
    **{key: value for key, value in settings.items() if key in accepted},
  )


def make_optimizer(
  config: TrainConfig, total_steps: int, num_exits: int
) -> optax.GradientTransformation:
  """The gradient pipeline after the (per-exit or summed) gradient.

  Args:
    config: the optimizer's name and its settings (``weight_decay``,
      ``momentum``, ``lr``, ``schedule``).
    total_steps: the run's number of optimizer steps.
    num_exits: K.

  Returns:
    ``optax.chain(aggregator, add_decayed_weights, trace, learning rate)``,
    without the aggregator for ``sgd``. With ``switch_to_sgd`` the
    aggregator gives way to the plain sum of the exit gradients after that
    fraction of ``total_steps`` (:func:`osgd_jax.aggregation.switch_to_sum`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> tx = make_optimizer(TrainConfig(), total_steps=10, num_exits=2)
    >>> params = {"w": jnp.zeros(3)}
    >>> grads = {"w": jnp.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])}  # (K, 3)
    >>> updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    >>> updates["w"].shape
    (3,)
  """
  aggregator = aggregator_for(config, total_steps, num_exits)
  if aggregator is not None and config.switch_to_sgd is not None:
    aggregator = aggregation.switch_to_sum(
      aggregator, round(config.switch_to_sgd * total_steps)
    )
  head = [] if aggregator is None else [aggregator]
  return optax.chain(
    *head,
    optax.add_decayed_weights(config.weight_decay),
    optax.trace(decay=config.momentum),
    optax.scale_by_learning_rate(make_schedule(config, total_steps)),
  )
