"""Linear algebra on the Gram matrix that several weightings share.

Eigen-decompositions with a numerical rank, pseudo-inverses, the projection
onto the probability simplex, and the α-fair equation of FairGrad and
Nash-MTL: small K×K computations, written for numerical care rather than
speed (``docs/design.md``, "Weightings: the one aggregation path").
"""

from __future__ import annotations

import functools

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

  Its derivative is ``eigh``'s, which is infinite for the eigenvectors at a
  repeated eigenvalue (every Gram matrix with two zero rows has one):
  weightings differentiate through :func:`psd_eigvals`,
  :func:`pinv_apply` and :func:`psd_power_matrix` instead.
  """
  k = gram.shape[-1]
  lam, vec = jnp.linalg.eigh(gram)
  cutoff = jnp.max(lam) * k * jnp.finfo(gram.dtype).eps
  return lam, vec, lam > jnp.maximum(cutoff, 0.0)


def _kept_power(lam: jax.Array, keep: jax.Array, power: float) -> jax.Array:
  """``λ^power`` on the kept eigenvalues, 0 on the others."""
  safe = jnp.where(keep, lam, 1.0)
  if power == -1.0:
    value = 1.0 / safe
  elif power == -0.5:
    value = jax.lax.rsqrt(safe)
  else:  # pragma: no cover - a programming error, not a user's
    raise NotImplementedError(power)
  return jnp.where(keep, value, 0.0)


def _loewner(lam: jax.Array, keep: jax.Array, power: float) -> jax.Array:
  """The divided differences ``L_ij`` of ``f(λ) = λ^power`` (0 if not kept).

  The derivative of the matrix function ``F(M) = V f(Λ) Vᵀ`` is
  ``dF = V (L ∘ (Vᵀ dM V)) Vᵀ`` (Daleckii & Krein; Higham, *Functions of
  Matrices*, 2008, Theorem 3.11), with ``L_ij = (f(λ_i) − f(λ_j)) / (λ_i −
  λ_j)``, and ``f'(λ_i)`` where the eigenvalues are equal: finite at
  repeated eigenvalues, where the eigenvectors' own derivative is not. The
  eigenvalues not kept count as exactly 0 and stay so (the derivative at
  constant rank: Golub & Pereyra, SIAM J. Numer. Anal. 10, 1973, for the
  pseudo-inverse), so ``L_ij = f(λ_i)/λ_i`` between a kept and a dropped
  one and 0 between two dropped ones. The kept–kept quotients are written
  without a subtraction, exact for equal and near-equal eigenvalues alike.
  """
  safe = jnp.where(keep, lam, 1.0)
  li, lj = safe[:, None], safe[None, :]
  if power == -1.0:
    both = -1.0 / (li * lj)
    one = 1.0 / (safe * safe)
  elif power == -0.5:
    ri, rj = jnp.sqrt(li), jnp.sqrt(lj)
    both = -1.0 / (ri * rj * (ri + rj))
    one = 1.0 / (safe * jnp.sqrt(safe))
  else:  # pragma: no cover - a programming error, not a user's
    raise NotImplementedError(power)
  ki, kj = keep[:, None], keep[None, :]
  return jnp.where(
    ki & kj,
    both,
    jnp.where(ki, one[:, None], jnp.where(kj, one[None, :], 0.0)),
  )


def _spectral_tangent(
  lam: jax.Array,
  vec: jax.Array,
  keep: jax.Array,
  d_gram: jax.Array,
  power: float,
) -> jax.Array:
  """``dF`` of ``F(M) = V f(Λ) Vᵀ`` along ``d_gram`` (see :func:`_loewner`)."""
  # Only the symmetric part of a perturbation is seen by a symmetric eigh.
  sym = 0.5 * (d_gram + d_gram.T)
  inner = _loewner(lam, keep, power) * (vec.T @ sym @ vec)
  return vec @ inner @ vec.T


@jax.custom_jvp
def psd_eigvals(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """:func:`psd_eigh`'s eigenvalues and mask, with a finite derivative.

  ``dλ_i = v_iᵀ dM v_i``, which needs no eigenvector's derivative. At a
  repeated eigenvalue the split of the derivative among the equal ones
  depends on the basis ``eigh`` picks, but their sum does not.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> jax.grad(lambda m: psd_eigvals(m)[0].sum())(jnp.zeros((2, 2)))
    Array([[1., 0.],
           [0., 1.]], dtype=float32)
  """
  lam, _, keep = psd_eigh(gram)
  return lam, keep


@psd_eigvals.defjvp
def _psd_eigvals_jvp(primals, tangents):
  (gram,), (d_gram,) = primals, tangents
  lam, vec, keep = psd_eigh(gram)
  sym = 0.5 * (d_gram + d_gram.T)
  d_lam = jnp.einsum("ik,ij,jk->k", vec, sym, vec)
  return (lam, keep), (d_lam, jnp.zeros(keep.shape, jax.dtypes.float0))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def psd_power_matrix(gram: jax.Array, power: float) -> jax.Array:
  """``V Λ^power Vᵀ`` over the kept eigenpairs of :func:`psd_eigh` (others 0).

  ``power`` is −1 (the pseudo-inverse) or −1/2. Its derivative is the
  matrix function's (:func:`_loewner`): finite at zero rows and repeated
  eigenvalues, and exact where the rank does not change.

  Example:
    >>> import jax.numpy as jnp
    >>> psd_power_matrix(jnp.diag(jnp.asarray([4.0, 0.0])), -0.5).tolist()
    [[0.5, 0.0], [0.0, 0.0]]
  """
  lam, vec, keep = psd_eigh(gram)
  return (vec * _kept_power(lam, keep, power)) @ vec.T


@psd_power_matrix.defjvp
def _psd_power_matrix_jvp(power, primals, tangents):
  (gram,), (d_gram,) = primals, tangents
  lam, vec, keep = psd_eigh(gram)
  out = (vec * _kept_power(lam, keep, power)) @ vec.T
  return out, _spectral_tangent(lam, vec, keep, d_gram, power)


@jax.custom_jvp
def pinv_apply(gram: jax.Array, x: jax.Array) -> jax.Array:
  """``M⁺ x``, the eigenvalues of M not kept by :func:`psd_eigh` counted as 0.

  Its derivative is the pseudo-inverse's at constant rank (:func:`_loewner`),
  finite at zero rows and repeated eigenvalues.

  Example:
    >>> import jax.numpy as jnp
    >>> pinv_apply(jnp.diag(jnp.asarray([2.0, 0.0])), jnp.ones(2)).tolist()
    [0.5, 0.0]
  """
  lam, vec, keep = psd_eigh(gram)
  return vec @ (_kept_power(lam, keep, -1.0) * (vec.T @ x))


@pinv_apply.defjvp
def _pinv_apply_jvp(primals, tangents):
  (gram, x), (d_gram, d_x) = primals, tangents
  lam, vec, keep = psd_eigh(gram)
  inverse = _kept_power(lam, keep, -1.0)
  out = vec @ (inverse * (vec.T @ x))
  d_out = _spectral_tangent(lam, vec, keep, d_gram, -1.0) @ x + vec @ (
    inverse * (vec.T @ d_x)
  )
  return out, d_out


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

  The derivative is the solution's, by the implicit function theorem, not
  that of the Newton steps: ``(M + diag(w^{-1/α-1}/α)) dw = −(dM w −
  w^{-1/α} ln w · dα/α²)``, on the rows whose gradient is nonzero (a zero
  row, whose weight has no solution, is held at zero and its weight has
  derivative 0).

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
  return _fair_solution(gram, jnp.asarray(alpha, gram.dtype), max_iter)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _fair_solution(gram: jax.Array, alpha: jax.Array, max_iter: int):
  """:func:`solve_fair_equation`'s Newton iteration."""
  k = gram.shape[-1]
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


@_fair_solution.defjvp
def _fair_solution_jvp(max_iter, primals, tangents):
  # Implicit differentiation of F(w, M, α) = M w − w^{-1/α} = 0 at the
  # solution (docs/design.md, "Range, rank and derivatives").
  (gram, alpha), (d_gram, d_alpha) = primals, tangents
  w = _fair_solution(gram, alpha, max_iter)
  positive = alpha > 0
  inv_alpha = 1.0 / jnp.where(positive, alpha, 1.0)
  log_w = jnp.log(w)
  rhs = jnp.exp(-log_w * inv_alpha)  # w^{-1/α}
  live = jnp.diagonal(gram) > 0
  both = live[:, None] & live[None, :]
  k = gram.shape[-1]
  eye = jnp.eye(k, dtype=gram.dtype)
  jacobian = jnp.where(both, gram + eye * (inv_alpha * rhs / w), eye)
  d_residual = (jnp.where(both, d_gram, 0.0) @ w) - (
    rhs * log_w * inv_alpha * inv_alpha * d_alpha
  )
  d_w = -jnp.linalg.solve(jacobian, jnp.where(live, d_residual, 0.0))
  return w, jnp.where(positive & live, d_w, 0.0)
