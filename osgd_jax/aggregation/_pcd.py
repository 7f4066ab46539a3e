"""PCD: follow the primary (first) exit, guaranteeing progress to the others."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from osgd_jax import gram as gram_lib
from osgd_jax.aggregation import _checks, _engine, _qp, _registry, _stateful
from osgd_jax.aggregation._types import Granularity


def pcd_weighting(
  gram: jax.Array,
  *,
  scales: jax.Array | None = None,
  tau: float | Sequence[float] | jax.Array = 0.02,
  max_iter: int = 100,
  tol: float | jax.Array = _qp.DEFAULT_TOL,
) -> jax.Array:
  """PCD: follow the primary (first) exit, guaranteeing progress to the others.

  Priority-constrained descent treats exit 1 as the primary objective and
  the others as secondary. With the gradients normalised, ``g̃_i = s_i g_i``,
  it solves ``min_d ½‖d − g̃_1‖²`` subject to ``⟨g̃_j, d⟩ ≥ τ_j ‖g̃_j‖²`` for
  j ≥ 2: each secondary exit gets at least the fraction τ of the progress a
  step along its own normalised gradient would give. The dual is the
  non-negative QP ``min_{μ ≥ 0} ½ μᵀ M̃_ss μ − μᵀ(τ ∘ diag M̃_ss − M̃_s1)`` on
  the normalised Gram M̃, solved exactly by an active-set method, and
  ``d̃ = g̃_1 + Σ_j μ_j g̃_j``; the update is d̃ rescaled to ``‖g_1‖``. It is
  ``g_1`` when the constraints cannot hold together (μ's constraints left
  violated), and 0 when ``g_1`` is 0 or d̃ is 0 to rounding. TorchJD's
  ``PCD``, whose scales come from an EMA of the squared norms
  (:func:`pcd` keeps it).

  Args:
    gram: ``(K, K)``; row and column 1 are the primary exit's.
    scales: ``(K,)`` the normalising factors ``s_i``; ``None``: ``1/‖g_i‖``.
    tau: the guaranteed fraction, in [0, 1]: one number, or K−1.
    max_iter: cap on the active-set iterations.
    tol: relative tolerance of the optimality test.

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [-1.0, 1.0]])
    >>> [round(v, 4) for v in (pcd_weighting(g @ g.T, tau=0.0) @ g).tolist()]
    [0.7071, 0.7071]

  """
  k = gram.shape[-1]
  dtype = gram.dtype
  first = jax.nn.one_hot(0, k, dtype=dtype)
  if k == 1:
    return jnp.ones((1,), dtype)
  sq_norms = jnp.diagonal(gram)
  if scales is None:
    scales = gram_lib.safe_inverse(gram_lib.safe_sqrt(sq_norms))
  scales = jnp.asarray(scales, dtype)
  taus = jnp.broadcast_to(jnp.asarray(tau, dtype).reshape(-1), (k - 1,))
  normal = gram * scales[:, None] * scales[None, :]
  sec = normal[1:, 1:]
  b = taus * jnp.diagonal(sec) - normal[1:, 0]
  mu = _qp.solve_nonnegative_qp(
    sec, -b, jnp.diagonal(sec) > 0, max_iter=max_iter, tol=tol
  )
  # The dual is unbounded when the constraints cannot hold together; the
  # solver then stops at a point whose constraints are violated.
  scale = jnp.max(jnp.diagonal(normal))
  feasible = jnp.all(sec @ mu - b >= -1e-6 * scale)
  w = jnp.where(feasible, jnp.concatenate([jnp.ones((1,), dtype), mu]), first)
  direction_sq = w @ (normal @ w)
  magnitude = (jnp.abs(w) @ gram_lib.safe_sqrt(jnp.diagonal(normal))) ** 2
  kept = (sq_norms[0] > 0) & (
    direction_sq > 10.0 * jnp.finfo(dtype).eps * magnitude
  )
  rescale = gram_lib.safe_sqrt(
    sq_norms[0] * gram_lib.safe_inverse(direction_sq)
  )
  return jnp.where(kept, w * scales * rescale, 0.0)


class PCDState(NamedTuple):
  """PCD's weighting state.

  Attributes:
    sq_norm_ema: ``(K,)`` the EMA of the exits' squared gradient norms.
    count: the number of updates so far (for the EMA's bias correction).
  """

  sq_norm_ema: jax.Array
  count: jax.Array


def pcd(
  num_exits: int | None = None,
  *,
  tau: float | Sequence[float] = 0.02,
  beta: float = 0.999,
  eps: float = 1e-8,
  granularity: Granularity = "global",
  max_iter: int = 100,
  tol: float = _qp.DEFAULT_TOL,
) -> optax.GradientTransformationExtraArgs:
  """PCD: follow exit 1's gradient, guaranteeing each other exit some progress.

  Exit 1 (the first row; reorder the exits to choose another) is the
  primary objective: the update is the closest direction to its normalised
  gradient that gives every other exit at least the fraction ``tau`` of the
  progress of a step along its own normalised gradient, rescaled to
  ``‖g_1‖`` (:func:`osgd_jax.weightings.pcd`, TorchJD's ``PCD``). Each
  gradient is normalised by ``1/√(v̂_i + eps)``, v̂ the bias-corrected EMA
  (decay ``beta``) of its squared norm, kept in the state. For anytime
  networks, a natural choice is the exit that must be best (the last:
  reverse the exits) or the one served most.

  Args:
    tau: the guaranteed fraction, in [0, 1]: one number or K−1.
    beta: the EMA's decay, in [0, 1).
    eps: added to the EMA before its inverse square root, ``≥ 0``.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``.
    max_iter: cap on the active-set iterations.
    tol: relative tolerance of the optimality test.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`PCDState` per group.

  Example:
    >>> import jax, jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.pcd(tau=0.0, num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> updates, _ = jax.jit(tx.update)(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]   # g_1's size, ⟂ g_2
    [0.7071, 0.7071]

  References:
    Varam et al., *Not All Objectives Are Born Equal: Priority-Constrained
    Descent for Hierarchical Multi-Objective Optimization*, TMLR 2026.
    https://openreview.net/forum?id=HT01yGHLEt
  """
  name = "pcd"
  num_exits = _checks.check_num_exits(num_exits, name)
  if not isinstance(tau, jax.Array):
    taus = np.asarray(tau, np.float64).reshape(-1)
    if taus.shape not in ((1,), (num_exits - 1,)) or not np.all(
      (taus >= 0) & (taus <= 1)
    ):
      raise ValueError(
        f"{name}: tau must be one number or {num_exits - 1} (one per"
        f" secondary exit), each in [0, 1]; got {tau!r}."
      )
  _checks.check_fraction(beta, "beta", name)
  _checks.check_nonnegative(eps, "eps", name)
  _checks.check_qp_options(max_iter, tol, name)

  def init(k):
    return PCDState(jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.int32))

  def apply(gram, state: PCDState, **extra_args):
    del extra_args
    sq_norms = jnp.maximum(jnp.diagonal(gram), 0.0)
    count = _stateful.next_count(state.count)
    ema = beta * state.sq_norm_ema.astype(gram.dtype) + (1 - beta) * sq_norms
    debiased = ema / (1 - jnp.asarray(beta, gram.dtype) ** count)
    scales = gram_lib.safe_inverse(gram_lib.safe_sqrt(debiased + eps))
    weights = pcd_weighting(
      gram, scales=scales, tau=tau, max_iter=max_iter, tol=tol
    )
    # A non-finite gradient leaves the EMA as it was (and the update NaN).
    finite = jnp.all(jnp.isfinite(gram))
    return weights, PCDState(
      jnp.where(finite, ema, state.sq_norm_ema.astype(gram.dtype)),
      jnp.where(finite, count, state.count),
    )

  return _engine.from_weighting(
    _engine.StatefulWeighting(init, apply),
    num_exits=num_exits,
    granularity=granularity,
    name=name,
  )


_registry.register("pcd", pcd, weighting=pcd_weighting)
