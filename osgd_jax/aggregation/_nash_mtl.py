"""Nash-MTL: the exits' Nash bargaining solution, norm-clipped."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from osgd_jax import gram as gram_lib
from osgd_jax.aggregation import _checks, _engine, _linalg, _registry, _stateful
from osgd_jax.aggregation._types import Granularity


def _clip_update_norm(
  gram: jax.Array, weights: jax.Array, max_norm: float | jax.Array
) -> jax.Array:
  """``weights`` scaled so that ``‖wᵀ G‖ ≤ max_norm`` (0: unchanged)."""
  # A zero row adds exactly 0 to the norm; leaving its (unbounded) weight
  # out keeps the norm's derivative finite there.
  live = jnp.where(jnp.diagonal(gram) > 0, weights, 0.0)
  norm = gram_lib.safe_sqrt(live @ (gram @ live))
  clip = (max_norm > 0) & (norm > max_norm)
  return jnp.where(
    clip, weights * max_norm * gram_lib.safe_inverse(norm), weights
  )


def _bargain(gram: jax.Array, max_iter: int) -> jax.Array:
  """The bargaining weights α on the Frobenius-normalised Gram, unclipped."""
  frobenius = gram_lib.safe_sqrt(jnp.sum(gram * gram))
  return _linalg.solve_fair_equation(
    gram * gram_lib.safe_inverse(frobenius), alpha=1.0, max_iter=max_iter
  )


def nash_mtl_weighting(
  gram: jax.Array, *, max_norm: float | jax.Array = 1.0, max_iter: int = 50
) -> jax.Array:
  """Nash-MTL: the Nash bargaining solution, ``M̄ α = 1/α``, norm-clipped.

  The tasks bargain over the update ``d = αᵀ G``; the Nash bargaining
  solution is ``⟨g_k, d⟩ = 1/α_k`` for every k, on M scaled to unit
  Frobenius norm (``M̄ = M / ‖M‖_F``, the authors' normalisation), and the
  update is scaled down to norm ``max_norm`` if longer (0: no clipping).
  The paper (and TorchJD's ``NashMTL``, through cvxpy) approaches α by a
  few concave-convex steps per update; here the equation is solved by
  FairGrad's Newton method (it is FairGrad's with α = 1), so the
  weights are the solution those steps approach.

  Args:
    gram: ``(K, K)``.
    max_norm: the largest norm of the update, ``≥ 0``; 0: unbounded.
    max_iter: the Newton steps.

  Returns:
    ``(K,)`` positive weights.

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.asarray([[0.1, 0.0], [0.0, 0.2]])
    >>> # The update gives the two exits equal gains.
    >>> [round(v, 4) for v in (nash_mtl_weighting(g @ g.T) @ g).tolist()]
    [0.2031, 0.2031]

  """
  return _clip_update_norm(gram, _bargain(gram, max_iter), max_norm)


class NashMTLState(NamedTuple):
  """Nash-MTL's weighting state.

  Attributes:
    alpha: ``(K,)`` the bargaining weights last solved for (before the norm
      clipping), reused between updates.
    count: the number of updates so far.
  """

  alpha: jax.Array
  count: jax.Array


def nash_mtl(
  num_exits: int | None = None,
  *,
  max_norm: float = 1.0,
  update_weights_every: int = 1,
  granularity: Granularity = "global",
  max_iter: int = 50,
) -> optax.GradientTransformationExtraArgs:
  """Nash-MTL: the exits' Nash bargaining solution, norm-clipped.

  ``u = αᵀ G`` with ``⟨g_k, u⟩ = 1/α_k`` on the Frobenius-normalised Gram
  matrix, clipped to norm ``max_norm``
  (:func:`osgd_jax.weightings.nash_mtl`, TorchJD's ``NashMTL`` with its
  defaults). α is solved for every ``update_weights_every`` updates and
  reused in between, as the paper does to save time; here that saves
  little, since the solve is a few K×K Newton steps under ``jax.jit``
  (TorchJD's needs cvxpy).

  Args:
    max_norm: the largest norm of the update, ``≥ 0``; 0: unbounded.
    update_weights_every: solve for α every this many updates.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.
    max_iter: the Newton steps.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`NashMTLState` per group.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.nash_mtl(num_exits=2)
    >>> g = {"w": jnp.array([[0.1, 0.0], [0.0, 0.2]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [0.2031, 0.2031]

  References:
    Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022.
    https://arxiv.org/abs/2202.01017
  """
  name = "nash_mtl"
  _checks.check_nonnegative(max_norm, "max_norm", name)
  _checks.check_positive_int(update_weights_every, "update_weights_every", name)
  _checks.check_positive_int(max_iter, "max_iter", name)

  def init(k):
    return NashMTLState(jnp.ones((k,), jnp.float32), jnp.zeros((), jnp.int32))

  def apply(gram, state: NashMTLState, **extra_args):
    del extra_args
    solve = state.count % update_weights_every == 0
    alpha = jnp.where(
      solve, _bargain(gram, max_iter), state.alpha.astype(gram.dtype)
    )
    weights = _clip_update_norm(gram, alpha, max_norm)
    return weights, NashMTLState(alpha, _stateful.next_count(state.count))

  return _engine.from_weighting(
    _engine.StatefulWeighting(init, apply),
    num_exits=num_exits,
    granularity=granularity,
    name=name,
  )


_registry.register("nash-mtl", nash_mtl, weighting=nash_mtl_weighting)
