"""Linear algebra on the Gram matrix that several weightings share.

Eigen-decompositions with a numerical rank, pseudo-inverses, the projection
onto the probability simplex, and the α-fair equation of FairGrad and
Nash-MTL: small K×K computations, written for numerical care rather than
speed (``docs/design.md``, "Weightings: the one aggregation path").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def exit_index(gram: jax.Array) -> jax.Array:
  """``(1, 2, ..., K)`` in the Gram matrix's dtype."""
  return jnp.arange(1, gram.shape[-1] + 1, dtype=gram.dtype)


def psd_eigh(gram: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Eigenvalues (ascending), eigenvectors, and which eigenvalues are nonzero.

  An eigenvalue counts as zero at or below ``K · eps · λ_max``, the usual
  numerical-rank threshold (NumPy's ``matrix_rank``), since the Gram matrix
  of rank-deficient gradients has eigenvalues of that size, of either sign.
  """
  k = gram.shape[-1]
  lam, vec = jnp.linalg.eigh(gram)
  cutoff = jnp.max(lam) * k * jnp.finfo(gram.dtype).eps
  return lam, vec, lam > jnp.maximum(cutoff, 0.0)


def pinv_apply(
  lam: jax.Array, vec: jax.Array, keep: jax.Array, x: jax.Array
) -> jax.Array:
  """``A⁺ x`` for ``A = V diag(λ) Vᵀ``, the eigenvalues not kept counted as 0.

  Example:
    >>> import jax.numpy as jnp
    >>> lam, vec, keep = psd_eigh(jnp.diag(jnp.asarray([2.0, 0.0])))
    >>> pinv_apply(lam, vec, keep, jnp.ones(2)).tolist()
    [0.5, 0.0]
  """
  inverse = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
  return vec @ (inverse * (vec.T @ x))


def project_onto_simplex(y: jax.Array) -> jax.Array:
  """The Euclidean projection of ``y`` onto the probability simplex.

  ``x = max(y − θ, 0)`` with θ such that ``Σx = 1``, found by sorting (Held,
  Wolfe & Crowder 1974; Duchi et al. 2008).

  Args:
    y: ``(K,)``.

  Returns:
    ``(K,)`` non-negative, summing to 1.

  Example:
    >>> import jax.numpy as jnp
    >>> project_onto_simplex(jnp.asarray([2.0, 0.0, 0.5])).tolist()
    [1.0, 0.0, 0.0]
  """
  k = y.shape[-1]
  desc = jnp.sort(y)[::-1]
  cumsum = jnp.cumsum(desc)
  index = jnp.arange(1, k + 1, dtype=y.dtype)
  support = desc - (cumsum - 1.0) / index > 0
  rho = jnp.max(jnp.where(support, jnp.arange(k), 0))
  theta = (cumsum[rho] - 1.0) / (rho + 1).astype(y.dtype)
  return jnp.maximum(y - theta, 0.0)


def solve_fair_equation(
  gram: jax.Array, *, alpha: float | jax.Array, max_iter: int
) -> jax.Array:
  """Positive solution of ``M w = w^{-1/α}``, by Newton's method on ``log w``.

  Steps are at most 1 in ``log w``; α = 0 gives ``1/K`` each. The equation
  has no positive solution when the gradients can be combined positively
  into 0, e.g. with a zero gradient: its weight then grows at every step
  (finite, and it multiplies a zero gradient).

  Args:
    gram: ``(K, K)``.
    alpha: the fairness parameter, ``≥ 0``.
    max_iter: the Newton steps.

  Returns:
    ``(K,)`` positive weights.

  Example:
    >>> import jax.numpy as jnp
    >>> w = solve_fair_equation(jnp.diag(jnp.asarray([1.0, 4.0])), alpha=1.0,
    ...                         max_iter=50)
    >>> [round(v, 4) for v in w.tolist()]
    [1.0, 0.5]
  """
  k = gram.shape[-1]
  alpha = jnp.asarray(alpha, gram.dtype)
  inv_alpha = 1.0 / jnp.where(alpha > 0, alpha, 1.0)
  diag = jnp.diagonal(gram)
  # The solution for M's diagonal alone: a start of the right scale for
  # every row, whose norms may span 1e-8 to 1e8.
  y0 = -alpha / (1.0 + alpha) * jnp.log(jnp.where(diag > 0, diag, 1.0))
  eye = jnp.eye(k, dtype=gram.dtype)

  def newton(_, y):
    x = jnp.exp(y)
    rhs = jnp.exp(-y * inv_alpha)
    residual = gram @ x - rhs
    jacobian = gram * x[None, :] + eye * (inv_alpha * rhs)
    step = jnp.linalg.solve(jacobian, -residual)
    step = jnp.where(jnp.isfinite(step), step, 0.0)
    return y + jnp.clip(step, -1.0, 1.0)

  y = jax.lax.fori_loop(0, max_iter, newton, y0)
  return jnp.where(alpha > 0, jnp.exp(y), jnp.full((k,), 1.0 / k, gram.dtype))
