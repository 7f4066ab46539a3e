"""Gram matrices of stacked per-exit gradients, and weighted sums of their rows.

Every function here works on *stacked leaves*: arrays of shape ``(K, *s)``
whose row ``k`` is exit k's gradient of one parameter tensor of shape ``s``.
Inner products contract the trailing (parameter) axes as they are; a leaf is
never reshaped to ``(K, N)``, because merging dimensions that may be sharded
would make XLA gather the whole leaf onto every device. Contracted in place,
a parameter split over devices gives per-device partial Gram matrices and
one all-reduce of K×K blocks, and a weighted sum of rows stays local to each
shard (``docs/design.md``, "Sharding").

Range. A squared norm overflows float32 for gradients of norm about 1.8e19
and underflows below about 1e-19, although such gradients are finite. So a
leaf is contracted after an exact scaling by a power of two, ``2^-e`` with
``2^e`` just above its largest magnitude (:func:`scaled_gram_matrices`), and
the Gram matrix is carried as ``(M̃, e)`` with ``M = 4^e M̃``. Scaling by a
power of two is exact in floating point, so in the ordinary range the
results are those of the unscaled computation bit for bit
(``docs/design.md``, "Range, rank and derivatives").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from osgd_jax import sharding

__all__ = [
  "combine_scaled",
  "contract_trailing",
  "gram_matrices",
  "gram_statistics",
  "leaf_exponents",
  "safe_inverse",
  "safe_sqrt",
  "scale_down",
  "scale_each",
  "scale_exponents",
  "scaled_gram_matrices",
  "times_power_of_two",
  "unscale",
  "weighted_sum",
]

# On TPU the default float32 matmul precision uses bfloat16 passes, which
# would corrupt the Gram matrix of nearly collinear gradients.
_PRECISION = jax.lax.Precision.HIGHEST

# Scale exponents stay within this bound, so that 2^±e is a normal float32
# (some backends flush subnormal operands to zero).
_MAX_EXPONENT = 125


def _replicated_like(x: jax.Array) -> jax.sharding.NamedSharding | None:
  """The replicated sharding for a contraction of ``x`` over sharded axes.

  Under a mesh with ``Explicit`` axes JAX asks for the sharding of a
  contraction over sharded dimensions; the inner products here are K-vectors
  or K×K blocks that every device needs, so they are replicated (partial
  sums and one all-reduce). Under ``Auto`` axes, or without a mesh, XLA's
  partitioner chooses the same by itself and ``None`` is returned.
  """
  mesh = sharding.explicit_mesh(x)
  if mesh is None:
    return None
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def contract_trailing(
  a: jax.Array,
  b: jax.Array,
  *,
  batch_a: bool,
  batch_b: bool,
  compute_dtype: Any,
) -> jax.Array:
  """Inner products of ``a`` and ``b`` over their parameter axes.

  Args:
    a: a stacked leaf ``(K, *s)`` (``batch_a=True``: its leading axis is
      kept) or a single parameter-shaped row ``s``.
    b: the same for the second operand, with the same parameter shape ``s``.
    batch_a: whether ``a`` has a leading K axis to keep.
    batch_b: whether ``b`` has a leading K axis to keep.
    compute_dtype: accumulation and output dtype.

  Returns:
    ``(K, K)``, ``(K,)`` or a scalar, replicated over any mesh.

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.arange(6.0).reshape(2, 3)
    >>> contract_trailing(g, g[0], batch_a=True, batch_b=False,
    ...                   compute_dtype=jnp.float32).tolist()
    [5.0, 14.0]
  """
  axes_a = tuple(range(int(batch_a), a.ndim))
  axes_b = tuple(range(int(batch_b), b.ndim))
  return jnp.tensordot(
    a,
    b,
    axes=(axes_a, axes_b),
    precision=_PRECISION,
    preferred_element_type=compute_dtype,
    out_sharding=_replicated_like(a),
  ).astype(compute_dtype)


def gram_matrices(leaves: Sequence[jax.Array], compute_dtype: Any) -> jax.Array:
  """The Gram matrix ``M = G Gᵀ`` of each stacked leaf.

  Args:
    leaves: stacked gradients, each ``(K, *s_l)``, one K for all.
    compute_dtype: accumulation dtype (float32 or float64).

  Returns:
    An ``(L, K, K)`` array in ``compute_dtype``, in the order of ``leaves``.

  Example:
    >>> import jax.numpy as jnp
    >>> leaf = jnp.asarray([[1.0, 0.0], [1.0, 1.0]])
    >>> gram_matrices([leaf], jnp.float32)[0].tolist()
    [[1.0, 1.0], [1.0, 2.0]]
  """
  return jnp.stack(
    [
      contract_trailing(
        leaf, leaf, batch_a=True, batch_b=True, compute_dtype=compute_dtype
      )
      for leaf in leaves
    ]
  )


def weighted_sum(
  weights: jax.Array,
  leaf: jax.Array,
  compute_dtype: Any,
  exponent: jax.Array | None = None,
) -> jax.Array:
  """``Σ_k weights[k] · leaf[k]``, parameter-shaped, in ``compute_dtype``.

  The K scaled rows are added one after another, which XLA fuses into one
  elementwise pass over the stacked leaf. Being elementwise, it keeps any
  sharding of the parameter axes and computes in full ``compute_dtype`` on
  every backend (a contraction over K would run at the backend's default
  matmul precision).

  With ``exponent`` e, the rows are summed scaled by ``2^-e`` and the sum
  is scaled back by ``2^e`` (both exact), so that large weights times large
  gradients do not overflow on the way to a finite result.

  Args:
    weights: ``(K,)``.
    leaf: ``(K, *s)``.
    compute_dtype: the dtype to compute and return in.
    exponent: an integer scalar, e.g. the leaf's
      :func:`scale_exponents`; ``None`` sums unscaled.

  Returns:
    An array of shape ``s``.

  Example:
    >>> import jax.numpy as jnp
    >>> weighted_sum(jnp.asarray([2.0, -1.0]), jnp.eye(2),
    ...              jnp.float32).tolist()
    [2.0, -1.0]
  """
  weights = weights.astype(compute_dtype)
  down = 1.0 if exponent is None else _power_of_two(-exponent, compute_dtype)

  def row(k):
    return weights[k] * (leaf[k].astype(compute_dtype) * down)

  total = row(0)
  for k in range(1, leaf.shape[0]):
    total = total + row(k)
  if exponent is None:
    return total
  return total * _power_of_two(exponent, compute_dtype)


def safe_inverse(x: jax.Array) -> jax.Array:
  """``1/x`` where ``x > 0``, else 0, so that zero rows of a Gram stay zero.

  Example:
    >>> import jax.numpy as jnp
    >>> safe_inverse(jnp.asarray([4.0, 0.0])).tolist()
    [0.25, 0.0]
  """
  positive = x > 0
  return jnp.where(positive, 1.0 / jnp.where(positive, x, 1.0), 0.0)


def safe_sqrt(x: jax.Array) -> jax.Array:
  """``√x`` where ``x > 0``, else 0, with a finite derivative everywhere.

  The derivative of ``√x`` is infinite at 0, and the chain rule multiplies
  it by the zero derivative of a zero row: NaN. The inner ``where`` keeps
  the square root away from 0, the outer one gives 0 there, with
  derivative 0 (the double-where idiom of JAX's FAQ, "gradients contain NaN
  where using where").

  Example:
    >>> import jax, jax.numpy as jnp
    >>> safe_sqrt(jnp.asarray([4.0, 0.0, -1.0])).tolist()
    [2.0, 0.0, 0.0]
    >>> float(jax.grad(safe_sqrt)(0.0))
    0.0
  """
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _power_of_two(exponent: Any, dtype: Any) -> jax.Array:
  """``2^exponent`` in ``dtype``, exactly, for an integer in [-126, 126].

  Built from its bits, a biased exponent over a zero mantissa, in float32
  (float64 for float64) and then cast, which is exact, or overflows or
  flushes as ``jnp.ldexp`` would for a narrower dtype. ``jnp.ldexp`` gives
  the same value but handles every input, subnormal and non-finite
  included, in some thirty operations: the engines take a power of two per
  leaf, and on a model with a hundred leaves those operations made up most
  of the program XLA compiled.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float64:
    wide, bits = jnp.float64, jnp.int64
  else:
    wide, bits = jnp.float32, jnp.int32
  info = jnp.finfo(wide)
  biased = jnp.asarray(exponent, bits) + (info.maxexp - 1)
  power = jax.lax.shift_left(biased, jnp.asarray(info.nmant, bits))
  return jax.lax.bitcast_convert_type(power, wide).astype(dtype)


def times_power_of_two(x: jax.Array, exponent: Any) -> jax.Array:
  """``x · 2^exponent``, exactly, for any integer exponent (or array of them).

  Multiplied in two halves, each a normal power of two, so that an exponent
  beyond the dtype's own range (e.g. ``2^200`` times ``2^-150``) still gives
  the representable result; beyond ±252 in all it overflows or flushes as
  the true value would.

  Example:
    >>> import jax.numpy as jnp
    >>> times_power_of_two(jnp.asarray(2.0**-100), 200).tolist() == 2.0**100
    True
  """
  exponent = jnp.asarray(exponent, jnp.int32)
  half = exponent // 2
  dtype = jnp.result_type(x)
  first = _power_of_two(jnp.clip(half, -126, 126), dtype)
  second = _power_of_two(jnp.clip(exponent - half, -126, 126), dtype)
  return x * first * second


def scale_exponents(leaves: Sequence[jax.Array]) -> jax.Array:
  """The power of two to divide each stacked leaf by before contracting it.

  ``e`` is the exponent of the leaf's largest magnitude (``2^(e-1) ≤ max|g|
  < 2^e``), so the scaled leaf lies in ``(-1, 1)`` and its Gram matrix can
  neither overflow nor lose its largest rows to underflow. It is 0 for a
  zero or non-finite leaf (a NaN or Inf then reaches the update as it is),
  kept within ±125 so that ``2^±e`` is a normal float, and carries no
  derivative (it is piecewise constant).

  Args:
    leaves: stacked gradients, each ``(K, *s_l)``.

  Returns:
    ``(L,)`` int32 exponents.

  Example:
    >>> import jax.numpy as jnp
    >>> scale_exponents([jnp.asarray([[3.0], [0.5]]), jnp.zeros((2, 1)),
    ...                  jnp.full((2, 1), 1e30)]).tolist()
    [2, 0, 100]
  """
  # One vector of exponents for all leaves: a few operations, not a few
  # per leaf.
  return _exponents_of(jnp.stack([_largest(leaf) for leaf in leaves]))


def _largest(leaf: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(jax.lax.stop_gradient(leaf))).astype(jnp.float32)


def _exponents_of(largest: jax.Array) -> jax.Array:
  """:func:`scale_exponents` of float32 largest magnitudes, elementwise."""
  # The float32 exponent field E of 1.m · 2^(E-127) gives e = E - 126.
  # jnp.frexp gives the same e but also resolves subnormals, in some thirty
  # operations that XLA copies into every consumer of an exponent. A
  # subnormal's e (-126 here, less by frexp) is clipped to -125 either way;
  # where the backend flushes subnormals, the leaf is zero to it and e is 0.
  field = jax.lax.shift_right_logical(
    jax.lax.bitcast_convert_type(largest, jnp.int32), jnp.int32(23)
  )
  exponents = jnp.where(
    jnp.isfinite(largest) & (largest > 0), (field & 0xFF) - 126, 0
  )
  return jnp.clip(exponents, -_MAX_EXPONENT, _MAX_EXPONENT).astype(jnp.int32)


def scale_down(
  leaves: Sequence[jax.Array],
  exponents: jax.Array | Sequence[jax.Array],
  compute_dtype: Any,
) -> list[jax.Array]:
  """Each leaf divided by its power of two, ``leaf_l · 2^-e_l``, exactly.

  Args:
    leaves: arrays of any shapes, e.g. stacked gradients.
    exponents: ``(L,)`` integers in [-126, 126], e.g. from
      :func:`scale_exponents`, or L integer scalars.
    compute_dtype: the dtype to scale in and return.

  Returns:
    The scaled leaves, in order, in ``compute_dtype``.

  Example:
    >>> import jax.numpy as jnp
    >>> [a.tolist() for a in scale_down([jnp.asarray([6.0]),
    ...   jnp.asarray([0.5])], jnp.asarray([3, -1]), jnp.float32)]
    [[0.75], [1.0]]
  """
  return [
    leaf.astype(compute_dtype) * _power_of_two(-exponents[i], compute_dtype)
    for i, leaf in enumerate(leaves)
  ]


def scale_each(
  leaves: Sequence[jax.Array], compute_dtype: Any
) -> tuple[list[jax.Array], jax.Array]:
  """Each leaf divided by its own :func:`scale_exponents` power of two.

  :func:`scale_down` with :func:`scale_exponents`, but each leaf's scaled
  copy depends on that leaf alone (not on one exponent vector of all
  leaves), so that XLA can scale and contract the leaves one at a time
  instead of holding every scaled copy at once.

  Args:
    leaves: stacked gradients, each ``(K, *s_l)``.
    compute_dtype: the dtype to scale in and return.

  Returns:
    ``(scaled, exponents)``: the scaled leaves, in order, in
    ``compute_dtype``, and their ``(L,)`` int32 exponents.

  Example:
    >>> import jax.numpy as jnp
    >>> scaled, exponents = scale_each([jnp.asarray([[6.0]]),
    ...   jnp.asarray([[0.5]])], jnp.float32)
    >>> [a.tolist() for a in scaled], exponents.tolist()
    ([[[0.75]], [[0.5]]], [3, 0])
  """
  exponents = leaf_exponents(leaves)
  return scale_down(leaves, exponents, compute_dtype), jnp.stack(exponents)


def leaf_exponents(leaves: Sequence[jax.Array]) -> list[jax.Array]:
  """:func:`scale_exponents`, each leaf's computed from that leaf alone.

  The same values as :func:`scale_exponents`, as L scalars, none of which
  waits for another leaf: what :func:`scale_each` scales by, and what
  scales a leaf's weighted sum that must not wait for every leaf.

  Args:
    leaves: stacked gradients, each ``(K, *s_l)``.

  Returns:
    L int32 scalars, in order.

  Example:
    >>> import jax.numpy as jnp
    >>> [int(e) for e in leaf_exponents([jnp.asarray([[6.0]]),
    ...   jnp.zeros((1, 2))])]
    [3, 0]
  """
  return [_exponents_of(_largest(leaf)) for leaf in leaves]


def scaled_gram_matrices(
  leaves: Sequence[jax.Array], compute_dtype: Any
) -> tuple[jax.Array, jax.Array]:
  """Each stacked leaf's Gram matrix, as a scaled matrix and an exponent.

  ``M_l = 4^{e_l} M̃_l`` with ``e_l`` from :func:`scale_exponents` and
  ``M̃_l`` the Gram matrix of the leaf divided by ``2^{e_l}``: finite for
  every finite gradient, and equal to ``M_l / 4^{e_l}`` bit for bit where
  ``M_l`` itself is representable.

  Args:
    leaves: stacked gradients, each ``(K, *s_l)``, one K for all.
    compute_dtype: accumulation dtype (float32 or float64).

  Returns:
    ``(grams, exponents)``: ``(L, K, K)`` in ``compute_dtype`` and ``(L,)``
    int32.

  Example:
    >>> import jax.numpy as jnp
    >>> leaf = jnp.asarray([[3e30, 0.0], [0.0, 4e30]])
    >>> grams, exponents = scaled_gram_matrices([leaf], jnp.float32)
    >>> exponents.tolist()   # 2^101 ≈ 2.5e30 < 4e30 < 2^102
    [102]
    >>> round(float(grams[0, 1, 1]) * 4.0 ** 102 / 1.6e61, 5)  # 4e30 squared
    1.0
  """
  scaled, exponents = scale_each(leaves, compute_dtype)
  return gram_matrices(scaled, compute_dtype), exponents


def combine_scaled(
  grams: jax.Array, exponents: jax.Array, shared: bool
) -> tuple[jax.Array, jax.Array]:
  """The Gram matrix of each group from scaled per-leaf Gram matrices.

  One group per leaf (``shared=False``: returned as they are), or one for
  all leaves (``shared=True``): ``M̃ = Σ_l 4^{e_l − E} M̃_l`` with
  ``E = max_l e_l``, so that ``Σ_l M_l = 4^E M̃`` without overflow (a leaf
  more than 2^63 times smaller than the largest adds less than float32
  resolves, and is dropped).

  This is the one place where scaled Gram matrices are summed: any source of
  per-leaf ``(M̃_l, e_l)`` (stacked gradients, or a Gramian formed without
  them, with exponents 0 where it scales nothing) goes through it.

  Args:
    grams: ``(L, K, K)`` scaled Gram matrices (or ``(L, ...)`` of any other
      quantity of degree 2, such as squared norms).
    exponents: ``(L,)`` int32, ``M_l = 4^{e_l} grams[l]``.
    shared: one group for all leaves.

  Returns:
    ``(group_grams, group_exponents)``: ``(G, K, K)`` and ``(G,)``, with
    G = 1 if ``shared`` else L.

  Example:
    >>> import jax.numpy as jnp
    >>> grams, exps = combine_scaled(jnp.ones((2, 1, 1)),
    ...                              jnp.asarray([1, 0]), True)
    >>> grams.tolist(), exps.tolist()   # 4·1 + 1·1 = 4^1 · 1.25
    ([[[1.25]]], [1])
  """
  if not shared:
    return grams, exponents
  # A zero leaf's exponent (0) says nothing of its scale: it must not set
  # E, or tiny gradients next to a zero leaf would be flushed to 0.
  zero = ~jnp.any(grams != 0, axis=tuple(range(1, grams.ndim)))
  exponents = jnp.where(zero, -_MAX_EXPONENT, exponents)
  top = jnp.max(exponents)
  # 2·(e_l − E) ≥ −126 keeps the factor a normal float; below, it is 0.
  shift = 2 * (exponents - top)
  factor = jnp.where(
    shift >= -126, _power_of_two(jnp.maximum(shift, -126), grams.dtype), 0.0
  )
  factor = factor.reshape(factor.shape + (1,) * (grams.ndim - 1))
  return (grams * factor).sum(axis=0, keepdims=True), top[None]


def unscale(
  scaled: jax.Array, exponent: jax.Array, degree: int = 2
) -> jax.Array:
  """``scaled · 2^(degree·exponent)``: a scaled quantity in true units.

  ``degree`` is 2 for a Gram matrix or squared norm, 1 for a norm. The
  result overflows to ``inf`` where the true value is beyond the dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> unscale(jnp.asarray(1.5), jnp.asarray(3)).tolist()
    96.0
  """
  half = jnp.asarray(exponent, jnp.int32)
  dtype = jnp.result_type(scaled)
  out = scaled
  for _ in range(degree):
    out = out * _power_of_two(half, dtype)
  return out


def gram_statistics(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The exits' gradient norms and pairwise cosines from a Gram matrix.

  Args:
    gram: ``(K, K)``, the Gram matrix of the whole gradient vectors (the sum
      of the per-leaf Gram matrices).

  Returns:
    ``(norms, cosine)``: ``(K,)`` the norm of each exit's gradient and
    ``(K, K)`` the cosine similarity between exits, 0 where either gradient
    is zero.

  Example:
    >>> import jax.numpy as jnp
    >>> norms, cosine = gram_statistics(jnp.asarray([[4.0, 2.0], [2.0, 4.0]]))
    >>> norms.tolist(), cosine.tolist()
    ([2.0, 2.0], [[1.0, 0.5], [0.5, 1.0]])
  """
  diag = jnp.diagonal(gram, axis1=-2, axis2=-1)
  norms = safe_sqrt(diag)
  inverse = safe_inverse(norms)
  return norms, gram * inverse[..., :, None] * inverse[..., None, :]
