"""The Gram matrix of a stacked leaf on XLA:CPU: a flat view, blocks if large.

XLA:CPU runs ``M = G Gᵀ`` of a stacked leaf ``(K, *s)`` far below what the
machine can do in two cases (``benchmarks/bench_transform.py``; K=4, 2 cores):

* a contraction over several parameter axes, e.g. a conv kernel's four, is
  3–10× slower than the same contraction over one flattened axis (a
  ``(K, 3, 3, 64, 64)`` leaf: 250 µs against 30 µs);
* one long contraction slows down sharply once the stacked leaf outgrows
  the caches (10⁷ parameters: about 2 GB/s, where one fused pass over the
  same buffer streams at 10–20 GB/s), while summing the Gram matrices of
  cache-sized blocks in a loop keeps pace with that pass.

This kernel does both: it views a leaf as ``(K, N)`` and, above
:data:`MIN_BYTES`, sums the Gram matrices of blocks of :data:`BLOCK_BYTES`.
Accelerators run the contraction as it is, so
:func:`osgd_jax.orthogonalize.gram_matrix` uses this kernel on the CPU
backend only, where :func:`worthwhile` says it pays.

The flat view merges dimensions, which is only safe on one device's own
data: merging dimensions that are split over devices would gather the leaf.
Three rules make the kernel a drop-in replacement of the plain contraction:

* sharding (``custom_partitioning``): each device forms the Gram matrix of
  its own shard, then one all-reduce of the K×K result over the mesh axes
  that split the parameter axes, the same collective as the plain
  contraction. The stacked leaf is never gathered (only a split K axis is,
  which is not a layout this library makes);
* differentiation (``custom_jvp``): ``dM = Ġ Gᵀ + G Ġᵀ`` by plain
  contractions, so an update stays differentiable;
* batching (``custom_vmap``): under ``jax.vmap``, the plain batched
  contraction.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["MIN_BYTES", "BLOCK_BYTES", "gram", "worthwhile"]

# From this size of a stacked leaf on, summing blocks beats one long
# contraction on XLA:CPU (2 cores, 32 MiB L3), for K = 2, 4 and 8 alike.
MIN_BYTES = 8 << 20
# One block holds K rows of this many bytes in all, so that it stays in a
# core's L2 cache while its K×K products are formed (the best of 64 KiB to
# 1 MiB for K = 2, 4 and 8 alike).
BLOCK_BYTES = 256 << 10

# Full-precision products, as in osgd_jax.orthogonalize.
_PRECISION = jax.lax.Precision.HIGHEST


def _needs_blocks(leaf: jax.Array) -> bool:
  """Whether a stacked leaf (or one device's shard of it) is summed by blocks."""
  return leaf.size * leaf.dtype.itemsize > MIN_BYTES


def worthwhile(leaf: jax.Array) -> bool:
  """Whether the kernel beats XLA:CPU's plain contraction on this leaf.

  It does for a leaf with several parameter axes (the flat view) and for a
  stacked leaf over :data:`MIN_BYTES` (the blocks); a small vector's
  contraction is already flat.
  """
  return leaf.ndim > 2 or _needs_blocks(leaf)


def _rows_gram(rows: jax.Array, compute_dtype) -> jax.Array:
  """``rows @ rows.T`` of a ``(K, n)`` block, accumulated in compute dtype."""
  return jax.lax.dot_general(
      rows, rows, (((1,), (1,)), ((), ())), precision=_PRECISION,
      preferred_element_type=compute_dtype).astype(compute_dtype)


def _local_gram(leaf: jax.Array, compute_dtype) -> jax.Array:
  """The Gram matrix of one device's ``(K, *s)`` data, flat or by blocks."""
  num_exits = leaf.shape[0]
  flat = leaf.reshape(num_exits, -1)  # local data: a free, row-major view
  if not _needs_blocks(leaf):
    return _rows_gram(flat, compute_dtype)
  width = max(1, BLOCK_BYTES // (num_exits * leaf.dtype.itemsize))
  num_blocks, tail = divmod(flat.shape[1], width)

  def add_block(i, acc):
    block = jax.lax.dynamic_slice_in_dim(flat, i * width, width, axis=1)
    return acc + _rows_gram(block, compute_dtype)

  acc = jax.lax.fori_loop(0, num_blocks, add_block,
                          jnp.zeros((num_exits, num_exits), compute_dtype))
  if tail:
    acc = acc + _rows_gram(flat[:, num_blocks * width:], compute_dtype)
  return acc


def _mesh_axes(spec: PartitionSpec) -> tuple[str, ...]:
  """The mesh axes that split the parameter (trailing) axes of a leaf."""
  names = []
  for entry in tuple(spec)[1:]:
    if entry is not None:
      names.extend(entry if isinstance(entry, tuple) else (entry,))
  return tuple(names)


@functools.lru_cache(maxsize=None)
def _partitioned(compute_dtype, ndim: int):
  """``leaf -> Gram`` with a sharding rule, for leaves of rank ``ndim``."""

  @custom_partitioning
  def gram_fn(leaf):
    return _local_gram(leaf, compute_dtype)

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    (arg,) = arg_shapes
    replicated = NamedSharding(mesh, PartitionSpec())
    if not isinstance(arg.sharding, NamedSharding):
      # A layout without named axes: let the partitioner gather it.
      return (mesh, lambda x: _local_gram(x, compute_dtype), replicated,
              (replicated,))
    spec = tuple(arg.sharding.spec) + (None,) * ndim
    # K is never split: every device needs all the rows of its shard.
    arg_sharding = NamedSharding(mesh, PartitionSpec(None, *spec[1:ndim]))
    axes = _mesh_axes(arg_sharding.spec)

    def lower_fn(local_leaf):
      partial = _local_gram(local_leaf, compute_dtype)
      return jax.lax.psum(partial, axes) if axes else partial

    return mesh, lower_fn, replicated, (arg_sharding,)

  def infer_sharding(mesh, arg_shapes, result_shape):
    del arg_shapes, result_shape
    return NamedSharding(mesh, PartitionSpec())

  params = " ".join(f"p{i}" for i in range(1, ndim))
  gram_fn.def_partition(
      partition=partition, infer_sharding_from_operands=infer_sharding,
      sharding_rule=f"k {params} -> i j",
      reduction_factors=tuple(params.split()))
  return gram_fn


@functools.lru_cache(maxsize=None)
def _kernel(compute_dtype, ndim: int):
  """:func:`_partitioned` with its batching and differentiation rules."""
  # orthogonalize imports this module; by the time a kernel is built, both
  # are loaded.
  from osgd_jax.orthogonalize import contract_trailing  # pylint: disable=C0415
  partitioned = _partitioned(compute_dtype, ndim)

  def contract(a, b):
    return contract_trailing(a, b, batch_a=True, batch_b=True,
                             compute_dtype=compute_dtype)

  @jax.custom_batching.custom_vmap
  def batchable(leaf):
    return partitioned(leaf)

  @batchable.def_vmap
  def batched(axis_size, in_batched, leaf):
    del axis_size
    (leaf_batched,) = in_batched
    if not leaf_batched:
      return batchable(leaf), False
    return jax.vmap(lambda x: contract(x, x))(leaf), True

  @jax.custom_jvp
  def gram_fn(leaf):
    return batchable(leaf)

  @gram_fn.defjvp
  def gram_jvp(primals, tangents):
    (leaf,), (tangent,) = primals, tangents
    cross = contract(tangent, leaf)
    return gram_fn(leaf), cross + cross.T

  return gram_fn


def gram(leaf: jax.Array, compute_dtype) -> jax.Array:
  """Returns ``M = G Gᵀ`` of a stacked leaf, as XLA:CPU computes it fastest.

  Equal to the plain contraction over the trailing axes up to float rounding
  (the blocks change the order of the additions), on one device or split
  over a mesh.

  Args:
    leaf: stacked gradients of shape ``(K, *s)``.
    compute_dtype: accumulation and output dtype (float32 or float64).

  Returns:
    A ``(K, K)`` array in ``compute_dtype``, replicated over any mesh.

  Raises:
    ValueError: if ``leaf`` is not a non-empty stacked leaf.

  Example:
    >>> import jax.numpy as jnp
    >>> from osgd_jax import cpu_gram
    >>> cpu_gram.gram(jnp.ones((2, 1000, 300)), jnp.float32)
    Array([[300000., 300000.],
           [300000., 300000.]], dtype=float32)
  """
  if leaf.ndim < 2 or math.prod(leaf.shape[1:]) == 0:
    raise ValueError(
        f"cpu_gram.gram expects a non-empty stacked leaf (K, *s), got shape"
        f" {leaf.shape}.")
  return _kernel(jnp.dtype(compute_dtype), leaf.ndim)(leaf)
