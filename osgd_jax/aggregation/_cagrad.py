"""CAGrad: the best worst-case improvement within a ball around the mean."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from osgd_jax import gram as gram_lib
from osgd_jax.aggregation import _checks, _engine, _qp, _registry
from osgd_jax.aggregation._types import Granularity


def _inner(
  t: jax.Array,
  m: jax.Array,
  b: jax.Array,
  g0_sq: jax.Array,
  radius: jax.Array,
  tol: jax.Array,
  max_iter: int,
) -> tuple[jax.Array, jax.Array]:
  """The simplex QP at fixed t: its weights w and ``‖g_w‖²``."""
  # min over the simplex of ½ wᵀ m w + a bᵀw, a = t / radius, made
  # homogeneous: on 1ᵀw = 1, bᵀw = (bᵀw)(1ᵀw) and κ = κ (1ᵀw)²; κ = 2a²‖g_0‖²
  # makes the form positive definite there (⟨b, w⟩ ≤ ‖g_0‖ ‖g_w‖).
  k = m.shape[-1]
  a = t * gram_lib.safe_inverse(radius)
  ones = jnp.ones((k, k), m.dtype)
  q = m + a * (b[:, None] + b[None, :]) + 2.0 * a * a * g0_sq * ones
  w = _qp.min_norm_point(q, max_iter=max_iter, tol=tol)
  return w, w @ (m @ w)


def _stationarity(
  log_t: jax.Array,
  m: jax.Array,
  b: jax.Array,
  g0_sq: jax.Array,
  radius: jax.Array,
  tol: jax.Array,
  max_iter: int,
) -> jax.Array:
  """``‖g_w(t)‖² − t²``, whose root is the optimal t."""
  t = jnp.exp(log_t)
  _, q = _inner(t, m, b, g0_sq, radius, tol, max_iter)
  return q - t * t


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6))
def _optimal_log_t(
  m: jax.Array,
  b: jax.Array,
  g0_sq: jax.Array,
  radius: jax.Array,
  tol: jax.Array,
  bisections: int,
  max_iter: int,
) -> jax.Array:
  """``log t`` of the optimal t, by bisection within 1e-8 of its largest."""
  t_hi = jnp.sqrt(jnp.max(jnp.diagonal(m)))
  log_hi = jnp.log(jnp.where(t_hi > 0, t_hi, 1.0))

  def bisect(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    t = jnp.exp(mid)
    _, q = _inner(t, m, b, g0_sq, radius, tol, max_iter)
    # F's envelope in t decreases while ‖g_w(t)‖ > t.
    return jnp.where(q > t * t, mid, lo), jnp.where(q > t * t, hi, mid)

  lo, hi = jax.lax.fori_loop(
    0,
    bisections,
    bisect,
    (log_hi + jnp.log(jnp.asarray(1e-8, m.dtype)), log_hi),
  )
  return 0.5 * (lo + hi)


@_optimal_log_t.defjvp
def _optimal_log_t_jvp(bisections, max_iter, primals, tangents):
  # The optimal t is a root of the stationarity φ(t, params) = 0: its
  # derivative is the implicit one, −(∂φ/∂params · d) / (∂φ/∂log t), and
  # the bisection's steps have none (docs/design.md, "Range, rank and
  # derivatives"). The tolerance carries no derivative.
  log_t = _optimal_log_t(*primals, bisections, max_iter)
  m, b, g0_sq, radius, tol = primals

  def of_params(m, b, g0_sq, radius):
    return _stationarity(log_t, m, b, g0_sq, radius, tol, max_iter)

  def of_log_t(x):
    return _stationarity(x, m, b, g0_sq, radius, tol, max_iter)

  _, d_phi = jax.jvp(of_params, primals[:4], tangents[:4])
  _, slope = jax.jvp(of_log_t, (log_t,), (jnp.ones_like(log_t),))
  return log_t, -d_phi / slope


def cagrad_weighting(
  gram: jax.Array,
  *,
  c: float | jax.Array = 0.4,
  norm_eps: float | jax.Array = 1e-4,
  bisections: int = 40,
  max_iter: int = 100,
  tol: float | jax.Array = _qp.DEFAULT_TOL,
) -> jax.Array:
  """CAGrad: the best worst-case improvement in a ball around the mean.

  Conflict-averse gradient descent looks for the direction d, within
  ``‖d − g_0‖ ≤ c ‖g_0‖`` of the mean gradient ``g_0``, that maximises the
  smallest improvement ``min_k ⟨g_k, d⟩``. By duality
  ``d = g_0 + c ‖g_0‖ g_w / ‖g_w‖`` with ``g_w = wᵀ G`` and ``w`` minimising
  ``F(w) = ⟨g_w, g_0⟩ + c ‖g_0‖ ‖g_w‖`` over the simplex (the paper's
  Algorithm 1, without its optional rescaling; TorchJD's ``CAGrad``).

  F is convex but not smooth; it is minimised exactly under ``jax.jit``
  without a general convex solver. With ``‖g_w‖ = min_{t>0} (‖g_w‖²/t +
  t)/2``, the inner problem at fixed t is a simplex QP, solved as
  MGDA's (a constant ``κ (1ᵀw)²`` and ``(bᵀw)(1ᵀw)`` in place of
  ``bᵀw`` make it homogeneous and positive definite on the simplex), and
  the outer one is convex in t, whose derivative has the sign of
  ``t² − ‖g_w(t)‖²``: a bisection on ``log t``. As in TorchJD, M is first
  divided by its trace, and the weights are 0 when ``‖g_w‖ < norm_eps`` in
  those units: when the minimum is at ``g_w = 0`` (e.g. an exit with a zero
  gradient, as under ``granularity="leaf"`` for a tensor it does not reach)
  there is no direction, and no update. The bisection resolves ``‖g_w‖``
  down to 1e-8 of the largest gradient.

  Args:
    gram: ``(K, K)``.
    c: the radius of the ball, relative to ``‖g_0‖``, ``≥ 0``; 0 gives the
      mean. The paper uses 0.4 (and 0.2 to 0.8).
    norm_eps: below this ``‖g_w‖`` (relative to the gradients' Frobenius
      norm), the weights are 0.
    bisections: the steps of the bisection on ``log t``.
    max_iter: cap on the active-set iterations of each simplex QP.
    tol: relative tolerance of their optimality test.

  Returns:
    ``(K,)`` weights ``1/K + c ‖g_0‖ / ‖g_w‖ · w``.

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    >>> [round(v, 4) for v in (cagrad_weighting(g @ g.T, c=0.5) @ g).tolist()]
    [0.75, 0.75]

  """
  k = gram.shape[-1]
  dtype = gram.dtype
  mean_w = jnp.full((k,), 1.0 / k, dtype)
  m = gram * gram_lib.safe_inverse(jnp.trace(gram))
  b = m @ mean_w  # ⟨g_k, g_0⟩
  g0_sq = jnp.maximum(mean_w @ b, 0.0)
  radius = jnp.asarray(c, dtype) * gram_lib.safe_sqrt(g0_sq)  # c ‖g_0‖
  positive = radius > 0
  tol = jnp.asarray(tol, dtype)
  params = (m, b, g0_sq, radius, tol)
  w, q = _inner(
    jnp.exp(_optimal_log_t(*params, bisections, max_iter)), *params, max_iter
  )
  norm_w = gram_lib.safe_sqrt(q)
  found = positive & (norm_w >= norm_eps)
  weights = mean_w + radius * gram_lib.safe_inverse(norm_w) * w
  # c = 0 or g_0 = 0: the ball is the point g_0, the mean.
  return jnp.where(found, weights, jnp.where(positive, 0.0, mean_w))


def cagrad(
  num_exits: int | None = None,
  *,
  c: float = 0.4,
  norm_eps: float = 1e-4,
  granularity: Granularity = "global",
  bisections: int = 40,
  max_iter: int = 100,
  tol: float = _qp.DEFAULT_TOL,
) -> optax.GradientTransformationExtraArgs:
  """CAGrad: the best worst-case improvement within a ball around the mean.

  ``u = g_0 + c ‖g_0‖ g_w / ‖g_w‖``, the direction within ``c ‖g_0‖`` of the
  mean gradient ``g_0`` that maximises ``min_k ⟨g_k, u⟩``
  (:func:`osgd_jax.weightings.cagrad`, TorchJD's ``CAGrad``), solved under
  ``jax.jit`` by a bisection over simplex QPs, with no convex-solver
  dependency. ``c = 0`` is the mean; as c grows the update approaches
  MGDA's direction. No update when the worst case cannot be improved (e.g.
  an exit with a zero gradient).

  Args:
    c: the ball's radius relative to ``‖g_0‖``, ``≥ 0`` (the paper's 0.4).
    norm_eps: below this ``‖g_w‖``, relative to the gradients' Frobenius
      norm, no update.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.
    bisections: steps of the bisection.
    max_iter: cap on the active-set iterations of each QP.
    tol: relative tolerance of their optimality test.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Example:
    >>> import jax, jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.cagrad(2, c=0.5)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    >>> updates, _ = jax.jit(tx.update)(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [0.75, 0.75]

  References:
    Liu, Liu, Jin, Stone & Liu, *Conflict-Averse Gradient Descent for
    Multi-task Learning*, NeurIPS 2021. https://arxiv.org/abs/2110.14048
  """
  name = "cagrad"
  _checks.check_nonnegative(c, "c", name)
  _checks.check_nonnegative(norm_eps, "norm_eps", name)
  _checks.check_positive_int(bisections, "bisections", name)
  _checks.check_qp_options(max_iter, tol, name)
  return _engine.from_weighting(
    functools.partial(
      cagrad_weighting,
      c=c,
      norm_eps=norm_eps,
      bisections=bisections,
      max_iter=max_iter,
      tol=tol,
    ),
    num_exits=num_exits,
    granularity=granularity,
    name=name,
    # Weights of c·M: see docs/design.md, "Range, rank and derivatives".
    gram_degree=0.0,
  )


_registry.register("cagrad", cagrad, weighting=cagrad_weighting)
