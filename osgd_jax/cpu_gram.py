"""Gram matrices of stacked leaves on XLA:CPU: a native kernel, or flat views.

XLA:CPU runs ``M = G Gᵀ`` of a stacked leaf ``(K, *s)`` far below what the
machine can do (``benchmarks/bench_transform.py``; 2 cores):

* it hands the product to a matrix-multiply library tuned for large square
  products, which streams this one (a K×K output, a contraction of length N)
  at a fraction of memory speed on one thread: at 10⁶ parameters and K=4,
  1.6 ms where one fused pass over the same buffer takes 0.23 ms;
* a contraction over several parameter axes, e.g. a conv kernel's four, is
  3–10× slower again than the same contraction over one flattened axis;
* every leaf is its own kernel launch, a fixed cost of a few µs that
  dominates networks with many small tensors.

This module computes the Gram matrices of any number of leaves in one call
of the library's native kernel (``osgd_jax/csrc/gram_cpu.cc``, built and
loaded by :mod:`osgd_jax.native`): register-blocked, multi-threaded, near
memory speed, one launch for all leaves. Without it (no C++ compiler,
``OSGD_JAX_NATIVE=0``) each leaf is viewed as ``(K, N)`` and, above
:data:`MIN_BYTES`, its Gram matrix is summed over blocks of
:data:`BLOCK_BYTES`, which XLA:CPU runs much faster than the plain
contraction. Accelerators run the plain contraction, so
:func:`osgd_jax.orthogonalize.gram_matrices` uses this module on the CPU
backend only, where :func:`worthwhile` says it pays.

Both forms merge dimensions (the kernel reads a leaf as K rows of N), which
is only safe on one device's own data: merging dimensions that are split
over devices would gather the leaf. Three rules make :func:`grams` a drop-in
replacement of the plain contractions:

* sharding (``custom_partitioning``): each device forms the Gram matrices of
  its own shards, then each leaf's K×K result is all-reduced over the mesh
  axes that split its parameter axes, the same collectives as the plain
  contraction. No leaf is ever gathered (only a split K axis is, which is not
  a layout this library makes);
* differentiation (``custom_jvp``): ``dM = Ġ Gᵀ + G Ġᵀ`` by plain
  contractions, so an update stays differentiable;
* batching (``custom_vmap``): under ``jax.vmap``, the plain batched
  contractions.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from osgd_jax import native

__all__ = ["MIN_BYTES", "BLOCK_BYTES", "gram", "grams", "uses_native",
           "worthwhile"]

# Without the native kernel: from this size of a stacked leaf on, summing
# blocks beats one long contraction on XLA:CPU (2 cores, 32 MiB L3), for
# K = 2, 4 and 8 alike.
MIN_BYTES = 8 << 20
# One block holds K rows of this many bytes in all, so that it stays in a
# core's L2 cache while its K×K products are formed (the best of 64 KiB to
# 1 MiB for K = 2, 4 and 8 alike).
BLOCK_BYTES = 256 << 10

# Full-precision products, as in osgd_jax.orthogonalize.
_PRECISION = jax.lax.Precision.HIGHEST


def uses_native(compute_dtype, num_exits: int) -> bool:
  """Whether :func:`grams` runs the native kernel for this dtype and K.

  Args:
    compute_dtype: float32 or float64.
    num_exits: K, the leaves' leading axis.

  Returns:
    :func:`osgd_jax.native.supports` for the Gram kernel.
  """
  return native.supports(native.TARGETS, compute_dtype, num_exits)


def _needs_blocks(leaf: jax.Array) -> bool:
  """Whether a stacked leaf (or one device's shard of it) is summed by blocks."""
  return leaf.size * leaf.dtype.itemsize > MIN_BYTES


def worthwhile(leaf: jax.Array, compute_dtype=jnp.float32) -> bool:
  """Whether this module beats XLA:CPU's plain contraction on this leaf.

  The native kernel does on every leaf (one launch for all, near memory
  speed). Without it, the flat view does for a leaf with several parameter
  axes and the blocks for a stacked leaf over :data:`MIN_BYTES`; a small
  vector's contraction is already flat.

  Args:
    leaf: a stacked leaf ``(K, *s)``.
    compute_dtype: the accumulation dtype it would be computed in.

  Returns:
    Whether :func:`grams` should take this leaf.
  """
  return (uses_native(compute_dtype, leaf.shape[0]) or leaf.ndim > 2
          or _needs_blocks(leaf))


def _rows_gram(rows: jax.Array, compute_dtype) -> jax.Array:
  """``rows @ rows.T`` of a ``(K, n)`` block, accumulated in compute dtype."""
  return jax.lax.dot_general(
      rows, rows, (((1,), (1,)), ((), ())), precision=_PRECISION,
      preferred_element_type=compute_dtype).astype(compute_dtype)


def _xla_gram(leaf: jax.Array, compute_dtype) -> jax.Array:
  """One device's ``(K, *s)`` data by XLA: a flat view, by blocks if large."""
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


def _local_grams(leaves: Sequence[jax.Array], compute_dtype) -> jax.Array:
  """``(L, K, K)`` Gram matrices of one device's data of every leaf."""
  num_exits = leaves[0].shape[0]
  if uses_native(compute_dtype, num_exits):
    dtype = jnp.dtype(compute_dtype)
    target, _ = native.TARGETS[dtype.name]
    call = jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct((len(leaves), num_exits, num_exits),
                                     dtype))
    # A low-precision leaf is widened first (one extra pass; rare on CPU).
    return call(*[leaf.astype(dtype) for leaf in leaves])
  grams_ = jnp.stack([_xla_gram(leaf, compute_dtype) for leaf in leaves])
  # XLA's dot may sum (i, j) and (j, i) in different orders; mirroring the
  # upper half makes the result exactly symmetric, as the native kernel's is.
  upper = jnp.triu(grams_)
  return upper + jnp.swapaxes(jnp.triu(grams_, 1), -1, -2)


def _mesh_axes(spec: PartitionSpec) -> tuple[str, ...]:
  """The mesh axes that split the parameter (trailing) axes of a leaf."""
  names = []
  for entry in tuple(spec)[1:]:
    if entry is not None:
      names.extend(entry if isinstance(entry, tuple) else (entry,))
  return tuple(names)


def _all_reduce_per_leaf(partial: jax.Array, axes_per_leaf) -> jax.Array:
  """Sums each leaf's K×K block over the mesh axes that split that leaf.

  Leaves split over the same axes share one all-reduce; leaves that are not
  split need none.
  """
  groups: dict[tuple[str, ...], list[int]] = {}
  for index, axes in enumerate(axes_per_leaf):
    if axes:
      groups.setdefault(axes, []).append(index)
  if not groups:
    return partial
  blocks = list(partial)
  for axes, indices in groups.items():
    summed = jax.lax.psum(jnp.stack([blocks[i] for i in indices]), axes)
    for position, i in enumerate(indices):
      blocks[i] = summed[position]
  return jnp.stack(blocks)


@functools.lru_cache(maxsize=None)
def _partitioned(compute_dtype, ndims: tuple[int, ...]):
  """``*leaves -> (L, K, K)`` with a sharding rule, for leaves of these ranks."""

  @custom_partitioning
  def grams_fn(*leaves):
    return _local_grams(leaves, compute_dtype)

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    replicated = NamedSharding(mesh, PartitionSpec())
    if not all(isinstance(a.sharding, NamedSharding) for a in arg_shapes):
      # A layout without named axes: let the partitioner gather it.
      return (mesh, lambda *xs: _local_grams(xs, compute_dtype), replicated,
              (replicated,) * len(arg_shapes))
    arg_shardings, axes_per_leaf = [], []
    for arg, ndim in zip(arg_shapes, ndims):
      spec = tuple(arg.sharding.spec) + (None,) * ndim
      # K is never split: every device needs all the rows of its shard.
      sharding = NamedSharding(mesh, PartitionSpec(None, *spec[1:ndim]))
      arg_shardings.append(sharding)
      axes_per_leaf.append(_mesh_axes(sharding.spec))

    def lower_fn(*local_leaves):
      partial = _local_grams(local_leaves, compute_dtype)
      return _all_reduce_per_leaf(partial, axes_per_leaf)

    return mesh, lower_fn, replicated, tuple(arg_shardings)

  def infer_sharding(mesh, arg_shapes, result_shape):
    del arg_shapes, result_shape
    return NamedSharding(mesh, PartitionSpec())

  operands, reduced = [], []
  for leaf_index, ndim in enumerate(ndims):
    factors = [f"p{leaf_index}_{axis}" for axis in range(1, ndim)]
    operands.append(" ".join(["k", *factors]))
    reduced.extend(factors)
  grams_fn.def_partition(
      partition=partition, infer_sharding_from_operands=infer_sharding,
      sharding_rule=f"{', '.join(operands)} -> l i j",
      reduction_factors=tuple(reduced))
  return grams_fn


@functools.lru_cache(maxsize=None)
def _kernel(compute_dtype, ndims: tuple[int, ...]):
  """:func:`_partitioned` with its batching and differentiation rules."""
  # orthogonalize imports this module; by the time a kernel is built, both
  # are loaded.
  from osgd_jax.orthogonalize import contract_trailing  # pylint: disable=C0415
  partitioned = _partitioned(compute_dtype, ndims)

  def contract(a, b):
    return contract_trailing(a, b, batch_a=True, batch_b=True,
                             compute_dtype=compute_dtype)

  @jax.custom_batching.custom_vmap
  def batchable(*leaves):
    return partitioned(*leaves)

  @batchable.def_vmap
  def batched(axis_size, in_batched, *leaves):
    if not any(in_batched):
      return batchable(*leaves), False
    leaves = [leaf if is_batched else jnp.broadcast_to(leaf, (axis_size,)
                                                        + leaf.shape)
              for leaf, is_batched in zip(leaves, in_batched)]
    return jax.vmap(lambda *xs: jnp.stack([contract(x, x) for x in xs]))(
        *leaves), True

  @jax.custom_jvp
  def grams_fn(*leaves):
    return batchable(*leaves)

  @grams_fn.defjvp
  def grams_jvp(primals, tangents):
    cross = jnp.stack([contract(t, x) for x, t in zip(primals, tangents)])
    return grams_fn(*primals), cross + jnp.swapaxes(cross, -1, -2)

  return grams_fn


def _check(leaves: Sequence[jax.Array]) -> None:
  if not leaves:
    raise ValueError("cpu_gram.grams needs at least one stacked leaf.")
  num_exits = leaves[0].shape[0] if leaves[0].ndim else 0
  for index, leaf in enumerate(leaves):
    if leaf.ndim < 1 or leaf.shape[0] == 0:
      raise ValueError(
          f"cpu_gram expects stacked leaves (K, *s) with K >= 1; leaf {index}"
          f" has shape {leaf.shape}.")
    if leaf.shape[0] != num_exits:
      raise ValueError(
          f"cpu_gram expects one K for all leaves; leaf 0 has K={num_exits},"
          f" leaf {index} has K={leaf.shape[0]}.")


def grams(leaves: Sequence[jax.Array], compute_dtype) -> jax.Array:
  """Returns the Gram matrices ``M_l = G_l G_lᵀ`` of stacked leaves, in one call.

  Equal to the plain contractions over the trailing axes up to float
  rounding, on one device or split over a mesh.

  Args:
    leaves: stacked gradients, each of shape ``(K, *s_l)``, one K for all.
    compute_dtype: accumulation and output dtype (float32 or float64).

  Returns:
    An ``(L, K, K)`` array in ``compute_dtype``, replicated over any mesh.

  Raises:
    ValueError: no leaves, a leaf without a leading K >= 1, or leaves with
      different K.

  Example:
    >>> import jax.numpy as jnp
    >>> from osgd_jax import cpu_gram
    >>> cpu_gram.grams([jnp.ones((2, 3)), jnp.ones((2, 4, 5))], jnp.float32)
    Array([[[ 3.,  3.],
            [ 3.,  3.]],
    <BLANKLINE>
           [[20., 20.],
            [20., 20.]]], dtype=float32)
  """
  leaves = list(leaves)
  _check(leaves)
  kernel = _kernel(jnp.dtype(compute_dtype), tuple(l.ndim for l in leaves))
  return kernel(*leaves)


def gram(leaf: jax.Array, compute_dtype) -> jax.Array:
  """Returns ``M = G Gᵀ`` of one stacked leaf: :func:`grams` of ``[leaf]``.

  Args:
    leaf: stacked gradients of shape ``(K, *s)``.
    compute_dtype: accumulation and output dtype (float32 or float64).

  Returns:
    A ``(K, K)`` array in ``compute_dtype``, replicated over any mesh.

  Raises:
    ValueError: if ``leaf`` has no leading K >= 1.

  Example:
    >>> import jax.numpy as jnp
    >>> from osgd_jax import cpu_gram
    >>> cpu_gram.gram(jnp.ones((2, 1000, 300)), jnp.float32)
    Array([[300000., 300000.],
           [300000., 300000.]], dtype=float32)
  """
  return grams([leaf], compute_dtype)[0]
