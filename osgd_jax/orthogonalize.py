"""Gram–Schmidt of stacked per-exit gradients, the kernel of OSGD.

For one parameter block (a leaf, or all leaves together) with per-exit
gradients ``G`` (K×N, rows ``g_k``), Gram–Schmidt in priority order gives the
components ``ĝ_1 = g_1``, ``ĝ_k = g_k − Σ_{j<k} ⟨g_k, ĝ_j⟩/‖ĝ_j‖² ĝ_j`` and
the update ``u = Σ_k ĝ_k``. Two algorithms compute it (``docs/design.md``,
"The maths"):

* :func:`gram_schmidt_weights` works on the K×K Gram matrix ``M = G Gᵀ``:
  its LDLᵀ factorisation gives weights ``w`` with ``u = wᵀ G``, so OSGD is a
  *weighting* like every other aggregator of the library (one pass over the
  gradients for M, one for the weighted sum).
* :func:`modified_gram_schmidt` works on the gradients themselves, one exit
  after another: K passes, but accurate for nearly collinear rows, whose
  Gram matrix squares the condition number.

A component that keeps at most ``tol`` of its squared norm (a zero gradient,
or one in the span of the earlier exits) is *degenerate*: it joins no basis
and adds nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from osgd_jax import gram as gram_lib

__all__ = [
  "DEFAULT_TOL",
  "UNROLL_MAX_EXITS",
  "gram_schmidt_weights",
  "ldl_weights",
  "modified_gram_schmidt",
]

#: Default relative tolerance on ‖ĝ_k‖² / ‖g_k‖². A component keeping less
#: than this fraction of its squared norm (about 0.3% of its norm) is treated
#: as lying in the span of earlier exits: in float32 the Gram form cannot
#: resolve finer residuals of nearly collinear rows, since cond(M) = cond(G)².
DEFAULT_TOL = 1e-5

#: Up to this many exits, the K×K algebra is unrolled at trace time.
UNROLL_MAX_EXITS = 16


def _factor_unrolled(
  corr: jax.Array, tol, rank
) -> tuple[dict[tuple[int, int], jax.Array], list[jax.Array]]:
  """:func:`_factor_loop`, written entry by entry for a static small K.

  Returns the entries of L below the diagonal as ``{(i, j): (...,)}`` and
  the pivots as a list of ``(...,)`` arrays. Kept as separate arrays, never
  stacked into a matrix: XLA fuses elementwise operations on them into a few
  kernels, whereas a stacked (K, K) matrix would become one kernel that
  evaluates the whole factorisation again for each of its K² entries. The
  loop form runs each step's kernels one after another, which costs more
  than the O(K³) arithmetic for a small K.
  """
  num_exits = corr.shape[-1]
  lower: dict[tuple[int, int], jax.Array] = {}
  weighted: dict[tuple[int, int], jax.Array] = {}  # L_jm · d_m
  pivots = []
  kept = jnp.zeros(corr.shape[:-2], jnp.int32)
  for j in range(num_exits):
    column = {}
    for i in range(j, num_exits):
      entry = corr[..., i, j]
      for m in range(j):
        entry = entry - lower[i, m] * weighted[j, m]
      column[i] = entry
    keep = (column[j] > tol) & (kept < rank)
    kept = kept + keep.astype(jnp.int32)
    pivot = jnp.where(keep, column[j], 0.0)
    inverse = 1.0 / jnp.where(keep, column[j], 1.0)
    pivots.append(pivot)
    for i in range(j + 1, num_exits):
      lower[i, j] = jnp.where(keep, column[i] * inverse, 0.0)
      weighted[i, j] = lower[i, j] * pivot
  return lower, pivots


def _factor_loop(corr: jax.Array, tol, rank) -> tuple[jax.Array, jax.Array]:
  """Unit lower-triangular L and pivots d with ``corr = L diag(d) Lᵀ``.

  Degenerate pivots (``d_j ≤ tol``, or any after ``rank`` kept ones) become
  0 and their column of L below the diagonal 0. A ``lax`` loop over the
  columns keeps the program small for a large K.
  """
  num_exits = corr.shape[-1]
  rows = jnp.arange(num_exits)

  # Column j of L and pivot d_j from the columns before it.
  def column_step(j, carry):
    lower, pivots, kept = carry
    weighted_row = jnp.take(lower, j, axis=-2) * pivots  # only i < j non-zero
    # Elementwise products and sums rather than einsum: a tiny dot_general
    # costs far more to compile than to run.
    column = jnp.take(corr, j, axis=-1) - jnp.sum(
      lower * weighted_row[..., None, :], axis=-1
    )
    pivot = jnp.take(column, j, axis=-1)
    keep = (pivot > tol) & (kept < rank)
    new_column = jnp.where(
      keep[..., None] & (rows > j),
      column / jnp.where(keep, pivot, 1.0)[..., None],
      (rows == j).astype(corr.dtype),
    )
    lower = jnp.where(rows == j, new_column[..., :, None], lower)
    pivots = jnp.where(
      rows == j, jnp.where(keep, pivot, 0.0)[..., None], pivots
    )
    return lower, pivots, kept + keep.astype(jnp.int32)

  lower = jnp.broadcast_to(jnp.eye(num_exits, dtype=corr.dtype), corr.shape)
  pivots = jnp.zeros(corr.shape[:-1], corr.dtype)
  kept = jnp.zeros(corr.shape[:-2], jnp.int32)
  lower, pivots, _ = jax.lax.fori_loop(
    0, num_exits, column_step, (lower, pivots, kept)
  )
  return lower, pivots


def _back_substitute_unrolled(lower, coeff, scale, inv_scale) -> jax.Array:
  """Solves ``Lᵀ w = coeff`` entry by entry, from the last exit to the first.

  ``w_j = coeff_j − Σ_{k>j} L_kj w_k`` with ``L_kj = L'_kj s_k / s_j``, where
  ``lower`` holds the entries of L' (:func:`_factor_unrolled`) and ``coeff``,
  ``scale``, ``inv_scale`` are ``(..., K)``.
  """
  num_exits = coeff.shape[-1]
  weights = [None] * num_exits
  for j in reversed(range(num_exits)):
    w_j = coeff[..., j]
    for k in range(j + 1, num_exits):
      entry = lower[k, j] * scale[..., k] * inv_scale[..., j]
      w_j = w_j - entry * weights[k]
    weights[j] = w_j
  return jnp.stack(weights, axis=-1)


def _back_substitute_loop(lower, coeff, scale, inv_scale) -> jax.Array:
  """:func:`_back_substitute_unrolled` for ``(..., K, K)`` L', as a loop.

  ``w_j = coeff_j − Σ_{k>j} L_kj w_k``, a ``lax`` loop from the last exit to
  the first; cheaper to compile than a batched triangular-solve call.
  """
  num_exits = coeff.shape[-1]
  lower = lower * scale[..., :, None] * inv_scale[..., None, :]
  rows = jnp.arange(num_exits)

  def back_step(i, weights):
    j = num_exits - 1 - i
    w_j = jnp.take(coeff, j, axis=-1) - jnp.sum(
      jnp.take(lower, j, axis=-1) * weights, axis=-1
    )
    return jnp.where(rows == j, w_j[..., None], weights)

  return jax.lax.fori_loop(0, num_exits, back_step, jnp.zeros_like(coeff))


def ldl_weights(
  gram: jax.Array,
  *,
  tol: float | jax.Array,
  rescale: bool,
  rank: int | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Gram–Schmidt weights from a Gram matrix, rows taken in index order.

  Factorises ``M = L D Lᵀ`` after equilibration ``C = S⁻¹ M S⁻¹`` with
  ``S = diag(√M_kk)``, which makes the pivots scale-free: ``D_kk`` is the
  fraction of ‖g_k‖² left after removing the earlier components. A pivot with
  ``D_kk ≤ tol`` is degenerate; its column of L is zeroed so it joins no basis
  and it contributes nothing to the sum. So is every pivot after ``rank``
  kept ones: gradients of a tensor of n entries span at most n dimensions,
  so with K > n exits the later ones lie in the span of the kept ones
  exactly, whatever float32 rounding leaves of their pivots.

  Up to :data:`UNROLL_MAX_EXITS` exits the algebra is unrolled entry by
  entry at trace time; beyond, it runs as ``lax`` loops over the exits.
  Arguments and results are those of :func:`ldl_weights`.
  """
  num_exits = gram.shape[-1]
  rank = num_exits if rank is None else rank
  diag = jnp.diagonal(gram, axis1=-2, axis2=-1)
  # A zero row (an exit that does not reach this tensor) must leave the
  # derivative finite: safe_sqrt has derivative 0 at 0, √ has ∞.
  scale = gram_lib.safe_sqrt(diag)
  inv_scale = gram_lib.safe_inverse(scale)
  corr = gram * inv_scale[..., :, None] * inv_scale[..., None, :]
  unrolled = num_exits <= UNROLL_MAX_EXITS
  if unrolled:
    lower, pivot_list = _factor_unrolled(corr, tol, rank)
    pivots = jnp.stack(pivot_list, axis=-1)
  else:
    lower, pivots = _factor_loop(corr, tol, rank)

  keep = pivots > 0
  if rescale:
    coeff = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, pivots, 1.0)), 0.0)
  else:
    coeff = keep.astype(gram.dtype)
  # u = coeffᵀ Ĝ = coeffᵀ L⁻¹ G, so w solves Lᵀ w = coeff, where
  # L = S L' S⁻¹ undoes the equilibration. Solving with L itself (rather than
  # w = S⁻¹ L'⁻ᵀ S coeff) keeps w exactly equal to coeff when nothing is
  # projected, e.g. K = 1 is the identity bit for bit.
  back_substitute = (
    _back_substitute_unrolled if unrolled else _back_substitute_loop
  )
  return back_substitute(lower, coeff, scale, inv_scale), pivots * diag


def gram_schmidt_weights(
  gram: jax.Array,
  *,
  order: Sequence[int] | None = None,
  tol: float | jax.Array = DEFAULT_TOL,
  rescale: bool = False,
  rank: int | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Gram–Schmidt weights from a Gram matrix, rows taken in priority order.

  :func:`ldl_weights` of the Gram matrix permuted to priority order, with
  the results permuted back to the exits' order.

  Args:
    gram: ``(..., K, K)`` Gram matrices.
    order: a permutation of ``range(K)`` listing the exits from highest to
      lowest priority; ``None`` is ``range(K)``.
    tol: relative tolerance on the squared norm of a projected component.
    rescale: scale every kept component back to the norm of its input.
    rank: at most this many components are kept (the rank the Gram
      matrix can have: the number of entries of the gradients); ``None``
      is K.

  Returns:
    ``(weights, residual_sq_norms)``, both ``(..., K)`` in the exits' order.

  Example:
    >>> import jax.numpy as jnp
    >>> gram = jnp.asarray([[1.0, 1.0], [1.0, 2.0]])  # g1 = (1, 0), g2 = (1, 1)
    >>> weights, _ = gram_schmidt_weights(gram)
    >>> [round(w, 6) for w in weights.tolist()]  # u = g1 + (g2 − g1) = g2
    [0.0, 1.0]
  """
  num_exits = gram.shape[-1]
  perm = np.arange(num_exits) if order is None else np.asarray(order)
  if np.array_equal(perm, np.arange(num_exits)):
    return ldl_weights(gram, tol=tol, rescale=rescale, rank=rank)
  permuted = jnp.take(jnp.take(gram, perm, axis=-2), perm, axis=-1)
  weights, residual_sq = ldl_weights(
    permuted, tol=tol, rescale=rescale, rank=rank
  )
  inverse = np.argsort(perm)
  return weights[..., inverse], residual_sq[..., inverse]


def _row_scale(coeff: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes a (K,) vector to broadcast against the rows of ``like``."""
  return coeff.reshape(coeff.shape + (1,) * (like.ndim - 1))


def _sum_over_groups(per_leaf: jax.Array, shared_basis: bool) -> jax.Array:
  """Sums per-leaf values over the leaves when they all share one basis."""
  if shared_basis:
    return jnp.broadcast_to(per_leaf.sum(axis=0, keepdims=True), per_leaf.shape)
  return per_leaf


def _weights_from_coefficients(
  coefficients: jax.Array, coeff: jax.Array, order: np.ndarray
) -> jax.Array:
  """The weights ``w`` with ``Σ_k coeff_k r_k = wᵀ G`` for the residuals r.

  Modified Gram–Schmidt subtracts ``coefficients[i, j] · r_j`` from row i
  for every exit j of higher priority, so ``G = (I + C) R`` and
  ``w = (I + C)⁻ᵀ coeff``. ``I + C`` is unit triangular in priority order:
  ``w_j = coeff_j − Σ_i C_ij w_i`` from the lowest priority up.
  """
  weights = jnp.zeros_like(coeff)
  for j in reversed(order.tolist()):
    w_j = coeff[..., j] - jnp.sum(coefficients[..., :, j] * weights, axis=-1)
    weights = weights.at[..., j].set(w_j)
  return weights


def modified_gram_schmidt(
  leaves: Sequence[jax.Array],
  *,
  order: Sequence[int] | None = None,
  tol: float | jax.Array = DEFAULT_TOL,
  rescale: bool = False,
  shared_basis: bool = False,
  compute_dtype: Any = jnp.float32,
  scaled_norms: bool = False,
) -> tuple[list[jax.Array], jax.Array, Any]:
  """Gram–Schmidt on the gradients themselves, one exit after another.

  Each exit's residual is made orthogonal to the residuals of the exits of
  higher priority, the inner products taken with the current residuals
  (modified Gram–Schmidt), which keeps the components accurate to about
  ``eps / ‖ĝ_k‖`` where the Gram form loses ``eps / ‖ĝ_k‖²``.

  Args:
    leaves: stacked gradients, each ``(K, *s_l)``.
    order: a permutation of ``range(K)``, the exits by priority; ``None`` is
      ``range(K)``.
    tol: relative tolerance on the squared norm of a projected component.
    rescale: scale every kept component back to the norm of its input.
    shared_basis: one basis over all leaves (``granularity="global"``)
      instead of one per leaf.
    compute_dtype: float32 or float64.
    scaled_norms: return the squared norms divided by ``4^e`` for the
      groups' scale exponents e, and ``(weights, e)`` in place of the
      weights, so that norms beyond the dtype's range are kept.

  Returns:
    ``(updates, residual_sq_norms, weights)``: the parameter-shaped sums of
    the components, one per leaf, in ``compute_dtype``; ``(G, K)`` squared
    norms ``‖ĝ_k‖²`` (zero where degenerate) and ``(G, K)`` the weights
    ``w`` with ``u = wᵀ G`` in exact arithmetic, for each of the G groups
    (one per leaf, or one).

  Example:
    >>> import jax.numpy as jnp
    >>> leaf = jnp.asarray([[1.0, 0.0], [1.0, 1.0]])
    >>> updates, residual_sq, weights = modified_gram_schmidt([leaf])
    >>> updates[0].tolist(), residual_sq.tolist(), weights.tolist()
    ([1.0, 1.0], [[1.0, 1.0]], [[0.0, 1.0]])
  """
  num_exits = leaves[0].shape[0]
  priority = np.arange(num_exits) if order is None else np.asarray(order)
  # Each group is scaled by an exact power of two first, so that squared
  # norms neither overflow nor underflow (gram.scaled_gram_matrices).
  exponents = gram_lib.scale_exponents(leaves)
  if shared_basis:
    exponents = jnp.broadcast_to(jnp.max(exponents), exponents.shape)
  residuals = [
    leaf.astype(compute_dtype)
    * gram_lib.unscale(jnp.ones((), compute_dtype), -e, degree=1)
    for leaf, e in zip(leaves, exponents, strict=True)
  ]
  sizes = [math.prod(leaf.shape[1:]) for leaf in leaves]
  ranks = jnp.asarray(
    [sum(sizes)] * len(leaves) if shared_basis else sizes, jnp.int32
  )

  def row_sq(x):
    return jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)))

  input_sq = _sum_over_groups(
    jnp.stack([row_sq(r) for r in residuals]), shared_basis
  )
  num_leaves = input_sq.shape[0]
  order_array = jnp.asarray(priority, jnp.int32)
  rank = jnp.argsort(order_array)

  def step(position, carry):
    residuals, kept_sq, coefficients, kept = carry
    exit_index = order_array[position]
    basis = [
      jax.lax.dynamic_index_in_dim(r, exit_index, 0, keepdims=False)
      for r in residuals
    ]
    basis_sq = _sum_over_groups(
      jnp.stack([jnp.sum(jnp.square(b)) for b in basis]), shared_basis
    )
    dots = _sum_over_groups(
      jnp.stack(
        [
          gram_lib.contract_trailing(
            r, b, batch_a=True, batch_b=False, compute_dtype=compute_dtype
          )
          for r, b in zip(residuals, basis, strict=True)
        ]
      ),
      shared_basis,
    )
    keep = (basis_sq > tol * input_sq[:, exit_index]) & (kept < ranks)
    later = rank > position
    coeff = jnp.where(
      keep[:, None] & later[None, :],
      dots / jnp.where(keep, basis_sq, 1.0)[:, None],
      0.0,
    )
    residuals = [
      r - _row_scale(c, r) * b[None]
      for r, c, b in zip(residuals, coeff, basis, strict=True)
    ]
    kept_sq = kept_sq.at[:, exit_index].set(jnp.where(keep, basis_sq, 0.0))
    coefficients = coefficients.at[:, :, exit_index].set(coeff)
    return residuals, kept_sq, coefficients, kept + keep.astype(jnp.int32)

  kept_sq = jnp.zeros((num_leaves, num_exits), compute_dtype)
  coefficients = jnp.zeros((num_leaves, num_exits, num_exits), compute_dtype)
  kept = jnp.zeros((num_leaves,), jnp.int32)
  residuals, kept_sq, coefficients, _ = jax.lax.fori_loop(
    0, num_exits, step, (residuals, kept_sq, coefficients, kept)
  )
  keep = kept_sq > 0
  if rescale:
    # Double where: a zero input row must leave the derivative finite.
    ratio = jnp.where(keep, input_sq, 1.0) / jnp.where(keep, kept_sq, 1.0)
    coeff = jnp.where(keep, jnp.sqrt(ratio), 0.0)
  else:
    coeff = keep.astype(compute_dtype)
  # The residuals are scaled by 2^-e: scale their sum back.
  updates = [
    gram_lib.unscale(gram_lib.weighted_sum(c, r, compute_dtype), e, degree=1)
    for c, r, e in zip(coeff, residuals, exponents, strict=True)
  ]
  weights = _weights_from_coefficients(coefficients, coeff, priority)
  if scaled_norms:
    # ‖ĝ_k‖² = 4^e · kept_sq, which may be beyond float32 where kept_sq is.
    weights = (weights, exponents)
  else:
    kept_sq = gram_lib.unscale(kept_sq, exponents[:, None])
  if shared_basis:
    return updates, kept_sq[:1], jax.tree.map(lambda x: x[:1], weights)
  return updates, kept_sq, weights
