"""AdaLoss: weights inversely proportional to running averages of the losses."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from osgd_jax.aggregation import _checks, _engine, _registry, _stateful
from osgd_jax.aggregation._types import Granularity


def _check_losses(losses: Any, k: int, owner: str) -> None:
  if jnp.shape(losses) != (k,):
    raise ValueError(
      f"{owner} got losses of shape {jnp.shape(losses)}, but the gradients"
      f" have K={k} exits; pass the ({k},) vector of per-exit losses."
    )


def adaloss_weighting(
  gram: jax.Array, *, losses: jax.Array, eps: float | jax.Array = 1e-8
) -> jax.Array:
  """AdaLoss: weights inversely proportional to the exits' (average) losses.

  ``w_k = K · (1/ℓ_k) / Σ_j (1/ℓ_j)`` with ``ℓ_k ≥ eps``. With ``ℓ`` the
  current losses, ``w_k ∝ 1/ℓ_k`` makes ``u`` the gradient of
  ``Σ_k log ℓ_k``; :func:`~osgd_jax.aggregation.adaptive_loss_balancing`
  passes a running average instead. The weights are normalised to sum to K,
  the uniform sum's total.

  Args:
    gram: ``(K, K)``; only K is read.
    losses: ``(K,)`` the (averaged) per-exit losses.
    eps: floor on each loss, so that a zero loss gives a finite weight.

  Returns:
    ``(K,)`` weights.

  Raises:
    ValueError: ``losses`` is not of shape ``(K,)``.

  Example:
    >>> import jax.numpy as jnp
    >>> adaloss_weighting(jnp.eye(2), losses=jnp.asarray([1.0, 3.0])).tolist()
    [1.5, 0.5]

  """
  k = gram.shape[-1]
  _check_losses(losses, k, "adaloss")
  inverse = 1.0 / jnp.maximum(jnp.asarray(losses, gram.dtype), eps)
  return k * inverse / inverse.sum()


class AdaLossState(NamedTuple):
  """AdaLoss's weighting state: the loss EMA and the number of updates so far.

  Attributes:
    ema: ``(K,)`` the exponential moving average of the exits' losses.
    count: the number of updates so far (the first sets ``ema`` to the
      losses).
  """

  ema: jax.Array
  count: jax.Array


def adaptive_loss_balancing(
  num_exits: int | None = None,
  *,
  decay: float = 0.9,
  eps: float = 1e-8,
  granularity: Granularity = "global",
) -> optax.GradientTransformationExtraArgs:
  """AdaLoss: weights inversely proportional to a running average of the losses.

  ``w_k = K · (1/ℓ̄_k) / Σ_j (1/ℓ̄_j)`` (:func:`osgd_jax.weightings.adaloss`),
  ``u = Σ_k w_k g_k``, where ``ℓ̄_k`` is an exponential moving average of exit
  k's loss, updated with this step's losses before the weights are formed
  (the first update sets it to the losses). This is Hu et al.'s balancing,
  whose weights ``1/ℓ̄_k`` make the update the gradient of ``Σ_k log ℓ_k``
  when ``ℓ̄ = ℓ``. Assumptions: the weights are normalised to sum to K, the
  uniform sum's total; the average is an EMA with ``decay``.

  The losses reach the transformation as an extra argument of ``update``::

    updates, state = tx.update(grads, state, params, losses=losses)

  with ``losses`` the ``(K,)`` vector the gradients are of (the first output
  of :func:`osgd_jax.value_and_per_exit_grads`). ``optax.chain`` forwards it.

  Invariance: scaling exit k's loss (hence its gradient) by ``c_k > 0``
  leaves the update's direction unchanged; its size changes by the factor
  ``Σ_j 1/ℓ̄_j / Σ_j 1/(c_j ℓ̄_j)`` of the normalisation.

  Args:
    decay: EMA decay of the losses, in [0, 1); 0 uses the current losses.
    eps: floor on ``ℓ̄_k``, so that a zero loss gives a finite weight.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``; the weights do not depend on
      the gradients, so both give the same update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is an
    :class:`AdaLossState` per group.

  Raises:
    ValueError: a bad option (at construction); ``losses`` missing or not of
      shape ``(K,)`` (at trace time).

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.adaptive_loss_balancing(num_exits=2)
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> updates, state = tx.update({"w": jnp.ones((2, 3))}, state,
    ...                            losses=jnp.array([1.0, 3.0]))
    >>> state.weights.tolist()
    [1.5, 0.5]

  References:
    Hu, Dey, Hebert & Bagnell, *Learning Anytime Predictions in Neural
    Networks via Adaptive Loss Balancing*, AAAI 2019.
    https://arxiv.org/abs/1708.06832
  """
  name = "adaptive_loss_balancing"
  _checks.check_fraction(decay, "decay", name)
  _checks.check_positive(eps, "eps", name)

  def init(k):
    return AdaLossState(jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.int32))

  def apply(gram, state: AdaLossState, *, losses=None, **extra_args):
    del extra_args
    k = gram.shape[-1]
    if losses is None:
      raise ValueError(
        f"{name} needs the per-exit losses: call"
        " tx.update(grads, state, params, losses=losses) with the (K,)"
        " losses the gradients are of."
      )
    _check_losses(losses, k, name)
    losses = jnp.asarray(losses, jnp.float32)
    ema = jnp.where(
      state.count == 0, losses, decay * state.ema + (1 - decay) * losses
    )
    weights = adaloss_weighting(gram, losses=ema.astype(gram.dtype), eps=eps)
    return weights, AdaLossState(ema, _stateful.next_count(state.count))

  return _engine.from_weighting(
    _engine.StatefulWeighting(init, apply),
    num_exits=num_exits,
    granularity=granularity,
    name=name,
    # Weights of c·M: see docs/design.md, "Range, rank and derivatives".
    gram_degree=0.0,
  )


_registry.register("adaloss", adaptive_loss_balancing)
