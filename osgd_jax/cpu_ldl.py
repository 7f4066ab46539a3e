"""Gram–Schmidt weights from Gram matrices on XLA:CPU, in one native call.

:func:`osgd_jax.orthogonalize.ldl_weights` is O(K³) scalar work, but
written with XLA operations it cannot be fused into one kernel: each pivot's
reciprocal feeds many later entries, so XLA:CPU launches the factorisation as
about K + 10 tiny kernels (K = 8: ~20 of ~1.5 µs each), which costs more
than the arithmetic and, in a small network's step, more than the Gram
matrices. The native kernel (``osgd_jax/csrc/ldl_cpu.cc``, built and loaded
by :mod:`osgd_jax.native`) does the same algebra for a whole batch of
matrices in one call.

Three rules make :func:`ldl_weights` a drop-in replacement:

* batching: ``jax.vmap`` adds leading axes, which the kernel takes as more
  matrices (``tol`` may be batched too);
* differentiation (``custom_jvp``): the tangents are those of the XLA form,
  so an update stays differentiable;
* sharding: its operands are K×K matrices, replicated over any mesh; it is
  computed where they are.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from osgd_jax import native

__all__ = ["ldl_weights", "uses_native"]


def uses_native(dtype, num_exits: int) -> bool:
  """Whether :func:`ldl_weights` runs the native kernel for this dtype and K.

  Args:
    dtype: the Gram matrices' dtype (float32 or float64).
    num_exits: K.

  Returns:
    :func:`osgd_jax.native.supports` for the LDLᵀ kernel.
  """
  return native.supports(native.LDL_TARGETS, dtype, num_exits)


@functools.lru_cache(maxsize=None)
def _kernel(dtype, rescale: bool) -> Callable:
  """``(gram, tol) -> (weights, residual_sq)`` by the native kernel."""
  # orthogonalize imports this module; by the time a kernel is built, both
  # are loaded.
  from osgd_jax.orthogonalize import ldl_weights_xla  # pylint: disable=C0415
  target, _ = native.LDL_TARGETS[dtype.name]

  def call(gram, tol):
    out = jax.ShapeDtypeStruct(gram.shape[:-1], dtype)
    # Under vmap, tol is broadcast to one value per matrix; the kernel reads
    # either one value or one per matrix.
    return tuple(jax.ffi.ffi_call(target, (out, out),
                                  vmap_method="broadcast_all")(
                                      gram, tol, rescale=rescale))

  @jax.custom_jvp
  def weights_fn(gram, tol):
    return call(gram, tol)

  @weights_fn.defjvp
  def weights_jvp(primals, tangents):
    return jax.jvp(
        lambda gram, tol: ldl_weights_xla(gram, tol=tol, rescale=rescale),
        primals, tangents)

  return weights_fn


def ldl_weights(gram: jax.Array, *, tol: float | jax.Array, rescale: bool
                ) -> tuple[jax.Array, jax.Array]:
  """:func:`osgd_jax.orthogonalize.ldl_weights` by the native kernel.

  Args:
    gram: ``(..., K, K)`` Gram matrices, float32 or float64, K ≤
      :data:`osgd_jax.native.MAX_EXITS`.
    tol: relative tolerance on the squared norm of a projected component.
    rescale: scale every kept component back to the norm of its input.

  Returns:
    ``(weights, residual_sq_norms)``, both ``(..., K)`` in ``gram``'s dtype.

  Raises:
    RuntimeError: the native kernel is unavailable for this dtype.
    ValueError: ``gram`` is not ``(..., K, K)`` with
      ``1 <= K <= osgd_jax.native.MAX_EXITS``.

  Example:
    >>> import jax.numpy as jnp
    >>> from osgd_jax import cpu_ldl
    >>> gram = jnp.array([[1.0, 2.0], [2.0, 4.0]])  # g_2 = 2 g_1
    >>> cpu_ldl.ldl_weights(gram, tol=1e-6, rescale=False)
    (Array([1., 0.], dtype=float32), Array([1., 0.], dtype=float32))
  """
  dtype = jnp.dtype(gram.dtype)
  num_exits = gram.shape[-1]
  if (not 1 <= num_exits <= native.MAX_EXITS
      or gram.shape[-2] != num_exits):
    raise ValueError(
        f"cpu_ldl expects (..., K, K) Gram matrices with 1 <= K <="
        f" {native.MAX_EXITS}; got shape {gram.shape}.")
  if not uses_native(dtype, num_exits):
    raise RuntimeError(
        f"cpu_ldl needs the native kernel for {dtype.name} Gram matrices,"
        " which is unavailable here (float32/float64 only; see"
        " osgd_jax.native). osgd_jax.orthogonalize.ldl_weights falls back to"
        " XLA by itself.")
  tol = jnp.asarray(tol, dtype)
  return _kernel(dtype, bool(rescale))(gram, tol)
