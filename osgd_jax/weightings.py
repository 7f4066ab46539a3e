"""Weightings: pure functions from a K×K Gram matrix to K weights.

Every aggregator of the library combines the per-exit gradients ``g_k`` (the
rows of G) as ``u = Σ_k w_k g_k = wᵀ G``, with weights ``w`` computed from
the Gram matrix ``M = G Gᵀ`` alone (``docs/design.md``, "The maths"). A
*weighting* is that map ``M -> w``: a pure, jittable function of a ``(K, K)``
array returning a ``(K,)`` array. :func:`osgd_jax.from_weighting` turns any
weighting into an Optax transformation (one pass over the gradients for the
Gram matrices, one for the weighted sum), and every transformation of the
library, OSGD included, is built that way.

Some weightings read more than the Gram matrix; they take it as keyword
arguments, and their transformations supply it from the Optax state or from
the update's extra arguments:

=================  ================================  ========================
weighting          extra input                       supplied by
=================  ================================  ========================
:func:`sdn`        ``progress`` (step / total)       the step count in the
                                                     state of
                                                     :func:`~osgd_jax.weighted_sum`
:func:`adaloss`    ``losses`` (running averages)     an EMA in the state of
                                                     :func:`~osgd_jax.adaptive_loss_balancing`,
                                                     fed by
                                                     ``update(..., losses=)``
:func:`pcgrad`     ``key`` (the visiting orders)     a PRNG key in the state
                                                     of :func:`~osgd_jax.pcgrad`
=================  ================================  ========================

Example: a user-defined weighting, here exit k weighted by its share of the
total squared gradient norm, as an Optax transformation::

  import jax.numpy as jnp, optax, osgd_jax

  def by_norm(gram):
    sq = jnp.diagonal(gram)
    return gram.shape[-1] * sq / jnp.maximum(sq.sum(), 1e-30)

  tx = optax.chain(osgd_jax.from_weighting(by_norm, num_exits=4),
                   optax.sgd(0.1, momentum=0.9))
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from osgd_jax import gram as gram_lib
from osgd_jax import nnqp
from osgd_jax import orthogonalize

__all__ = [
    "DEFAULT_QP_TOL",
    "Weighting",
    "adaloss",
    "geometric",
    "linear",
    "mgda",
    "osgd",
    "pcgrad",
    "pcgrad_orders",
    "sdn",
    "uniform",
    "upgrad",
]

# A weighting: ``(K, K)`` Gram matrix -> ``(K,)`` weights, jittable.
Weighting = Callable[[jax.Array], jax.Array]

# Relative tolerance of the QP solvers' optimality test (MGDA, UPGrad).
DEFAULT_QP_TOL = 1e-6
# The smallest scale MGDA's second solve uses, relative to the largest
# squared gradient norm: keeps its matrix finite when 0 is in the hull.
_SCALE_FLOOR = 1e-12


def _exit_index(gram: jax.Array) -> jax.Array:
  """``(1, 2, ..., K)`` in the Gram matrix's dtype."""
  return jnp.arange(1, gram.shape[-1] + 1, dtype=gram.dtype)


def osgd(
    gram: jax.Array,
    *,
    order: Sequence[int] | None = None,
    tol: float | jax.Array = orthogonalize.DEFAULT_TOL,
    rescale: bool = False,
) -> jax.Array:
  """Orthogonalized SGD: Gram–Schmidt in priority order, then the sum.

  ``ĝ_1 = g_1``, ``ĝ_k = g_k − Σ_{j<k} ⟨g_k, ĝ_j⟩/‖ĝ_j‖² ĝ_j`` and
  ``u = Σ_k ĝ_k = wᵀ G``, with ``w = L⁻ᵀ 1`` for ``M = L D Lᵀ`` (L unit lower
  triangular). A component keeping at most ``tol`` of its squared norm is
  degenerate and adds nothing.

  Args:
    gram: ``(K, K)`` Gram matrix of the exits' gradients.
    order: the exits from highest to lowest priority (a permutation of
      ``range(K)``); ``None``: exit 1 first.
    tol: relative tolerance on ``‖ĝ_k‖² / ‖g_k‖²``.
    rescale: scale each kept component back to ``‖g_k‖`` (an assumption
      where the paper's text is silent; off by default).

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [1.0, 1.0]])
    >>> w = osgd(g @ g.T)
    >>> [round(v, 6) for v in (w @ g).tolist()]   # g1 + (g2 − its g1 part)
    [1.0, 1.0]

  References:
    Wan, Hoffmann, Lu & Maire, *Orthogonalized SGD and Nested Architectures
    for Anytime Neural Networks*, ICML 2020. https://arxiv.org/abs/2008.06635
  """
  weights, _ = orthogonalize.gram_schmidt_weights(
      gram, order=order, tol=tol, rescale=rescale)
  return weights


def uniform(gram: jax.Array) -> jax.Array:
  """All exits weigh 1: the gradient of the summed loss (MSDNet's).

  Args:
    gram: ``(K, K)``; only K is read.

  Returns:
    ``(K,)`` ones.

  Example:
    >>> import jax.numpy as jnp
    >>> uniform(jnp.eye(3)).tolist()
    [1.0, 1.0, 1.0]

  References:
    Huang et al., *Multi-Scale Dense Networks for Resource Efficient Image
    Classification*, ICLR 2018. https://arxiv.org/abs/1703.09844
  """
  return jnp.ones(gram.shape[-1:], gram.dtype)


def linear(gram: jax.Array) -> jax.Array:
  """``w_k ∝ k``: later exits weigh more; the weights sum to K.

  Normalised to the uniform sum's total K, so that a learning rate tuned for
  the summed loss stays in range.

  Args:
    gram: ``(K, K)``; only K is read.

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> linear(jnp.eye(3)).tolist()
    [0.5, 1.0, 1.5]
  """
  index = _exit_index(gram)
  return index * (gram.shape[-1] / index.sum())


def geometric(gram: jax.Array, *, ratio: float | jax.Array = 2.0) -> jax.Array:
  """``w_k ∝ ratio**(k-1)``; the weights sum to K, as :func:`linear`'s.

  Args:
    gram: ``(K, K)``; only K is read.
    ratio: the ratio between consecutive exits' weights, > 0.

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> [round(w, 4) for w in geometric(jnp.eye(3), ratio=2.0).tolist()]
    [0.4286, 0.8571, 1.7143]
  """
  ramp = jnp.asarray(ratio, gram.dtype) ** (_exit_index(gram) - 1)
  return ramp * (gram.shape[-1] / ramp.sum())


def sdn(gram: jax.Array, *, progress: float | jax.Array,
        cap: float | Sequence[float] = 0.9) -> jax.Array:
  """The Shallow-Deep Networks schedule of exit weights.

  The final exit weighs 1. Early exit k of K-1 has a cap ``c_k`` (``cap ·
  k / (K-1)`` for one number: SDN's 0.15, 0.3, ..., 0.9 for six early exits
  with ``cap=0.9``; or ``cap[k-1]`` given K-1 numbers) and the weight
  ``min(c_k, 0.01 + c_k · progress)``, which rises over training.

  Args:
    gram: ``(K, K)``; only K is read.
    progress: the fraction of training done, ``step / total_steps``.
    cap: one number (the last early exit's cap) or K-1 caps.

  Returns:
    ``(K,)`` weights.

  Raises:
    ValueError: K-1 caps were expected.

  Example:
    >>> import jax.numpy as jnp
    >>> [round(w, 4) for w in sdn(jnp.eye(3), progress=1.0, cap=0.8).tolist()]
    [0.4, 0.8, 1.0]

  References:
    Kaya, Hong & Dumitras, *Shallow-Deep Networks: Understanding and
    Mitigating Network Overthinking*, ICML 2019.
    https://arxiv.org/abs/1810.07052
  """
  k = gram.shape[-1]
  if k == 1:
    return jnp.ones((1,), gram.dtype)
  caps = jnp.asarray(cap, gram.dtype).reshape(-1)
  if caps.shape == (1,):
    caps = caps * _exit_index(gram)[:-1] / (k - 1)
  elif caps.shape != (k - 1,):
    raise ValueError(
        f"sdn got {caps.shape[0]} caps but the gradients have K={k} exits;"
        " pass K-1 caps (one per early exit) or one number.")
  early = jnp.minimum(caps, 0.01 + caps * jnp.asarray(progress, gram.dtype))
  return jnp.concatenate([early, jnp.ones((1,), gram.dtype)])


def adaloss(gram: jax.Array, *, losses: jax.Array,
            eps: float | jax.Array = 1e-8) -> jax.Array:
  """AdaLoss: weights inversely proportional to the exits' (average) losses.

  ``w_k = K · (1/ℓ_k) / Σ_j (1/ℓ_j)`` with ``ℓ_k ≥ eps``. With ``ℓ`` the
  current losses, ``w_k ∝ 1/ℓ_k`` makes ``u`` the gradient of
  ``Σ_k log ℓ_k``; :func:`osgd_jax.adaptive_loss_balancing` passes a running
  average instead. The weights are normalised to sum to K, the uniform
  sum's total.

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
    >>> adaloss(jnp.eye(2), losses=jnp.asarray([1.0, 3.0])).tolist()
    [1.5, 0.5]

  References:
    Hu, Dey, Hebert & Bagnell, *Learning Anytime Predictions in Neural
    Networks via Adaptive Loss Balancing*, AAAI 2019.
    https://arxiv.org/abs/1708.06832
  """
  k = gram.shape[-1]
  if jnp.shape(losses) != (k,):
    raise ValueError(
        f"adaloss got losses of shape {jnp.shape(losses)}, but the gradients"
        f" have K={k} exits; pass the ({k},) vector of per-exit losses.")
  inverse = 1.0 / jnp.maximum(jnp.asarray(losses, gram.dtype), eps)
  return k * inverse / inverse.sum()


def pcgrad_orders(key: jax.Array, num_exits: int) -> jax.Array:
  """``(K, K)``: row i is the random order in which task i visits the others.

  Sorting i.i.d. 32-bit random keys gives uniform permutations (ties, of
  probability about K²/2³³, fall back to index order); one draw for all rows
  compiles much faster than K calls of ``jax.random.permutation``.

  Args:
    key: a PRNG key.
    num_exits: K.

  Returns:
    ``(K, K)`` int32; row i is a permutation of ``range(K)``.

  Example:
    >>> import jax
    >>> sorted(pcgrad_orders(jax.random.key(0), 3)[0].tolist())
    [0, 1, 2]
  """
  bits = jax.random.bits(key, (num_exits, num_exits), jnp.uint32)
  return jnp.argsort(bits, axis=-1).astype(jnp.int32)


def pcgrad(gram: jax.Array, *, key: jax.Array) -> jax.Array:
  """PCGrad, "gradient surgery": projects away conflicting components.

  For every task (exit) i, starting from ``g_i^PC = g_i``, the other tasks j
  are visited in a random order; whenever ``⟨g_i^PC, g_j⟩ < 0``,
  ``g_i^PC ← g_i^PC − ⟨g_i^PC, g_j⟩ / ‖g_j‖² · g_j`` (the projection onto the
  normal plane of the *original* g_j). The update is ``Σ_i g_i^PC``
  (Algorithm 1 of the paper). Every inner product it needs is
  ``⟨g_i^PC, g_j⟩ = Σ_m c_im M_mj`` for ``g_i^PC = Σ_m c_im g_m``, so it is
  exact from the Gram matrix.

  Args:
    gram: ``(K, K)``.
    key: a PRNG key that draws the visiting orders.

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [-1.0, 1.0]])
    >>> w = pcgrad(g @ g.T, key=jax.random.key(0))
    >>> (w @ g).tolist()   # g1^PC = (½, ½), g2^PC = (0, 1)
    [0.5, 1.5]

  References:
    Yu, Kumar, Gupta, Levine, Hausman & Finn, *Gradient Surgery for
    Multi-Task Learning*, NeurIPS 2020. https://arxiv.org/abs/2001.06782
  """
  k = gram.shape[-1]
  orders = pcgrad_orders(key, k)
  inv_sq = gram_lib.safe_inverse(jnp.diagonal(gram))
  tasks = jnp.arange(k)

  def visit(position, coeff):
    j = orders[:, position]                        # task i's next other task
    dots = jnp.sum(coeff * gram[:, j].T, axis=-1)  # ⟨g_i^PC, g_j⟩, original g_j
    # The conflict test uses the current g_i^PC; a zero g_j never conflicts.
    conflict = (dots < 0) & (j != tasks)
    step = jnp.where(conflict, dots * inv_sq[j], 0.0)
    return coeff - step[:, None] * jax.nn.one_hot(j, k, dtype=gram.dtype)

  coeff = jax.lax.fori_loop(0, k, visit, jnp.eye(k, dtype=gram.dtype))
  return coeff.sum(axis=0)


def mgda(gram: jax.Array, *, max_iter: int = 100,
         tol: float | jax.Array = DEFAULT_QP_TOL) -> jax.Array:
  """MGDA: the minimum-norm point of the convex hull of the gradients.

  ``w = argmin_{w ≥ 0, Σw = 1} ‖wᵀ G‖²``, the common descent direction of the
  multiple-gradient descent algorithm, in the form of Sener & Koltun (2018),
  who solve this QP on the Gram matrix by Frank–Wolfe. Here it is solved
  exactly by an active-set method (:func:`osgd_jax.nnqp.solve_nonnegative_qp`).

  The simplex QP is solved as the non-negative least squares
  ``min_{u ≥ 0} ½ uᵀ(M/σ + 11ᵀ)u − 1ᵀu`` with ``w = u / 1ᵀu``: its optimality
  conditions are MGDA's for any scale σ > 0, and it stays bounded when 0 is
  in the hull. The scale matters in floating point, since the ``11ᵀ`` term
  swamps Gram entries far below σ: a first solve with σ = max_k M_kk gives
  ``‖u*‖²``, and a second with σ near it (at least 1e-12 of max_k M_kk) puts
  the rows that decide the answer at unit scale, e.g. for gradients whose
  norms span 1e-8 to 1e8.

  The update is a convex combination: its size is that of one gradient, not
  of their sum. It is 0 at a Pareto-stationary point (0 in the hull).

  Args:
    gram: ``(K, K)``.
    max_iter: cap on the active-set iterations (about K are needed).
    tol: relative tolerance of the optimality test.

  Returns:
    ``(K,)`` weights on the simplex.

  Example:
    >>> import jax.numpy as jnp
    >>> [round(v, 4) for v in mgda(jnp.eye(2)).tolist()]
    [0.5, 0.5]

  References:
    Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*,
    NeurIPS 2018. https://arxiv.org/abs/1810.04650
    Désidéri, *Multiple-gradient descent algorithm (MGDA) for
    multiobjective optimization*, Comptes Rendus Mathématique 350, 2012.
  """
  k = gram.shape[-1]
  if k == 1:  # the hull is the one row
    return jnp.ones((1,), gram.dtype)
  max_diag = jnp.max(jnp.diagonal(gram))
  ones = jnp.ones((k, k), gram.dtype)

  def solve(sigma):
    u = nnqp.solve_nonnegative_qp(
        gram * gram_lib.safe_inverse(sigma) + ones, -ones[0],
        jnp.ones((k,), jnp.bool_), max_iter=max_iter, tol=tol)
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
    return best, best_sq, jnp.clip(norm_sq, _SCALE_FLOOR * max_diag, max_diag)

  # A loop rather than two calls: the solver is traced and compiled once.
  w, _, _ = jax.lax.fori_loop(
      0, 2, phase,
      (jnp.full((k,), 1.0 / k, gram.dtype), jnp.asarray(jnp.inf, gram.dtype),
       max_diag))
  return w


def upgrad(gram: jax.Array, *, max_iter: int = 100,
           tol: float | jax.Array = DEFAULT_QP_TOL) -> jax.Array:
  """UPGrad: the mean of the gradients' projections onto their dual cone.

  Every gradient g_i is projected onto the dual cone of all of them,
  ``{v : ⟨v, g_j⟩ ≥ 0 for all j}`` (the directions that conflict with no
  exit), and the projections are averaged. The projection of g_i is
  ``g_i + Σ_j λ_ij g_j`` with ``λ_i ≥ 0`` solving the dual
  ``min_{λ ≥ 0} ½ λᵀMλ + λᵀ M e_i``, a K-variable QP solved exactly by an
  active-set method, in the basis ``g_k / ‖g_k‖`` so that it does not depend
  on the rows' scales; zero rows constrain nothing. This is TorchJD's
  recommended aggregator with uniform preference, without its
  regularisation of M. The update is a mean: about the size of one
  gradient, not of their sum.

  Args:
    gram: ``(K, K)``.
    max_iter: cap on the active-set iterations per projection.
    tol: relative tolerance of the optimality test.

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [-1.0, 1.0]])
    >>> [round(v, 4) for v in (upgrad(g @ g.T) @ g).tolist()]
    [0.25, 0.75]

  References:
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024.
    https://arxiv.org/abs/2406.16232
  """
  k = gram.shape[-1]
  if k == 1:  # a row lies in its own dual cone
    return jnp.ones((1,), gram.dtype)
  norms, corr = gram_lib.gram_statistics(gram)
  inv_norms = gram_lib.safe_inverse(norms)
  nonzero = norms > 0
  # Row i of corr is C e_i, the linear term of row i's dual problem.
  mu = jax.vmap(lambda ci: nnqp.solve_nonnegative_qp(
      corr, ci, nonzero, max_iter=max_iter, tol=tol))(corr)
  # v_i = ‖g_i‖ (ĝ_i + Σ_k μ_ik ĝ_k) = g_i + Σ_k μ_ik ‖g_i‖/‖g_k‖ g_k.
  lam = mu * norms[:, None] * inv_norms[None, :]
  return (1.0 + lam.sum(axis=0)) / k
