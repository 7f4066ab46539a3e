"""Gram matrices of stacked per-exit gradients, and weighted sums of their rows.

Every function here works on *stacked leaves*: arrays of shape ``(K, *s)``
whose row ``k`` is exit k's gradient of one parameter tensor of shape ``s``.
Inner products contract the trailing (parameter) axes as they are; a leaf is
never reshaped to ``(K, N)``, because merging dimensions that may be sharded
would make XLA gather the whole leaf onto every device. Contracted in place,
a parameter split over devices gives per-device partial Gram matrices and
one all-reduce of K×K blocks, and a weighted sum of rows stays local to each
shard (``docs/design.md``, "Sharding").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from osgd_jax import sharding

__all__ = [
  "contract_trailing",
  "gram_matrices",
  "gram_statistics",
  "safe_inverse",
  "weighted_sum",
]

# On TPU the default float32 matmul precision uses bfloat16 passes, which
# would corrupt the Gram matrix of nearly collinear gradients.
_PRECISION = jax.lax.Precision.HIGHEST


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
  weights: jax.Array, leaf: jax.Array, compute_dtype: Any
) -> jax.Array:
  """``Σ_k weights[k] · leaf[k]``, parameter-shaped, in ``compute_dtype``.

  The K scaled rows are added one after another, which XLA fuses into one
  elementwise pass over the stacked leaf. Being elementwise, it keeps any
  sharding of the parameter axes and computes in full ``compute_dtype`` on
  every backend (a contraction over K would run at the backend's default
  matmul precision).

  Args:
    weights: ``(K,)``.
    leaf: ``(K, *s)``.
    compute_dtype: the dtype to compute and return in.

  Returns:
    An array of shape ``s``.

  Example:
    >>> import jax.numpy as jnp
    >>> weighted_sum(jnp.asarray([2.0, -1.0]), jnp.eye(2),
    ...              jnp.float32).tolist()
    [2.0, -1.0]
  """
  weights = weights.astype(compute_dtype)
  total = weights[0] * leaf[0].astype(compute_dtype)
  for k in range(1, leaf.shape[0]):
    total = total + weights[k] * leaf[k].astype(compute_dtype)
  return total


def safe_inverse(x: jax.Array) -> jax.Array:
  """``1/x`` where ``x > 0``, else 0, so that zero rows of a Gram stay zero.

  Example:
    >>> import jax.numpy as jnp
    >>> safe_inverse(jnp.asarray([4.0, 0.0])).tolist()
    [0.25, 0.0]
  """
  positive = x > 0
  return jnp.where(positive, 1.0 / jnp.where(positive, x, 1.0), 0.0)


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
  norms = jnp.sqrt(diag)
  inverse = safe_inverse(norms)
  return norms, gram * inverse[..., :, None] * inverse[..., None, :]
