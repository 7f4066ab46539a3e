"""Pure kernels for the Gram–Schmidt projection of stacked per-exit gradients.

Every function here works on *stacked leaves*: arrays of shape ``(K, *s)`` whose
row ``k`` is exit k's gradient of one parameter tensor. Inner products are
contractions over the trailing axes (``jnp.tensordot``); a leaf is never
reshaped to ``(K, N)``, because merging dimensions that may be sharded forces
XLA to gather the whole leaf onto every device.

Two algorithms give the same direction ``u = Σ_k ĝ_k`` (see DESIGN.md §2):

* ``gram``: one pass forms ``M = G Gᵀ``; an LDLᵀ factorisation of the
  (equilibrated) K×K matrix gives weights ``w`` with ``u = wᵀ G``, a second pass.
* ``sequential``: modified Gram–Schmidt on the data, a ``lax.fori_loop`` over K.

"Group" below means the set of leaves that share one basis: each leaf on its own
(``granularity="leaf"``) or all leaves together (``granularity="global"``).
Groups are expressed by reducing per-leaf K-vectors / K×K blocks over the leaf
axis, so both granularities share one code path.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from osgd_jax import sharding

__all__ = [
    "Projection",
    "gram_matrix",
    "gram_matrices",
    "ldl_weights",
    "weighted_sum",
    "project",
]

# Accuracy matters more than speed for these reductions: on TPU the default f32
# matmul precision uses bf16 passes, which would corrupt near-collinear Grams.
_PRECISION = jax.lax.Precision.HIGHEST


class Projection(NamedTuple):
  """Result of :func:`project`.

  Attributes:
    updates: param-shaped directions ``u``, one per input leaf, in the compute
      dtype.
    grams: ``(n_leaves, K, K)`` per-leaf Gram matrices of the *input* rows.
    residual_sq_norms: ``(n_groups, K)``, ``‖ĝ_k‖²`` of each exit's projected
      component in each group (a leaf, or one row for the global basis); zero
      where the component was degenerate. Exits are in input (not priority)
      order.
  """

  updates: list[jax.Array]
  grams: jax.Array
  residual_sq_norms: jax.Array


def _trailing_axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(1, x.ndim))


def _replicated_like(x: jax.Array) -> jax.sharding.NamedSharding | None:
  """The replicated sharding for a contraction of ``x`` over sharded axes.

  Under a mesh with ``Explicit`` axes JAX refuses to guess the sharding of a
  contraction over sharded dimensions; the inner products here are K-vectors
  or K×K blocks that every device needs, so they are replicated (partial sums
  and one all-reduce). Under ``Auto`` axes, or without a mesh, XLA's
  partitioner chooses the same by itself and ``None`` is returned.
  """
  mesh = sharding.explicit_mesh(x)
  if mesh is None:
    return None
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def contract_trailing(a: jax.Array, b: jax.Array, *, batch_a: bool,
                      batch_b: bool, compute_dtype) -> jax.Array:
  """Inner products of ``a`` and ``b`` over their parameter axes.

  Each operand is either a stacked leaf ``(K, *s)`` (``batch_*=True``, its
  leading axis is kept) or a single param-shaped row ``s``. The contraction
  runs over the trailing axes as they are, never over a reshaped ``(K, N)``
  view, so sharded dimensions stay sharded.

  Args:
    a: first operand.
    b: second operand, with the same parameter shape ``s``.
    batch_a: whether ``a`` has a leading K axis to keep.
    batch_b: whether ``b`` has a leading K axis to keep.
    compute_dtype: accumulation and output dtype.

  Returns:
    ``(K, K)``, ``(K,)`` or a scalar, replicated over any mesh.
  """
  axes_a = tuple(range(int(batch_a), a.ndim))
  axes_b = tuple(range(int(batch_b), b.ndim))
  return jnp.tensordot(
      a, b, axes=(axes_a, axes_b), precision=_PRECISION,
      preferred_element_type=compute_dtype,
      out_sharding=_replicated_like(a),
  ).astype(compute_dtype)


def gram_matrix(leaf: jax.Array, compute_dtype) -> jax.Array:
  """Returns ``M = G Gᵀ`` (K×K) of a stacked leaf, contracted over trailing axes.

  Args:
    leaf: stacked gradients of shape ``(K, *s)``.
    compute_dtype: accumulation dtype (float32 or float64).

  Returns:
    A ``(K, K)`` array in ``compute_dtype``.
  """
  return gram_matrices([leaf], compute_dtype)[0]


def gram_matrices(leaves: Sequence[jax.Array], compute_dtype) -> jax.Array:
  """Returns the ``(L, K, K)`` Gram matrices of stacked leaves.

  Each leaf is contracted over its trailing axes as it is, so a sharded
  parameter axis gives per-device partial sums and one all-reduce.

  Args:
    leaves: stacked gradients, each ``(K, *s_l)``, one K for all.
    compute_dtype: accumulation dtype (float32 or float64).

  Returns:
    An ``(L, K, K)`` array in ``compute_dtype``, in the order of ``leaves``.
  """
  return jnp.stack([
      contract_trailing(leaf, leaf, batch_a=True, batch_b=True,
                        compute_dtype=compute_dtype)
      for leaf in leaves])


def weighted_sum(weights: jax.Array, leaf: jax.Array, compute_dtype) -> jax.Array:
  """Returns ``Σ_k weights[k] · leaf[k]``, a param-shaped array in compute dtype.

  The K scaled rows are added one after another, which XLA fuses into one
  elementwise pass over the stacked leaf. Being elementwise, it keeps any
  sharding of the parameter axes, computes in full ``compute_dtype`` on
  every backend, and on XLA:CPU it is as fast as a contraction over K, or
  twice as fast on leaves with several parameter axes.
  """
  weights = weights.astype(compute_dtype)
  total = weights[0] * leaf[0].astype(compute_dtype)
  for k in range(1, leaf.shape[0]):
    total = total + weights[k] * leaf[k].astype(compute_dtype)
  return total


def safe_inverse(x: jax.Array) -> jax.Array:
  """``1/x`` where ``x > 0``, else 0: zero rows of a Gram matrix stay zero."""
  return jnp.where(x > 0, 1.0 / jnp.where(x > 0, x, 1.0), 0.0)


# Up to this many exits, the K×K algebra is unrolled at trace time.
UNROLL_MAX_EXITS = 16


def _factor_unrolled(corr: jax.Array, tol
                     ) -> tuple[dict[tuple[int, int], jax.Array], list[jax.Array]]:
  """:func:`_factor_loop`, written entry by entry for a static small K.

  Returns the entries of L below the diagonal as ``{(i, j): (...,)}`` and
  the pivots as a list of ``(...,)`` arrays. Kept as separate arrays, never
  stacked into a matrix: XLA fuses elementwise operations on them into a few
  kernels, whereas a stacked (K, K) matrix becomes one kernel that evaluates
  the whole factorisation again for each of its K² entries (on XLA:CPU,
  K = 8: 35 µs, more than the rest of the update's algebra together). The
  loop form launches each step's kernels one by one (on XLA:CPU, testing
  the loop condition on the host), which costs more than the O(K³) work.
  """
  num_exits = corr.shape[-1]
  lower: dict[tuple[int, int], jax.Array] = {}
  weighted: dict[tuple[int, int], jax.Array] = {}  # L_jm · d_m
  pivots = []
  for j in range(num_exits):
    column = {}
    for i in range(j, num_exits):
      entry = corr[..., i, j]
      for m in range(j):
        entry = entry - lower[i, m] * weighted[j, m]
      column[i] = entry
    keep = column[j] > tol
    pivot = jnp.where(keep, column[j], 0.0)
    inverse = 1.0 / jnp.where(keep, column[j], 1.0)
    pivots.append(pivot)
    for i in range(j + 1, num_exits):
      lower[i, j] = jnp.where(keep, column[i] * inverse, 0.0)
      weighted[i, j] = lower[i, j] * pivot
  return lower, pivots


def _factor_loop(corr: jax.Array, tol) -> tuple[jax.Array, jax.Array]:
  """Unit lower-triangular L and pivots d with ``corr = L diag(d) Lᵀ``.

  Degenerate pivots (``d_j ≤ tol``) become 0 and their column of L below the
  diagonal 0. A ``lax`` loop over the columns keeps the program small for a
  large K.
  """
  num_exits = corr.shape[-1]
  rows = jnp.arange(num_exits)

  # Column j of L and pivot d_j from the columns before it.
  def column_step(j, carry):
    lower, pivots = carry
    weighted_row = jnp.take(lower, j, axis=-2) * pivots  # only i < j non-zero
    # Elementwise products and sums rather than einsum: on XLA:CPU every
    # tiny dot_general costs far more to compile than to run.
    column = jnp.take(corr, j, axis=-1) - jnp.sum(
        lower * weighted_row[..., None, :], axis=-1)
    pivot = jnp.take(column, j, axis=-1)
    keep = pivot > tol
    new_column = jnp.where(
        keep[..., None] & (rows > j),
        column / jnp.where(keep, pivot, 1.0)[..., None],
        (rows == j).astype(corr.dtype))
    lower = jnp.where(rows == j, new_column[..., :, None], lower)
    pivots = jnp.where(rows == j, jnp.where(keep, pivot, 0.0)[..., None], pivots)
    return lower, pivots

  lower = jnp.broadcast_to(jnp.eye(num_exits, dtype=corr.dtype), corr.shape)
  pivots = jnp.zeros(corr.shape[:-1], corr.dtype)
  return jax.lax.fori_loop(0, num_exits, column_step, (lower, pivots))


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
        jnp.take(lower, j, axis=-1) * weights, axis=-1)
    return jnp.where(rows == j, w_j[..., None], weights)

  return jax.lax.fori_loop(0, num_exits, back_step, jnp.zeros_like(coeff))


def ldl_weights(
    gram: jax.Array, *, tol: float | jax.Array, rescale: bool
) -> tuple[jax.Array, jax.Array]:
  """Gram–Schmidt weights from a Gram matrix, rows taken in index order.

  Factorises ``M = L D Lᵀ`` after equilibration ``C = S⁻¹ M S⁻¹`` with
  ``S = diag(√M_kk)``, which makes the pivots scale-free: ``D_kk`` is the
  fraction of ‖g_k‖² left after removing the earlier components. A pivot with
  ``D_kk ≤ tol`` is degenerate; its column of L is zeroed so it joins no basis
  and it contributes nothing to the sum.

  Up to :data:`UNROLL_MAX_EXITS` exits the algebra is unrolled entry by
  entry at trace time; beyond, it runs as ``lax`` loops over the exits.
  Arguments and results are those of :func:`ldl_weights`.
  """
  num_exits = gram.shape[-1]
  diag = jnp.diagonal(gram, axis1=-2, axis2=-1)
  scale = jnp.sqrt(diag)
  inv_scale = safe_inverse(scale)
  corr = gram * inv_scale[..., :, None] * inv_scale[..., None, :]
  unrolled = num_exits <= UNROLL_MAX_EXITS
  if unrolled:
    lower, pivot_list = _factor_unrolled(corr, tol)
    pivots = jnp.stack(pivot_list, axis=-1)
  else:
    lower, pivots = _factor_loop(corr, tol)

  keep = pivots > 0
  if rescale:
    coeff = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, pivots, 1.0)), 0.0)
  else:
    coeff = keep.astype(gram.dtype)
  # u = coeffᵀ Ĝ = coeffᵀ L⁻¹ G, so w solves Lᵀ w = coeff, where
  # L = S L' S⁻¹ undoes the equilibration. Solving with L itself (rather than
  # w = S⁻¹ L'⁻ᵀ S coeff) keeps w exactly equal to coeff when nothing is
  # projected, e.g. K = 1 is the identity bit for bit.
  back_substitute = (_back_substitute_unrolled if unrolled
                     else _back_substitute_loop)
  return back_substitute(lower, coeff, scale, inv_scale), pivots * diag


def _group_reduce(per_leaf: jax.Array, shared_basis: bool) -> jax.Array:
  """Sums per-leaf quantities over the leaf axis when all leaves share a basis."""
  if shared_basis:
    return jnp.broadcast_to(per_leaf.sum(axis=0, keepdims=True), per_leaf.shape)
  return per_leaf


def _permute_gram(gram: jax.Array, order: jax.Array) -> jax.Array:
  return jnp.take(jnp.take(gram, order, axis=-2), order, axis=-1)


def _row_scale(coeff: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes a (K,) vector to broadcast against the rows of ``like``."""
  return coeff.reshape(coeff.shape + (1,) * (like.ndim - 1))


def _gram_method(
    leaves, grams, *, order, tol, rescale, shared_basis, compute_dtype,
) -> tuple[list[jax.Array], jax.Array]:
  group_grams = grams.sum(axis=0, keepdims=True) if shared_basis else grams
  weights, residual_sq = ldl_weights(
      _permute_gram(group_grams, order), tol=tol, rescale=rescale)
  inverse = jnp.argsort(order)
  weights, residual_sq = weights[..., inverse], residual_sq[..., inverse]
  updates = [
      weighted_sum(weights[0 if shared_basis else i], leaf, compute_dtype)
      for i, leaf in enumerate(leaves)
  ]
  return updates, residual_sq


def _sequential_method(
    leaves, *, order, tol, rescale, shared_basis, compute_dtype,
) -> tuple[list[jax.Array], jax.Array]:
  residuals = [leaf.astype(compute_dtype) for leaf in leaves]
  row_sq = lambda x: jnp.sum(jnp.square(x), axis=_trailing_axes(x))
  input_sq = _group_reduce(jnp.stack([row_sq(r) for r in residuals]), shared_basis)
  num_leaves, num_exits = input_sq.shape
  rank = jnp.argsort(order)

  def step(position, carry):
    residuals, kept_sq = carry
    exit_index = order[position]
    basis = [jax.lax.dynamic_index_in_dim(r, exit_index, 0, keepdims=False)
             for r in residuals]
    basis_sq = _group_reduce(
        jnp.stack([jnp.sum(jnp.square(b)) for b in basis]), shared_basis)
    dots = _group_reduce(jnp.stack([
        contract_trailing(r, b, batch_a=True, batch_b=False,
                          compute_dtype=compute_dtype)
        for r, b in zip(residuals, basis)
    ]), shared_basis)
    keep = basis_sq > tol * input_sq[:, exit_index]
    later = rank > position
    coeff = jnp.where(
        keep[:, None] & later[None, :],
        dots / jnp.where(keep, basis_sq, 1.0)[:, None], 0.0)
    residuals = [r - _row_scale(c, r) * b[None]
                 for r, c, b in zip(residuals, coeff, basis)]
    kept_sq = kept_sq.at[:, exit_index].set(jnp.where(keep, basis_sq, 0.0))
    return residuals, kept_sq

  kept_sq = jnp.zeros((num_leaves, num_exits), compute_dtype)
  residuals, kept_sq = jax.lax.fori_loop(
      0, num_exits, step, (residuals, kept_sq))
  keep = kept_sq > 0
  if rescale:
    coeff = jnp.where(
        keep, jnp.sqrt(input_sq / jnp.where(keep, kept_sq, 1.0)), 0.0)
  else:
    coeff = keep.astype(compute_dtype)
  updates = [weighted_sum(c, r, compute_dtype) for c, r in zip(coeff, residuals)]
  return updates, (kept_sq[:1] if shared_basis else kept_sq)


METHODS = ("gram", "sequential")
GRANULARITIES = ("leaf", "global")


def project(
    leaves: Sequence[jax.Array],
    *,
    method: str,
    granularity: str,
    order: jax.Array,
    tol: float | jax.Array,
    rescale: bool,
    compute_dtype,
) -> Projection:
  """Projects stacked per-exit gradients and sums the components.

  Args:
    leaves: stacked gradients, each ``(K, *param_shape)``, all with the same K.
    method: ``"gram"`` or ``"sequential"``.
    granularity: ``"leaf"`` (a basis per leaf) or ``"global"`` (one basis
      over all leaves).
    order: int array, a permutation of ``range(K)``; ``order[0]`` is the exit
      with the highest priority.
    tol: relative tolerance on ``‖ĝ_k‖² / ‖g_k‖²`` below which a component is
      degenerate.
    rescale: rescale every kept component to its input gradient's norm.
    compute_dtype: float32 or float64.

  Returns:
    A :class:`Projection`.
  """
  if method not in METHODS or granularity not in GRANULARITIES:
    raise ValueError(f"method must be one of {METHODS} and granularity one of"
                     f" {GRANULARITIES}; got {method!r}, {granularity!r}.")
  shared_basis = granularity == "global"
  grams = gram_matrices(leaves, compute_dtype)
  order = jnp.asarray(order, jnp.int32)
  if method == "gram":
    updates, residual_sq = _gram_method(
        leaves, grams, order=order, tol=tol, rescale=rescale,
        shared_basis=shared_basis, compute_dtype=compute_dtype)
  else:
    updates, residual_sq = _sequential_method(
        leaves, order=order, tol=tol, rescale=rescale,
        shared_basis=shared_basis, compute_dtype=compute_dtype)
  return Projection(updates, grams, residual_sq)
