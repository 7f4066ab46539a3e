"""MoDo: weights moved one projected-gradient step towards MGDA's per update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from osgd_jax.aggregation import _checks, _engine, _linalg, _registry, _stateful
from osgd_jax.aggregation._types import Granularity


def modo_weighting(
  gram: jax.Array,
  *,
  previous: jax.Array,
  gamma: float | jax.Array = 0.1,
  rho: float | jax.Array = 0.1,
) -> jax.Array:
  """MoDo: one projected-gradient step of the weights towards MGDA's.

  Multi-objective gradient with double sampling keeps weights λ on the
  simplex and moves them, at every training step, by one step of projected
  gradient descent on ``½‖λᵀG‖² + ½ρ‖λ‖²``:
  ``λ ← Π_Δ(λ − γ (M λ + ρ λ))``. The update is ``λᵀG``. The paper forms M
  from two independent mini-batches (``J_1 J_2ᵀ``) for its guarantee; the
  stacked-gradient contract has one batch, so M is ``G Gᵀ``.

  Args:
    gram: ``(K, K)``.
    previous: ``(K,)`` the weights of the previous step (``1/K`` at first).
    gamma: the weights' step size, > 0.
    rho: the weights' ℓ2 regularisation, ≥ 0.

  Returns:
    ``(K,)`` the new weights, on the simplex.

  Example:
    >>> import jax.numpy as jnp
    >>> w = modo_weighting(
    ...     jnp.diag(jnp.asarray([1.0, 3.0])), previous=jnp.full(2, 0.5))
    >>> [round(v, 4) for v in w.tolist()]
    [0.55, 0.45]

  """
  previous = jnp.asarray(previous, gram.dtype)
  return _linalg.project_onto_simplex(
    previous - gamma * (gram @ previous + rho * previous)
  )


def modo(
  num_exits: int | None = None,
  *,
  gamma: float = 0.1,
  rho: float = 0.1,
  granularity: Granularity = "global",
) -> optax.GradientTransformationExtraArgs:
  """MoDo: weights moved one projected-gradient step towards MGDA's per update.

  ``λ ← Π_Δ(λ − γ (M λ + ρ λ))``, ``u = λᵀ G``
  (:func:`osgd_jax.weightings.modo`, TorchJD's ``MoDoWeighting``), λ kept
  in the state. The paper's M pairs two independent mini-batches; on the
  stacked-gradient contract it is the step's ``G Gᵀ``.

  Args:
    gamma: the weights' step size, ``> 0``.
    rho: their ℓ2 regularisation, ``≥ 0``.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`~osgd_jax.aggregation.SimplexState` per group.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.modo(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0 ** 0.5]])}
    >>> _, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in state.weights.tolist()]
    [0.55, 0.45]

  References:
    Chen, Fernando, Ying & Chen, *Three-Way Trade-Off in Multi-Objective
    Learning: Optimization, Generalization and Conflict-Avoidance*, JMLR 25,
    2024. https://arxiv.org/abs/2305.20057
  """
  name = "modo"
  _checks.check_positive(gamma, "gamma", name)
  _checks.check_nonnegative(rho, "rho", name)

  def step(gram, previous):
    weights = modo_weighting(gram, previous=previous, gamma=gamma, rho=rho)
    return weights, weights

  return _engine.from_weighting(
    _stateful.simplex_iteration(step),
    num_exits=num_exits,
    granularity=granularity,
    name=name,
  )


_registry.register("modo", modo)
