"""Functional training glue: per-exit losses of a split zoo model.

:func:`osgd_jax.value_and_per_exit_grads` differentiates a pure function of
a parameter pytree. An NNX model is split into its graph definition, its
parameters and the rest of its state (BatchNorm running statistics); the loss
function merges them, runs the model and returns the per-exit losses with
the updated rest of the state as auxiliary output::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = zoo.per_exit_loss_fn(graphdef)
    (losses, rest), grads = osgd_jax.value_and_per_exit_grads(
        loss_fn, has_aux=True)(params, rest, x, labels)
    # grads: every leaf (K, *param.shape); rest: the new batch statistics
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from osgd_jax.losses import per_exit_cross_entropy

__all__ = ["per_exit_loss_fn"]


def per_exit_loss_fn(
  graphdef: Any,
  *,
  upto: int | None = None,
  weights: Any | None = None,
  loss: Callable[..., jax.Array] = per_exit_cross_entropy,
) -> Callable[..., tuple[jax.Array, Any]]:
  """Builds ``loss_fn(params, rest, x, labels) -> (losses, new_rest)``.

  Args:
    graphdef: the graph definition from
      ``nnx.split(model, nnx.Param, ...)``.
    upto: compute only exits 1..upto (``None``: all K).
    weights: optional per-exit loss weights, passed to ``loss``.
    loss: ``loss(logits, labels, weights) -> (K,)``; defaults to
      :func:`osgd_jax.losses.per_exit_cross_entropy`.

  Returns:
    A pure function of ``(params, rest, x, labels)`` returning the ``(K,)``
    per-exit losses and the model's non-parameter state after the forward
    pass (in BatchNorm train mode, the updated running statistics). Use it
    with ``osgd_jax.value_and_per_exit_grads(loss_fn, has_aux=True)``, or
    with ``jax.value_and_grad`` after summing the losses.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import osgd_jax
    >>> from osgd_jax import zoo
    >>> model = zoo.create("nested-width-mlp", rngs=nnx.Rngs(0), width=4,
    ...                    stages=2)
    >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    >>> step = jax.jit(osgd_jax.value_and_per_exit_grads(
    ...     zoo.per_exit_loss_fn(graphdef), has_aux=True))
    >>> (losses, rest), grads = step(
    ...     params, rest, jnp.ones((8, 64)), jnp.zeros(8, jnp.int32))
    >>> nnx.update(model, rest)  # keep the new batch statistics
    >>> losses.shape
    (2,)
  """

  def loss_fn(
    params: Any, rest: Any, x: jax.Array, labels: jax.Array
  ) -> tuple[jax.Array, Any]:
    # Fresh Variables: the caller's state is never mutated, and BatchNorm can
    # write its statistics inside the VJP's trace.
    model = nnx.merge(graphdef, params, rest, copy=True)
    losses = loss(model(x, upto=upto), labels, weights)
    return losses, nnx.state(model, nnx.Not(nnx.Param))

  return loss_fn
