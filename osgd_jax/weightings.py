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

=========================  ==============================  ====================================
weighting                  extra input                     supplied by
=========================  ==============================  ====================================
:func:`sdn`                ``progress`` (step / total)     the step count in the state
                                                           of :func:`~osgd_jax.weighted_sum`
:func:`adaloss`            ``losses`` (running averages)   an EMA in the state of
                                                           :func:`~osgd_jax.adaptive_loss_balancing`,
                                                           fed by ``update(..., losses=)``
:func:`pcgrad`             ``key`` (the visiting orders)   a PRNG key in the state of
                                                           :func:`~osgd_jax.pcgrad`
:func:`random_weighting`   ``key``                         a PRNG key in the state of
                                                           :func:`~osgd_jax.random_weighting`
:func:`gradvac`            ``target``, ``key``; it         the state of
                           returns the new ``target``      :func:`~osgd_jax.gradvac`
:func:`modo`               ``previous`` (last weights)     the state of :func:`~osgd_jax.modo`
:func:`sdmgrad`            ``previous``; it returns        the state of
                           the next                        :func:`~osgd_jax.sdmgrad`
:func:`pcd`                ``scales`` (1/√EMA of ‖g_k‖²)   the state of :func:`~osgd_jax.pcd`
=========================  ==============================  ====================================

The weightings of TorchJD 0.18 are all here under their papers' names
(``mean``, ``constant``, ``random_weighting``, ``imtl_g``, ``aligned_mtl``,
``krum``, ``dualproj``, ``gradvac``, ``cagrad``, ``config``, ``fairgrad``,
``modo``, ``sdmgrad``, ``pcd``, ``nash_mtl``, besides ``uniform`` (its
``Sum``), ``mgda``, ``upgrad`` and ``pcgrad``). CR-MOGM smooths any
weighting (:func:`osgd_jax.crmogm`). TrimmedMean, GradDrop and ExcessMTL
read every coordinate of the gradients, so they are transformations only
(:func:`osgd_jax.trimmed_mean`, :func:`osgd_jax.graddrop`,
:func:`osgd_jax.excess_mtl`).

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
import numpy as np

from osgd_jax import gram as gram_lib
from osgd_jax import nnqp
from osgd_jax import orthogonalize

__all__ = [
    "ALIGNED_MTL_SCALE_MODES",
    "DEFAULT_QP_TOL",
    "Weighting",
    "adaloss",
    "aligned_mtl",
    "cagrad",
    "clip_update_norm",
    "config",
    "constant",
    "dualproj",
    "fairgrad",
    "geometric",
    "gradvac",
    "imtl_g",
    "krum",
    "linear",
    "mean",
    "mgda",
    "modo",
    "nash_mtl",
    "osgd",
    "pcd",
    "pcgrad",
    "pcgrad_orders",
    "project_onto_simplex",
    "random_weighting",
    "sdmgrad",
    "sdn",
    "uniform",
    "upgrad",
]

#: The type of a weighting, a jittable function from a ``(K, K)`` Gram
#: matrix to ``(K,)`` weights.
Weighting = Callable[[jax.Array], jax.Array]

#: Relative tolerance of the QP solvers' optimality test (MGDA, UPGrad).
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
  # Row i's projection has weights e_i + λ_i; the update is their mean.
  projected = jax.vmap(lambda p: _project_onto_dual_cone(
      norms, corr, p, max_iter=max_iter, tol=tol))(jnp.eye(k, dtype=gram.dtype))
  return projected.mean(axis=0)


def _project_onto_dual_cone(norms: jax.Array, corr: jax.Array, p: jax.Array,
                            *, max_iter: int, tol: float | jax.Array
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
  mu = nnqp.solve_nonnegative_qp(
      corr, corr @ (q * gram_lib.safe_inverse(size)), norms > 0,
      max_iter=max_iter, tol=tol)
  return p + mu * size * gram_lib.safe_inverse(norms)


# --- the other aggregators of TorchJD -----------------------------------------


def _preference(gram: jax.Array, pref_vector: jax.Array | Sequence[float] | None,
                owner: str) -> jax.Array:
  """``pref_vector`` as ``(K,)`` in the Gram's dtype; ``None``: ``1/K`` each."""
  k = gram.shape[-1]
  if pref_vector is None:
    return jnp.full((k,), 1.0 / k, gram.dtype)
  if np.shape(pref_vector) != (k,):
    raise ValueError(
        f"{owner} got pref_vector of shape {np.shape(pref_vector)}, but the"
        f" gradients have K={k} exits; pass one preference per exit, shape"
        f" ({k},).")
  return jnp.asarray(pref_vector, gram.dtype)


def _psd_eigh(gram: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Eigenvalues (ascending), eigenvectors, and which eigenvalues are nonzero.

  An eigenvalue counts as zero at or below ``K · eps · λ_max``, the usual
  numerical-rank threshold (NumPy's ``matrix_rank``), since the Gram matrix
  of rank-deficient gradients has eigenvalues of that size, of either sign.
  """
  k = gram.shape[-1]
  lam, vec = jnp.linalg.eigh(gram)
  cutoff = jnp.max(lam) * k * jnp.finfo(gram.dtype).eps
  return lam, vec, lam > jnp.maximum(cutoff, 0.0)


def mean(gram: jax.Array) -> jax.Array:
  """Mean: every exit weighs ``1/K``, the average of the gradients.

  TorchJD's ``Mean``; :func:`uniform` is its ``Sum``. The update is the
  gradient of the mean loss.

  Args:
    gram: ``(K, K)``; only K is read.

  Returns:
    ``(K,)`` weights ``1/K``.

  Example:
    >>> import jax.numpy as jnp
    >>> mean(jnp.eye(4)).tolist()
    [0.25, 0.25, 0.25, 0.25]
  """
  return uniform(gram) / gram.shape[-1]


def constant(gram: jax.Array, *, weights: jax.Array | Sequence[float]
             ) -> jax.Array:
  """Constant: fixed, user-given weights (TorchJD's ``Constant``).

  The update is the gradient of the weighted loss ``Σ_k w_k ℓ_k``. As a
  transformation this is :func:`osgd_jax.weighted_sum` with a vector.

  Args:
    gram: ``(K, K)``; only K is read.
    weights: ``(K,)`` the weights.

  Returns:
    ``(K,)`` ``weights``, in the Gram matrix's dtype.

  Raises:
    ValueError: ``weights`` is not of shape ``(K,)``.

  Example:
    >>> import jax.numpy as jnp
    >>> constant(jnp.eye(2), weights=[0.5, 2.0]).tolist()
    [0.5, 2.0]
  """
  k = gram.shape[-1]
  if np.shape(weights) != (k,):
    raise ValueError(
        f"constant got weights of shape {np.shape(weights)}, but the"
        f" gradients have K={k} exits; pass one weight per exit, shape ({k},).")
  return jnp.asarray(weights, gram.dtype)


def random_weighting(gram: jax.Array, *, key: jax.Array) -> jax.Array:
  """Random weighting: ``w = softmax(z)``, ``z ~ N(0, I_K)``, fresh every step.

  Lin et al.'s random weighting of the gradients (their Algorithm 2; TorchJD's
  ``Random``): positive weights summing to 1, drawn at every step without
  looking at the gradients. A litmus test for multi-task methods: a method
  that does not beat it has not shown what its weighting adds.

  Args:
    gram: ``(K, K)``; only K is read.
    key: a PRNG key.

  Returns:
    ``(K,)`` positive weights on the simplex.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> w = random_weighting(jnp.eye(3), key=jax.random.key(0))
    >>> bool(jnp.all(w > 0)), round(float(w.sum()), 6)
    (True, 1.0)

  References:
    Lin, Ye, Xu, Shi & Zhang, *Reasonable Effectiveness of Random Weighting:
    A Litmus Test for Multi-Task Learning*, TMLR 2022.
    https://arxiv.org/abs/2111.10603
  """
  z = jax.random.normal(key, gram.shape[-1:], gram.dtype)
  return jax.nn.softmax(z)


def imtl_g(gram: jax.Array) -> jax.Array:
  """IMTL-G: the update whose projections on every unit gradient are equal.

  Impartial multi-task learning (gradient part) looks for ``u = wᵀ G`` with
  ``Σ w = 1`` and ``⟨u, g_k/‖g_k‖⟩`` the same for every k, so that no exit
  is favoured: ``M w ∝ d`` with ``d_k = ‖g_k‖``. In the generalisation of
  Quinton & Rey (TorchJD's ``IMTLG``), which also covers linearly dependent
  gradients, ``w = M⁺ d / Σ(M⁺ d)``, with ``M⁺`` the pseudo-inverse (its
  eigenvalues at or below ``K·eps·λ_max`` counted as zero). The weights are 0
  where ``Σ(M⁺ d)`` is zero to rounding, relative to ``Σ|M⁺ d|``. When the
  nonzero gradients are linearly independent, ``M⁺ d`` is computed in the
  basis ``g_k/‖g_k‖``, exact for norms from 1e-8 to 1e8 (TorchJD's pinv of M
  is not); linearly dependent gradients of very different norms remain
  ill-conditioned.

  Invariance: scaling gradient k by ``c_k > 0`` leaves the line of u
  unchanged; its size, and even its sign, follow the normalisation
  ``Σ w = 1``, which the scales change.

  Args:
    gram: ``(K, K)``.

  Returns:
    ``(K,)`` weights summing to 1 (or 0).

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [0.0, 3.0]])
    >>> [round(v, 4) for v in (imtl_g(g @ g.T) @ g).tolist()]   # equal cosines
    [0.75, 0.75]

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, *Towards Impartial
    Multi-task Learning*, ICLR 2021. https://openreview.net/forum?id=IMPnRXEWpvr
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024.
    https://arxiv.org/abs/2406.16232
  """
  # When the nonzero rows are independent, M⁺ d = S⁻¹ C⁺ 1 for M = S C S,
  # S = diag(‖g_k‖), C the cosines: exact, without squaring the rows' scales
  # into the condition number (norms from 1e-8 to 1e8 would leave nothing
  # of M's small eigenvalues). Otherwise (S C S)⁺ ≠ S⁻¹ C⁺ S⁻¹, and M⁺ d
  # is formed from M itself.
  norms, corr = gram_lib.gram_statistics(gram)
  pinv_apply = lambda lam, vec, keep, x: vec @ (
      jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0) * (vec.T @ x))
  lam_c, vec_c, keep_c = _psd_eigh(corr)
  rows = norms > 0
  equilibrated = pinv_apply(lam_c, vec_c, keep_c, rows.astype(gram.dtype)
                            ) * gram_lib.safe_inverse(norms)
  lam, vec, keep = _psd_eigh(gram)
  direct = pinv_apply(lam, vec, keep, norms)
  v = jnp.where(keep_c.sum() == rows.sum(), equilibrated, direct)
  total = v.sum()
  degenerate = jnp.abs(total) <= (
      gram.shape[-1] * jnp.finfo(gram.dtype).eps * jnp.abs(v).sum())
  return jnp.where(degenerate, 0.0, v / jnp.where(degenerate, 1.0, total))


#: The ``scale_mode`` values of :func:`aligned_mtl`.
ALIGNED_MTL_SCALE_MODES = ("min", "median", "rmse")


def aligned_mtl(gram: jax.Array, *,
                pref_vector: jax.Array | Sequence[float] | None = None,
                scale_mode: str = "min") -> jax.Array:
  """Aligned-MTL: the preference-weighted sum of aligned (orthogonal) gradients.

  Aligned-MTL replaces G by ``Ĝ = √λ · U Vᵀ`` (from the SVD ``G = U Σ Vᵀ``
  over the nonzero singular values), whose rows are orthogonal with equal
  norms ``√λ``: the gradients' conflicts and dominance removed, the condition
  number 1. The update is ``pᵀ Ĝ = wᵀ G`` with ``w = B p``,
  ``B = √λ · V_M Λ^{-1/2} V_Mᵀ`` on the nonzero eigenpairs of ``M``
  (``B = I`` when M is 0), and ``λ`` the smallest nonzero eigenvalue of M
  (``"min"``, the paper's), their median (``"median"``, the lower one) or
  their mean (``"rmse"``, the authors' code). Like TorchJD's, it works
  from the eigenpairs of M, whose small ones are known to ``eps`` times the
  largest: with norms spanning 1e-8…1e8, ``"median"`` and ``"rmse"`` lift
  such eigenvectors to the largest scale (about 1e-4 relative error in x64).

  Args:
    gram: ``(K, K)``.
    pref_vector: ``(K,)`` preferences p; ``None``: ``1/K`` each.
    scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.

  Returns:
    ``(K,)`` weights.

  Raises:
    ValueError: an unknown ``scale_mode`` or a ``pref_vector`` not of shape
      ``(K,)``.

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.asarray([[2.0, 0.0], [0.0, 1.0]])
    >>> [round(v, 4) for v in (aligned_mtl(g @ g.T) @ g).tolist()]
    [0.5, 0.5]

  References:
    Senushkin, Patakin, Kuznetsov & Konushin, *Independent Component
    Alignment for Multi-Task Learning*, CVPR 2023.
    https://arxiv.org/abs/2305.19000
  """
  if scale_mode not in ALIGNED_MTL_SCALE_MODES:
    raise ValueError(
        f"aligned_mtl: scale_mode must be one of {ALIGNED_MTL_SCALE_MODES},"
        f" got {scale_mode!r}.")
  p = _preference(gram, pref_vector, "aligned_mtl")
  k = gram.shape[-1]
  lam, vec, nonzero = _psd_eigh(gram)
  rank = nonzero.sum()
  kept = jnp.where(nonzero, lam, 0.0)
  if scale_mode == "min":
    scale = jnp.min(jnp.where(nonzero, lam, jnp.inf))
  elif scale_mode == "median":
    # eigh sorts ascending, so the nonzero eigenvalues are the last `rank`.
    scale = lam[jnp.clip(k - rank + (rank - 1) // 2, 0, k - 1)]
  else:
    scale = kept.sum() / jnp.maximum(rank, 1)
  inv_sqrt = jnp.where(nonzero, jax.lax.rsqrt(jnp.where(nonzero, lam, 1.0)),
                       0.0)
  balance = jnp.sqrt(jnp.where(rank > 0, scale, 1.0)) * (
      (vec * inv_sqrt) @ vec.T)
  balance = jnp.where(rank > 0, balance, jnp.eye(k, dtype=gram.dtype))
  return balance @ p


def krum(gram: jax.Array, *, n_byzantine: int, n_selected: int = 1
         ) -> jax.Array:
  """Krum: the gradient(s) closest to their neighbours, robust to outliers.

  Each gradient's score is the sum of its Euclidean distances to its
  ``K − f − 2`` nearest other gradients (``f = n_byzantine``, the number of
  gradients that may be arbitrary); the ``n_selected`` lowest-scored ones are
  averaged (Multi-Krum; one: Krum). Distances come from the Gram matrix,
  ``‖g_i − g_j‖² = M_ii + M_jj − 2 M_ij``. Blanchard et al. sum *squared*
  distances; TorchJD's ``Krum``, which this matches, sums the distances. Ties
  go to the lower index.

  Args:
    gram: ``(K, K)``, with ``K ≥ n_byzantine + 3`` and ``K ≥ n_selected``.
    n_byzantine: f, the number of gradients that may be adversarial, ≥ 0.
    n_selected: how many gradients to average, ≥ 1.

  Returns:
    ``(K,)`` weights: ``1/n_selected`` on the selected exits, 0 elsewhere.

  Raises:
    ValueError: K is too small for ``n_byzantine`` or ``n_selected``.

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [1.1, 0.0], [0.9, 0.1], [-9.0, 5.0]])
    >>> krum(g @ g.T, n_byzantine=1).tolist()
    [1.0, 0.0, 0.0, 0.0]

  References:
    Blanchard, El Mhamdi, Guerraoui & Stainer, *Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent*, NeurIPS 2017.
    https://papers.nips.cc/paper/6617
  """
  k = gram.shape[-1]
  if k < n_byzantine + 3 or k < n_selected:
    raise ValueError(
        f"krum with n_byzantine={n_byzantine} and n_selected={n_selected}"
        f" needs K ≥ {max(n_byzantine + 3, n_selected)} exits, got K={k};"
        " lower n_byzantine or n_selected.")
  sq = jnp.diagonal(gram)
  dist = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0))
  # Its own distance, 0, sorts first in every row; drop it.
  nearest = jnp.sort(dist, axis=-1)[:, 1:k - n_byzantine - 1]
  scores = nearest.sum(axis=-1)
  selected = jnp.argsort(scores, stable=True)[:n_selected]
  return jax.nn.one_hot(selected, k, dtype=gram.dtype).sum(0) / n_selected


def dualproj(gram: jax.Array, *,
             pref_vector: jax.Array | Sequence[float] | None = None,
             max_iter: int = 100,
             tol: float | jax.Array = DEFAULT_QP_TOL) -> jax.Array:
  """DualProj: the mean gradient, projected onto the dual cone of all of them.

  The preference-weighted sum ``pᵀ G`` (the mean by default) is projected
  onto ``{v : ⟨v, g_j⟩ ≥ 0 for all j}``, the directions that conflict with
  no exit, as GEM projects a gradient against its episodic memory (its
  Equation 11). The projection is ``(p + λ)ᵀ G`` with ``λ ≥ 0`` solving
  ``min_{λ ≥ 0} ½ λᵀMλ + λᵀ M p``, solved exactly by an active-set method in
  the basis ``g_k / ‖g_k‖`` (as :func:`upgrad`'s projections; TorchJD adds
  ``1e-4 · I`` to the trace-normalised M instead). Zero rows constrain
  nothing.

  Properties: non-conflicting; non-conflicting gradients give ``pᵀ G``
  unchanged; invariant to the exits' order (with uniform p).

  Args:
    gram: ``(K, K)``.
    pref_vector: ``(K,)`` preferences p; ``None``: ``1/K`` each.
    max_iter: cap on the active-set iterations.
    tol: relative tolerance of the optimality test.

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [-1.0, 1.0]])
    >>> [round(v, 4) for v in (dualproj(g @ g.T) @ g).tolist()]
    [0.0, 0.5]

  References:
    Lopez-Paz & Ranzato, *Gradient Episodic Memory for Continual Learning*,
    NeurIPS 2017. https://arxiv.org/abs/1706.08840
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024.
    https://arxiv.org/abs/2406.16232
  """
  norms, corr = gram_lib.gram_statistics(gram)
  return _project_onto_dual_cone(
      norms, corr, _preference(gram, pref_vector, "dualproj"),
      max_iter=max_iter, tol=tol)


def gradvac(gram: jax.Array, *, target: jax.Array, key: jax.Array,
            beta: float | jax.Array = 0.5, eps: float | jax.Array = 1e-8
            ) -> tuple[jax.Array, jax.Array]:
  """Gradient Vaccine: raises every pair's cosine to its running target.

  As :func:`pcgrad`, every task (exit) i visits the others j in a random
  order, starting from ``g_i^GV = g_i``. With ``φ_ij`` the cosine of
  ``g_i^GV`` and the original ``g_j``, and ``φ̂_ij`` its target, when
  ``φ_ij < φ̂_ij`` a multiple of ``g_j`` is added that brings the cosine up
  to ``φ̂_ij``:

  ``g_i^GV += ‖g_i^GV‖ (φ̂_ij √(1−φ_ij²) − φ_ij √(1−φ̂_ij²))
  / (‖g_j‖ √(1−φ̂_ij²)) · g_j``

  (the paper's Equation 3, with ``eps`` added to this denominator and to the
  cosine's, as TorchJD's ``GradVac`` does); then the target follows the
  cosine, ``φ̂_ij ← (1−β) φ̂_ij + β φ_ij``. The update is ``Σ_i g_i^GV``.
  Targets start at 0, where the first step is PCGrad-like. Unlike the other
  weightings this one returns its new state too.

  Args:
    gram: ``(K, K)``.
    target: ``(K, K)`` the targets ``φ̂`` (row i: task i's targets).
    key: a PRNG key that draws the visiting orders.
    beta: the EMA rate of the targets, in [0, 1].
    eps: added to the denominators.

  Returns:
    ``(weights, new_target)``: ``(K,)`` and ``(K, K)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [-1.0, 1.0]])
    >>> w, target = gradvac(g @ g.T, target=jnp.zeros((2, 2)),
    ...                     key=jax.random.key(0))
    >>> [round(v, 4) for v in (w @ g).tolist()]   # as PCGrad at target 0
    [0.5, 1.5]
    >>> round(float(target[0, 1]), 4)   # ½ · cos(g_1, g_2)
    -0.3536

  References:
    Wang, Tsvetkov, Firat & Cao, *Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models*,
    ICLR 2021. https://arxiv.org/abs/2010.05874
  """
  k = gram.shape[-1]
  orders = pcgrad_orders(key, k)
  target = jnp.asarray(target, gram.dtype)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  tasks = jnp.arange(k)

  def visit(position, carry):
    coeff, target = carry
    j = orders[:, position]                        # task i's next other task
    cg = coeff @ gram                              # row i: ⟨g_i^GV, g_m⟩
    dots = jnp.take_along_axis(cg, j[:, None], axis=1)[:, 0]
    norm_i = jnp.sqrt(jnp.maximum(jnp.sum(cg * coeff, axis=-1), 0.0))
    norm_j = norms[j]
    phi = dots / (norm_i * norm_j + eps)
    phi_hat = target[tasks, j]
    other = j != tasks
    sin_phi = jnp.sqrt(jnp.maximum(1.0 - phi * phi, 0.0))
    sin_hat = jnp.sqrt(jnp.maximum(1.0 - phi_hat * phi_hat, 0.0))
    step = norm_i * (phi_hat * sin_phi - phi * sin_hat) / (
        norm_j * sin_hat + eps)
    step = jnp.where(other & (phi < phi_hat), step, 0.0)
    coeff = coeff + step[:, None] * jax.nn.one_hot(j, k, dtype=gram.dtype)
    new_hat = jnp.where(other, (1.0 - beta) * phi_hat + beta * phi, phi_hat)
    return coeff, target.at[tasks, j].set(new_hat)

  coeff, target = jax.lax.fori_loop(
      0, k, visit, (jnp.eye(k, dtype=gram.dtype), target))
  return coeff.sum(axis=0), target


def cagrad(gram: jax.Array, *, c: float | jax.Array = 0.4,
           norm_eps: float | jax.Array = 1e-4, bisections: int = 40,
           max_iter: int = 100, tol: float | jax.Array = DEFAULT_QP_TOL
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
  :func:`mgda`'s (a constant ``κ (1ᵀw)²`` and ``(bᵀw)(1ᵀw)`` in place of
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
    >>> [round(v, 4) for v in (cagrad(g @ g.T, c=0.5) @ g).tolist()]
    [0.75, 0.75]

  References:
    Liu, Liu, Jin, Stone & Liu, *Conflict-Averse Gradient Descent for
    Multi-task Learning*, NeurIPS 2021. https://arxiv.org/abs/2110.14048
  """
  k = gram.shape[-1]
  dtype = gram.dtype
  mean_w = jnp.full((k,), 1.0 / k, dtype)
  m = gram * gram_lib.safe_inverse(jnp.trace(gram))
  b = m @ mean_w                                   # ⟨g_k, g_0⟩
  g0_sq = jnp.maximum(mean_w @ b, 0.0)
  radius = jnp.asarray(c, dtype) * jnp.sqrt(g0_sq)  # c ‖g_0‖
  positive = radius > 0
  ones = jnp.ones((k, k), dtype)

  def inner(t):
    # min over the simplex of ½ wᵀ m w + a bᵀw, a = t / radius, made
    # homogeneous: on 1ᵀw = 1, bᵀw = (bᵀw)(1ᵀw) and κ = κ (1ᵀw)²; κ = 2a²‖g_0‖²
    # makes the form positive definite there (⟨b, w⟩ ≤ ‖g_0‖ ‖g_w‖).
    a = t * gram_lib.safe_inverse(radius)
    q = (m + a * (b[:, None] + b[None, :]) + 2.0 * a * a * g0_sq * ones)
    w = mgda(q, max_iter=max_iter, tol=tol)
    return w, w @ (m @ w)

  t_hi = jnp.sqrt(jnp.max(jnp.diagonal(m)))
  log_hi = jnp.log(jnp.where(t_hi > 0, t_hi, 1.0))

  def bisect(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    t = jnp.exp(mid)
    _, q = inner(t)
    # F's envelope in t decreases while ‖g_w(t)‖ > t.
    return jnp.where(q > t * t, mid, lo), jnp.where(q > t * t, hi, mid)

  lo, hi = jax.lax.fori_loop(0, bisections, bisect,
                             (log_hi + jnp.log(jnp.asarray(1e-8, dtype)),
                              log_hi))
  w, q = inner(jnp.exp(0.5 * (lo + hi)))
  norm_w = jnp.sqrt(jnp.maximum(q, 0.0))
  found = positive & (norm_w >= norm_eps)
  weights = mean_w + radius * gram_lib.safe_inverse(norm_w) * w
  # c = 0 or g_0 = 0: the ball is the point g_0, the mean.
  return jnp.where(found, weights, jnp.where(positive, 0.0, mean_w))


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


def config(gram: jax.Array, *,
           pref_vector: jax.Array | Sequence[float] | None = None
           ) -> jax.Array:
  """ConFIG: the conflict-free direction with equal cosines to every gradient.

  The direction v solves ``Ĝ v = p`` in the least-squares sense of minimum
  norm (``v = Ĝ⁺ p``, Ĝ the gradients scaled to unit norm, p = 1 by
  default: equal cosines with every gradient, hence none conflicts), and the
  update is ``u = (Σ_i ⟨g_i, v̂⟩) v̂`` with ``v̂ = v / ‖v‖``: the unit
  direction, as long as the gradients' summed projections on it. Exact from
  the Gram matrix: ``v = Σ_k β_k ĝ_k`` with ``β = C⁺ p`` for the cosines C.
  TorchJD's ``ConFIG``; 0 when v is.

  Properties: non-conflicting when ``Ĝ v = p`` is solvable with ``p > 0``
  (in particular for linearly independent gradients); invariant to the
  exits' order (uniform p) and, in direction, to each gradient's scale.
  Numerics: v is as ill-conditioned as Ĝ, and the Gram matrix squares that
  condition number (TorchJD takes the pseudo-inverse of Ĝ itself): in
  float32, gradients whose cosines are within about 1e-3 of ±1 give an
  inaccurate v, and the update may then conflict.

  Args:
    gram: ``(K, K)``.
    pref_vector: ``(K,)`` the target cosines' proportions; ``None``: ones.

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [0.0, 2.0]])
    >>> [round(v, 4) for v in (config(g @ g.T) @ g).tolist()]
    [1.5, 1.5]

  References:
    Liu, Chu, Thuerey, *ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks*, ICLR 2025. https://arxiv.org/abs/2408.11104
  """
  k = gram.shape[-1]
  p = (jnp.ones((k,), gram.dtype) if pref_vector is None
       else _preference(gram, pref_vector, "config"))
  norms, corr = gram_lib.gram_statistics(gram)
  lam, vec, keep = _psd_eigh(corr)
  beta = vec @ (jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
                * (vec.T @ p))
  c_beta = corr @ beta
  v_sq = beta @ c_beta                          # ‖v‖²
  length_times_norm = norms @ c_beta            # Σ_i ⟨g_i, v⟩
  return (length_times_norm * gram_lib.safe_inverse(v_sq)) * beta * (
      gram_lib.safe_inverse(norms))


def modo(gram: jax.Array, *, previous: jax.Array,
         gamma: float | jax.Array = 0.1, rho: float | jax.Array = 0.1
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
    >>> w = modo(jnp.diag(jnp.asarray([1.0, 3.0])), previous=jnp.full(2, 0.5))
    >>> [round(v, 4) for v in w.tolist()]
    [0.55, 0.45]

  References:
    Chen, Fernando, Ying & Chen, *Three-Way Trade-Off in Multi-Objective
    Learning: Optimization, Generalization and Conflict-Avoidance*, JMLR 25,
    2024. https://arxiv.org/abs/2305.20057
  """
  previous = jnp.asarray(previous, gram.dtype)
  return project_onto_simplex(
      previous - gamma * (gram @ previous + rho * previous))


def sdmgrad(gram: jax.Array, *, previous: jax.Array,
            pref_vector: jax.Array | Sequence[float] | None = None,
            lr: float | jax.Array = 10.0, momentum: float | jax.Array = 0.5,
            n_iter: int = 20, lambda_: float | jax.Array = 0.3
            ) -> tuple[jax.Array, jax.Array]:
  """SDMGrad: MGDA's weights pulled towards a preferred direction.

  Stochastic direction-oriented multi-objective gradient descent minimises
  ``½‖(w + λ w̃)ᵀ G‖²`` over w on the simplex, w̃ the preferences (``1/K``,
  the mean), by ``n_iter`` steps of projected gradient descent with
  momentum from the previous step's w, on M scaled by the squared mean
  gradient norm; the update is ``(w + λ w̃)ᵀ G / (1 + λ)``. As for
  :func:`modo`, the paper's M comes from two mini-batches; here it is
  ``G Gᵀ``. TorchJD's ``SDMGradWeighting``, with its defaults (LibMTL's).

  Args:
    gram: ``(K, K)``.
    previous: ``(K,)`` the previous step's w (``1/K`` at first).
    pref_vector: ``(K,)`` the preferences w̃; ``None``: ``1/K`` each.
    lr: the inner step size, > 0.
    momentum: the inner momentum, in [0, 1).
    n_iter: the inner steps.
    lambda_: the pull towards w̃, ≥ 0.

  Returns:
    ``(weights, w)``: the ``(K,)`` weights of the update and the new w.

  Example:
    >>> import jax.numpy as jnp
    >>> w, _ = sdmgrad(jnp.eye(2), previous=jnp.full(2, 0.5))
    >>> [round(v, 4) for v in w.tolist()]
    [0.5, 0.5]

  References:
    Xiao, Ban & Ji, *Direction-oriented Multi-objective Learning: Simple and
    Provable Stochastic Algorithms*, NeurIPS 2023.
    https://arxiv.org/abs/2305.18409
  """
  target = _preference(gram, pref_vector, "sdmgrad")
  scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0)))
  a = gram / (scale * scale + 1e-8)

  def step(_, carry):
    w, velocity = carry
    velocity = momentum * velocity + a @ (w + lambda_ * target)
    return project_onto_simplex(w - lr * velocity), velocity

  w, _ = jax.lax.fori_loop(
      0, n_iter, step,
      (jnp.asarray(previous, gram.dtype), jnp.zeros_like(target)))
  return (w + lambda_ * target) / (1.0 + lambda_), w


def fairgrad(gram: jax.Array, *, alpha: float | jax.Array = 1.0,
             max_iter: int = 50) -> jax.Array:
  """FairGrad: α-fair weights, the solution of ``M w = w^{-1/α}``, ``w > 0``.

  Fair resource allocation in multi-task learning: the update ``d = wᵀ G``
  maximises the α-fair utility of the tasks' improvements ``⟨g_k, d⟩``,
  whose optimality condition is ``⟨g_k, d⟩ = w_k^{-1/α}`` for every k (the
  paper's Equation 4). α = 1 is proportional fairness (Nash-MTL's
  bargaining solution); α → ∞ approaches max-min fairness (MGDA-like);
  α = 0 gives the mean. Solved by Newton's method on ``log w``, with steps
  at most 1 in ``log w`` (TorchJD uses SciPy's bounded least squares). The
  equation has no positive solution when the gradients can be combined
  positively into 0, e.g. with a zero gradient: its weight then grows at
  every Newton step (finite, and it multiplies a zero gradient).

  Args:
    gram: ``(K, K)``.
    alpha: the fairness parameter, ≥ 0.
    max_iter: the Newton steps.

  Returns:
    ``(K,)`` positive weights.

  Example:
    >>> import jax.numpy as jnp
    >>> w = fairgrad(jnp.diag(jnp.asarray([1.0, 4.0])), alpha=1.0)
    >>> [round(v, 4) for v in w.tolist()]   # w_k² M_kk = 1
    [1.0, 0.5]

  References:
    Ban & Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024.
    https://arxiv.org/abs/2402.15638
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


def pcd(gram: jax.Array, *, scales: jax.Array | None = None,
        tau: float | Sequence[float] | jax.Array = 0.02, max_iter: int = 100,
        tol: float | jax.Array = DEFAULT_QP_TOL) -> jax.Array:
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
  (:func:`osgd_jax.pcd` keeps it).

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
    >>> [round(v, 4) for v in (pcd(g @ g.T, tau=0.0) @ g).tolist()]
    [0.7071, 0.7071]

  References:
    Varam et al., *Not All Objectives Are Born Equal: Priority-Constrained
    Descent for Hierarchical Multi-Objective Optimization*, TMLR 2026.
    https://openreview.net/forum?id=HT01yGHLEt
  """
  k = gram.shape[-1]
  dtype = gram.dtype
  first = jax.nn.one_hot(0, k, dtype=dtype)
  if k == 1:
    return jnp.ones((1,), dtype)
  sq_norms = jnp.diagonal(gram)
  if scales is None:
    scales = gram_lib.safe_inverse(jnp.sqrt(jnp.maximum(sq_norms, 0.0)))
  scales = jnp.asarray(scales, dtype)
  taus = jnp.broadcast_to(jnp.asarray(tau, dtype).reshape(-1), (k - 1,))
  normal = gram * scales[:, None] * scales[None, :]
  sec = normal[1:, 1:]
  b = taus * jnp.diagonal(sec) - normal[1:, 0]
  mu = nnqp.solve_nonnegative_qp(sec, -b, jnp.diagonal(sec) > 0,
                                 max_iter=max_iter, tol=tol)
  # The dual is unbounded when the constraints cannot hold together; the
  # solver then stops at a point whose constraints are violated.
  scale = jnp.max(jnp.diagonal(normal))
  feasible = jnp.all(sec @ mu - b >= -1e-6 * scale)
  w = jnp.where(feasible, jnp.concatenate([jnp.ones((1,), dtype), mu]), first)
  direction_sq = w @ (normal @ w)
  magnitude = (jnp.abs(w) @ jnp.sqrt(jnp.maximum(jnp.diagonal(normal), 0.0))
               ) ** 2
  kept = (sq_norms[0] > 0) & (
      direction_sq > 10.0 * jnp.finfo(dtype).eps * magnitude)
  rescale = jnp.sqrt(sq_norms[0] * gram_lib.safe_inverse(direction_sq))
  return jnp.where(kept, w * scales * rescale, 0.0)


def nash_mtl(gram: jax.Array, *, max_norm: float | jax.Array = 1.0,
             max_iter: int = 50) -> jax.Array:
  """Nash-MTL: the Nash bargaining solution, ``M̄ α = 1/α``, norm-clipped.

  The tasks bargain over the update ``d = αᵀ G``; the Nash bargaining
  solution is ``⟨g_k, d⟩ = 1/α_k`` for every k, on M scaled to unit
  Frobenius norm (``M̄ = M / ‖M‖_F``, the authors' normalisation), and the
  update is scaled down to norm ``max_norm`` if longer (0: no clipping).
  The paper (and TorchJD's ``NashMTL``, through cvxpy) approaches α by a
  few concave-convex steps per update; here the equation is solved by
  :func:`fairgrad`'s Newton method (it is FairGrad's with α = 1), so the
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
    >>> [round(v, 4) for v in (nash_mtl(g @ g.T) @ g).tolist()]   # equal gains
    [0.2031, 0.2031]

  References:
    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya,
    *Multi-Task Learning as a Bargaining Game*, ICML 2022.
    https://arxiv.org/abs/2202.01017
  """
  frobenius = jnp.sqrt(jnp.sum(gram * gram))
  alpha = fairgrad(gram * gram_lib.safe_inverse(frobenius), alpha=1.0,
                   max_iter=max_iter)
  return clip_update_norm(gram, alpha, max_norm)


def clip_update_norm(gram: jax.Array, weights: jax.Array,
                     max_norm: float | jax.Array) -> jax.Array:
  """``weights`` scaled so that ``‖wᵀ G‖ ≤ max_norm`` (0: unchanged).

  Example:
    >>> import jax.numpy as jnp
    >>> w = clip_update_norm(jnp.eye(2), jnp.asarray([3.0, 4.0]), 1.0)
    >>> [round(v, 4) for v in w.tolist()]
    [0.6, 0.8]
  """
  norm = jnp.sqrt(jnp.maximum(weights @ (gram @ weights), 0.0))
  clip = (max_norm > 0) & (norm > max_norm)
  return jnp.where(clip, weights * max_norm * gram_lib.safe_inverse(norm),
                   weights)
