"""CR-MOGM: any weighting's weights, smoothed by an EMA across steps."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from osgd_jax.aggregation import _checks, _engine, _registry, _stateful
from osgd_jax.aggregation._types import Granularity, Weighting


class CRMOGMState(NamedTuple):
  """CR-MOGM's weighting state.

  Attributes:
    smoothed: ``(K,)`` the smoothed weights of the previous update.
    count: the number of updates so far (the first takes the inner weights
      as they are).
    inner: the wrapped weighting's own state (``()`` for a pure one).
  """

  smoothed: jax.Array
  count: jax.Array
  inner: Any


def crmogm(
  weighting: str | Weighting | _engine.StatefulWeighting = "upgrad",
  num_exits: int | None = None,
  *,
  alpha: float = 0.9,
  granularity: Granularity = "global",
) -> optax.GradientTransformationExtraArgs:
  """CR-MOGM: any weighting's weights, smoothed by an EMA across steps.

  ``λ_t = α λ_{t−1} + (1 − α) λ̂_t`` with ``λ̂_t`` the wrapped weighting's
  weights, and ``λ_1 = λ̂_1``; ``u = λ_tᵀ G``. The paper shows that this
  smoothing makes stochastic multi-objective gradient manipulation (MGDA,
  UPGrad and kin) converge; TorchJD's ``CRMOGMWeighting``.

  Args:
    weighting: the name of an aggregator that is a weighting of the Gram
      matrix alone (:func:`~osgd_jax.aggregation.weighting_names`:
      ``"upgrad"``, ``"mgda"``, ...), with its defaults; a function
      ``(K, K) -> (K,)``; or a
      :class:`~osgd_jax.aggregation.StatefulWeighting`.
    alpha: the EMA's weight on the previous weights, in [0, 1]; 0: no
      smoothing.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`CRMOGMState` per group.

  Raises:
    ValueError: an unknown weighting name or ``alpha`` outside [0, 1].

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.crmogm("mgda", alpha=0.5, num_exits=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> for g in ([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 3.0]]):
    ...   _, state = tx.update({"w": jnp.asarray(g)}, state)
    >>> [round(v, 4) for v in state.weights.tolist()]   # ½(½, ½) + ½(0.9, 0.1)
    [0.7, 0.3]

  References:
    Zhou, Zhang, Jiang, Chen, Wang & Xu, *On the Convergence of Stochastic
    Multi-Objective Gradient Manipulation and Beyond*, NeurIPS 2022.
    https://openreview.net/forum?id=ScwfQ7hdwyP
  """
  name = "crmogm"
  _checks.check_not_num_exits(weighting, "weighting", name, num_exits)
  _checks.check_unit_interval(alpha, "alpha", name)
  if isinstance(weighting, str):
    weighting = _registry.weighting(weighting)
  inner = (
    weighting
    if isinstance(weighting, _engine.StatefulWeighting)
    else _engine.stateless(weighting)
  )

  def init(k):
    return CRMOGMState(
      jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.int32), inner.init(k)
    )

  def apply(gram, state: CRMOGMState, **extra_args):
    fresh, inner_state = inner.apply(gram, state.inner, **extra_args)
    previous = state.smoothed.astype(gram.dtype)
    weights = jnp.where(
      state.count == 0, fresh, alpha * previous + (1.0 - alpha) * fresh
    )
    return weights, CRMOGMState(
      weights, _stateful.next_count(state.count), inner_state
    )

  return _engine.from_weighting(
    _engine.StatefulWeighting(init, apply),
    num_exits=num_exits,
    granularity=granularity,
    name=name,
  )


_registry.register("crmogm", crmogm)
