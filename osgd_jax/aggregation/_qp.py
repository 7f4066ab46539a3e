"""Small quadratic programs on the Gram matrix, solved exactly in ``jax.jit``.

MGDA's min-norm point (which CAGrad's inner problems reuse), the projections
onto the dual cone of UPGrad and DualProj, and PCD's dual are QPs in K
variables (one per exit) over the K×K Gram matrix. An active-set method
solves them exactly in about K steps with XLA operations only, so they run
inside a jitted optimizer step on any backend.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from osgd_jax import gram as gram_lib

#: Relative tolerance of the QP solvers' optimality test.
DEFAULT_TOL = 1e-6
# The smallest scale the min-norm point's second solve uses, relative to the
# largest squared gradient norm: keeps its matrix finite when 0 is in the
# hull.
_SCALE_FLOOR = 1e-12


def solve_nonnegative_qp(
  q: jax.Array,
  c: jax.Array,
  allowed: jax.Array,
  *,
  max_iter: int,
  tol: float | jax.Array,
) -> jax.Array:
  """Solves ``min_{x ≥ 0} ½ xᵀ q x + cᵀ x`` (q PSD), ``x_k = 0`` if not allowed.

  The Lawson–Hanson active-set method on the normal equations: exact after
  finitely many steps (about K), where projected-gradient or Frank–Wolfe
  iterations converge slowly on the ill-conditioned Grams that nearly
  collinear gradients give. Its two nested loops (add the variable with the
  most negative gradient; step back while the passive solution has
  non-positive entries) run as one ``while_loop`` with one linear solve per
  iteration, which compiles about twice as fast. An entering variable is kept
  only if the step it starts lowers the objective, so a numerically
  dependent one is refused rather than cycled on. ``tol`` is relative to the
  size of the terms of the gradient ``q x + c``, below which it is noise.

  The derivative is the solution's, by the implicit function theorem on the
  optimality conditions, not that of the iterations (which reverse mode
  cannot follow through a ``while_loop``): on the support ``P = {x > 0}``,
  ``q_PP x_P + c_P = 0``, so ``dx_P = −q_PP⁻¹ (dq x + dc)_P`` and
  ``dx = 0`` elsewhere. It is exact where the support does not change (strict
  complementarity), and one of the one-sided derivatives where it does.

  Args:
    q: ``(K, K)`` symmetric positive semi-definite.
    c: ``(K,)``.
    allowed: ``(K,)`` booleans; variables not allowed stay at 0.
    max_iter: cap on the iterations (about K are needed).
    tol: relative tolerance of the optimality test.

  Returns:
    ``(K,)`` the minimiser, non-negative.

  Example:
    >>> import jax.numpy as jnp
    >>> q = jnp.eye(2)
    >>> x = solve_nonnegative_qp(q, jnp.asarray([-1.0, 2.0]),
    ...                          jnp.ones(2, bool), max_iter=10, tol=1e-6)
    >>> x.tolist()   # unconstrained (1, -2); the second is clipped at 0
    [1.0, 0.0]
  """
  return _nonnegative_qp(q, c, allowed, jnp.asarray(tol, q.dtype), max_iter)


def _passive_system(q: jax.Array, passive: jax.Array) -> jax.Array:
  """``q`` on the passive variables, the identity on the others."""
  p = passive.astype(q.dtype)
  return q * (p[:, None] * p[None, :]) + jnp.eye(q.shape[-1], dtype=q.dtype) * (
    1.0 - p
  )


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _nonnegative_qp(
  q: jax.Array, c: jax.Array, allowed: jax.Array, tol: jax.Array, max_iter: int
) -> jax.Array:
  """:func:`solve_nonnegative_qp`'s active-set iterations."""
  k = q.shape[-1]
  dtype = q.dtype

  def objective(x):
    return 0.5 * x @ (q @ x) + c @ x

  def solve_on(passive):
    # The unconstrained minimiser over the passive set, zero elsewhere. The
    # system is symmetric positive definite while the passive columns are
    # independent, so Cholesky suffices (and compiles far faster than LU); a
    # numerically singular one gives non-finite values, which are refused.
    p = passive.astype(dtype)
    a = _passive_system(q, passive)
    return (
      jax.scipy.linalg.cho_solve(
        jax.scipy.linalg.cho_factor(a, lower=True), -c * p
      )
      * p
    )

  class Carry(NamedTuple):
    x: jax.Array  # current point: feasible, positive on `passive`
    passive: jax.Array
    s: jax.Array  # minimiser over `passive` (pending)
    base_x: jax.Array  # the point before `entering` entered
    base_passive: jax.Array
    entering: jax.Array  # one-hot, or all False
    refused: jax.Array
    it: jax.Array
    done: jax.Array

  def body(cr: Carry) -> Carry:
    finite = jnp.all(jnp.isfinite(cr.s))
    s = jnp.where(finite, cr.s, cr.base_x)
    stepping = finite & jnp.any(cr.passive & (s <= 0))

    # Inner step: move from x towards s until a passive variable hits zero.
    blocking = cr.passive & (s <= 0)
    # x − s > 0 where x > 0 ≥ s; the entering variable has x = 0 (ratio 0).
    ratio = jnp.where(
      blocking, cr.x / jnp.where(cr.x - s > 0, cr.x - s, 1.0), jnp.inf
    )
    alpha = jnp.clip(jnp.min(ratio), 0.0, 1.0)
    inner_x = cr.x + alpha * (s - cr.x)
    inner_passive = cr.passive & ~(blocking & (ratio <= alpha))
    inner_x = jnp.where(inner_passive, inner_x, 0.0)

    # Outer step: s is positive on the passive set. Keep it if the entry
    # paid off, else go back and refuse the entering variable; then pick the
    # next variable to enter.
    pending = jnp.any(cr.entering)
    accept = finite & (~pending | (objective(s) < objective(cr.base_x)))
    x = jnp.where(accept, s, cr.base_x)
    passive = jnp.where(accept, cr.passive, cr.base_passive)
    # A refused variable may become useful once the passive set changes.
    refused = jnp.where(accept & pending, False, cr.refused | cr.entering)
    gradient = q @ x + c
    noise = jnp.abs(q) @ jnp.abs(x) + jnp.abs(c) + 1.0
    candidates = allowed & ~passive & ~refused & (-gradient > tol * noise)
    j = jnp.argmax(jnp.where(candidates, -gradient, -jnp.inf))
    entering = jax.nn.one_hot(j, k, dtype=jnp.bool_) & candidates

    new = Carry(
      x=jnp.where(stepping, inner_x, x),
      passive=jnp.where(stepping, inner_passive, passive | entering),
      s=cr.s,
      base_x=jnp.where(stepping, cr.base_x, x),
      base_passive=jnp.where(stepping, cr.base_passive, passive),
      entering=jnp.where(stepping, cr.entering, entering),
      refused=jnp.where(stepping, cr.refused, refused),
      it=cr.it + 1,
      done=~stepping & ~jnp.any(candidates),
    )
    return new._replace(s=solve_on(new.passive))

  zeros = jnp.zeros((k,), dtype)
  none = jnp.zeros((k,), jnp.bool_)
  start = Carry(
    zeros,
    none,
    zeros,
    zeros,
    none,
    none,
    none,
    jnp.zeros((), jnp.int32),
    jnp.zeros((), jnp.bool_),
  )
  final = jax.lax.while_loop(
    lambda cr: ~cr.done & (cr.it < max_iter), body, start
  )
  return final.x


@_nonnegative_qp.defjvp
def _nonnegative_qp_jvp(max_iter, primals, tangents):
  # Implicit differentiation on the support (solve_nonnegative_qp's
  # docstring; docs/design.md, "Range, rank and derivatives").
  q, c, allowed, tol = primals
  d_q, d_c = tangents[0], tangents[1]
  x = _nonnegative_qp(q, c, allowed, tol, max_iter)
  passive = x > 0
  p = passive.astype(q.dtype)
  factor = jax.scipy.linalg.cho_factor(_passive_system(q, passive), lower=True)
  d_x = jax.scipy.linalg.cho_solve(factor, -(d_q @ x + d_c) * p) * p
  return x, d_x


def min_norm_point(
  gram: jax.Array, *, max_iter: int, tol: float | jax.Array
) -> jax.Array:
  """The weights of the minimum-norm point of the rows' convex hull.

  ``w = argmin_{w ≥ 0, Σw = 1} ‖wᵀ G‖²``. The simplex QP is solved as the
  non-negative least squares ``min_{u ≥ 0} ½ uᵀ(M/σ + 11ᵀ)u − 1ᵀu`` with
  ``w = u / 1ᵀu``: its optimality conditions are the simplex QP's for any
  scale σ > 0, and it stays bounded when 0 is in the hull. The scale matters
  in floating point, since the ``11ᵀ`` term swamps Gram entries far below
  σ: a first solve with σ = max_k M_kk gives ``‖u*‖²``, and a second with σ
  near it (at least 1e-12 of max_k M_kk) puts the rows that decide the
  answer at unit scale, e.g. for gradients whose norms span 1e-8 to 1e8.

  Args:
    gram: ``(K, K)``.
    max_iter: cap on the active-set iterations (about K are needed).
    tol: relative tolerance of the optimality test.

  Returns:
    ``(K,)`` weights on the simplex.

  Example:
    >>> import jax.numpy as jnp
    >>> w = min_norm_point(jnp.eye(2), max_iter=10, tol=1e-6)
    >>> [round(v, 4) for v in w.tolist()]
    [0.5, 0.5]
  """
  k = gram.shape[-1]
  if k == 1:  # the hull is the one row
    return jnp.ones((1,), gram.dtype)
  max_diag = jnp.max(jnp.diagonal(gram))
  ones = jnp.ones((k, k), gram.dtype)

  def solve(sigma):
    u = solve_nonnegative_qp(
      gram * gram_lib.safe_inverse(sigma) + ones,
      -ones[0],
      jnp.ones((k,), jnp.bool_),
      max_iter=max_iter,
      tol=tol,
    )
    w = u / jnp.sum(u)
    return w, w @ (gram @ w)

  def phase(_, carry):
    best, best_sq, sigma = carry
    w, norm_sq = solve(sigma)
    # Both solves give points of the hull; keep the shorter. When 0 is
    # (nearly) in the hull the second, at a tiny σ, is the worse conditioned.
    better = norm_sq < best_sq
    best = jnp.where(better, w, best)
    best_sq = jnp.where(better, norm_sq, best_sq)
    # w does not depend on σ (only its rounding does): no derivative.
    sigma = jnp.clip(norm_sq, _SCALE_FLOOR * max_diag, max_diag)
    return best, best_sq, jax.lax.stop_gradient(sigma)

  # A loop rather than two calls: the solver is traced and compiled once.
  w, _, _ = jax.lax.fori_loop(
    0,
    2,
    phase,
    (
      jnp.full((k,), 1.0 / k, gram.dtype),
      jnp.asarray(jnp.inf, gram.dtype),
      jax.lax.stop_gradient(max_diag),
    ),
  )
  return w


def project_onto_dual_cone(
  norms: jax.Array,
  corr: jax.Array,
  p: jax.Array,
  *,
  max_iter: int,
  tol: float | jax.Array,
) -> jax.Array:
  """The weights ``p + λ`` of ``pᵀ G`` projected onto the rows' dual cone.

  ``λ ≥ 0`` solves ``min_{λ ≥ 0} ½ λᵀMλ + λᵀ M p``, solved exactly by the
  active-set method in the basis ``ĝ_k = g_k / ‖g_k‖``, where the matrix is
  the cosines C and the rows' scales drop out: ``μ = ‖g‖ ∘ λ``, with the
  linear term ``C (‖g‖ ∘ p)`` scaled to unit size (the problem is
  homogeneous in it). Zero rows constrain nothing.

  Args:
    norms: ``(K,)`` the rows' norms.
    corr: ``(K, K)`` their cosines.
    p: ``(K,)`` the weights of the vector to project.
    max_iter: cap on the active-set iterations.
    tol: relative tolerance of the optimality test.

  Returns:
    ``(K,)`` the projection's weights.
  """
  q = norms * p
  size = jnp.max(jnp.abs(q))
  mu = solve_nonnegative_qp(
    corr,
    corr @ (q * gram_lib.safe_inverse(size)),
    norms > 0,
    max_iter=max_iter,
    tol=tol,
  )
  return p + mu * size * gram_lib.safe_inverse(norms)
