"""2-D convolutions whose weight gradient runs in a native kernel on XLA:CPU.

XLA:CPU computes a convolution's weight gradient ("backward filter") at a
fraction of the machine's speed: a 3×3 conv of 64×32×32×16 takes 12–24 ms
on 2 AVX2 cores, 3–6× the library's kernel
(``osgd_jax/csrc/conv_cpu.cc``) and 2× PyTorch's. A ResNet's backward is
mostly weight gradients, and a staged anytime Jacobian runs one per exit
that reaches a layer (``benchmarks/README.md``), so they set the speed of a
training step on CPU.

:func:`conv_general_dilated` is a drop-in replacement for
:func:`jax.lax.conv_general_dilated` (pass it to ``flax.nnx.Conv``'s
``conv_general_dilated``; the zoo's models do): the forward and the input
gradient are XLA's, the weight gradient is the kernel's where it applies
(:func:`takes`: the CPU backend, float32/float64, 2-D NHWC × HWIO, no
dilation, no groups), and otherwise everything is XLA's. Four rules keep it
a drop-in:

* differentiation: the convolution is a ``custom_vjp`` function, so
  reverse mode (``jax.grad``, ``jax.vjp``) is supported, and so are
  derivatives of gradients (``jax.grad`` of ``jax.grad``, ``jax.jvp`` of
  ``jax.grad``): the kernel's own tangents are XLA's weight gradients
  (``custom_jvp``). Forward mode through the convolution itself
  (``jax.jvp`` of a model) is not, as for any ``custom_vjp`` function:
  build the module with ``jax.lax.conv_general_dilated`` for that, or set
  ``OSGD_JAX_NATIVE=0`` before the first use (XLA's kernels throughout);
* batching: under ``jax.vmap`` the kernel runs once per batch element;
* sharding (``custom_partitioning``): over a mesh that splits the batch,
  each device forms its shard's weight gradient and the results are summed
  over those axes, the collectives of XLA's own weight gradient; any other
  split of the activations is gathered first;
* the result equals XLA's up to float rounding (both sum in the input
  dtype).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from osgd_jax import native

__all__ = ["conv_general_dilated", "takes", "weight_grad"]

_LAYOUT = ("NHWC", "HWIO", "NHWC")


def _is_layout(dimension_numbers: Any) -> bool:
  """Whether ``dimension_numbers`` names NHWC inputs and HWIO kernels."""
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, jax.lax.ConvDimensionNumbers):
    return dimension_numbers == jax.lax.conv_dimension_numbers(
        (1, 1, 1, 1), (1, 1, 1, 1), _LAYOUT)
  return tuple(dimension_numbers) == _LAYOUT


def _unit(values: Sequence[int] | None) -> bool:
  return values is None or all(int(v) == 1 for v in values)


def takes(lhs: jax.Array, rhs: jax.Array, *, dimension_numbers: Any = _LAYOUT,
          lhs_dilation: Sequence[int] | None = None,
          rhs_dilation: Sequence[int] | None = None,
          feature_group_count: int = 1, batch_group_count: int = 1,
          preferred_element_type: Any = None) -> bool:
  """Whether :func:`conv_general_dilated` differentiates this conv natively.

  Args:
    lhs: the input, ``(N, H, W, Ci)``.
    rhs: the kernel, ``(KH, KW, Ci, Co)``.
    dimension_numbers: as in :func:`jax.lax.conv_general_dilated`.
    lhs_dilation: input dilation.
    rhs_dilation: kernel dilation.
    feature_group_count: feature groups.
    batch_group_count: batch groups.
    preferred_element_type: the output dtype asked for, if any.

  Returns:
    ``True`` on the CPU backend with the kernel built (see
    :mod:`osgd_jax.native`), for float32/float64 operands of one dtype,
    2-D NHWC × HWIO, no dilation, no groups, the output in the input's
    dtype, and not under a mesh with ``Explicit`` axes.

  Example:
    >>> import jax.numpy as jnp
    >>> from osgd_jax import cpu_conv
    >>> cpu_conv.takes(jnp.ones((1, 8, 8, 3), jnp.float16),
    ...                jnp.ones((3, 3, 3, 4), jnp.float16))
    False
  """
  dtype = jnp.dtype(lhs.dtype)
  return (lhs.ndim == 4 and rhs.ndim == 4 and jnp.dtype(rhs.dtype) == dtype
          and _is_layout(dimension_numbers) and _unit(lhs_dilation)
          and _unit(rhs_dilation) and feature_group_count == 1
          and batch_group_count == 1
          and (preferred_element_type is None
               or jnp.dtype(preferred_element_type) == dtype)
          and _kernel_applies(lhs))


def _kernel_applies(x: jax.Array) -> bool:
  """Whether the kernel is built for x's dtype and may run on x.

  Not under ``Explicit`` mesh axes (:func:`osgd_jax.native.may_run_on`):
  there JAX types the gradient's sharding, and XLA's weight gradient is used.
  """
  return (jnp.dtype(x.dtype).name in native.CONV_TARGETS
          and native.may_run_on(x) and native.available())


def _local_weight_grad(x: jax.Array, dy: jax.Array, kernel_hw, strides,
                       low_pads) -> jax.Array:
  """The kernel's call on one device's data."""
  target, _ = native.CONV_TARGETS[jnp.dtype(x.dtype).name]
  out = jax.ShapeDtypeStruct((*kernel_hw, x.shape[-1], dy.shape[-1]), x.dtype)
  return jax.ffi.ffi_call(target, out)(
      x, dy, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
      pad_top=np.int64(low_pads[0]), pad_left=np.int64(low_pads[1]))


def _batch_axes(sharding: Any) -> tuple[str, ...]:
  """The mesh axes that split an NHWC array's batch axis."""
  spec = tuple(getattr(sharding, "spec", ()) or ())
  entry = spec[0] if spec else None
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


@functools.lru_cache(maxsize=None)
def _partitioned(kernel_hw, strides, low_pads):
  """``(x, dy) -> dw`` with a sharding rule: batch shards, then a sum."""

  @custom_partitioning
  def weight_grad_fn(x, dy):
    return _local_weight_grad(x, dy, kernel_hw, strides, low_pads)

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    replicated = NamedSharding(mesh, PartitionSpec())
    x_sharding = arg_shapes[0].sharding
    axes = (_batch_axes(x_sharding)
            if isinstance(x_sharding, NamedSharding) else ())
    # Only the batch stays split (both operands alike); the rest is gathered.
    split = NamedSharding(mesh, PartitionSpec(axes or None))

    def lower_fn(x, dy):
      partial = _local_weight_grad(x, dy, kernel_hw, strides, low_pads)
      return jax.lax.psum(partial, axes) if axes else partial

    return mesh, lower_fn, replicated, (split, split)

  def infer_sharding(mesh, arg_shapes, result_shape):
    del arg_shapes, result_shape
    return NamedSharding(mesh, PartitionSpec())

  weight_grad_fn.def_partition(
      partition=partition, infer_sharding_from_operands=infer_sharding,
      sharding_rule="n h w c, n i j o -> a b c o", reduction_factors=("n",),
      need_replication_factors=("h", "w", "i", "j"))
  return weight_grad_fn


@functools.lru_cache(maxsize=None)
def _batchable(kernel_hw, strides, low_pads):
  """:func:`_partitioned` with a batching rule: one kernel call per element."""
  partitioned = _partitioned(kernel_hw, strides, low_pads)

  @jax.custom_batching.custom_vmap
  def weight_grad_fn(x, dy):
    return partitioned(x, dy)

  @weight_grad_fn.def_vmap
  def batched(axis_size, in_batched, x, dy):
    del axis_size
    x_batched, dy_batched = in_batched
    if x_batched and dy_batched:
      return jax.lax.map(lambda xd: weight_grad_fn(*xd), (x, dy)), True
    if x_batched:
      return jax.lax.map(lambda xi: weight_grad_fn(xi, dy), x), True
    if dy_batched:
      return jax.lax.map(lambda di: weight_grad_fn(x, di), dy), True
    return weight_grad_fn(x, dy), False

  return weight_grad_fn


def _xla_weight_grad(x, dy, kernel_hw, strides, pads):
  """XLA's weight gradient: the VJP of the convolution with respect to w."""
  w = jnp.zeros((*kernel_hw, x.shape[-1], dy.shape[-1]), x.dtype)
  _, vjp = jax.vjp(
      lambda w_: jax.lax.conv_general_dilated(
          x, w_, strides, pads, dimension_numbers=_LAYOUT), w)
  return vjp(dy)[0]


@functools.lru_cache(maxsize=None)
def _weight_grad_fn(kernel_hw, strides, pads):
  """``(x, dy) -> dw`` by the kernel, differentiable through XLA's form.

  dw is bilinear in (x, dy), so its tangent is ``dw(ẋ, dy) + dw(x, ḋy)``;
  those are XLA's weight gradients, which JAX can transpose and
  differentiate again (second-order derivatives of a model).
  """
  batchable = _batchable(kernel_hw, strides, (pads[0][0], pads[1][0]))

  @jax.custom_jvp
  def weight_grad_fn(x, dy):
    return batchable(x, dy)

  @weight_grad_fn.defjvp
  def weight_grad_jvp(primals, tangents):
    (x, dy), (x_dot, dy_dot) = primals, tangents
    tangent = (_xla_weight_grad(x_dot, dy, kernel_hw, strides, pads)
               + _xla_weight_grad(x, dy_dot, kernel_hw, strides, pads))
    return weight_grad_fn(x, dy), tangent

  return weight_grad_fn


def _explicit_pads(padding, in_hw, kernel_hw, strides
                   ) -> tuple[tuple[int, int], ...] | None:
  """``padding`` as (low, high) pairs, or ``None`` if it has a negative pad."""
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads(in_hw, kernel_hw, strides, padding)
  else:
    pads = padding
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if len(pads) != 2 or any(lo < 0 or hi < 0 for lo, hi in pads):
    return None
  return pads


def weight_grad(x: jax.Array, dy: jax.Array, kernel_hw: Sequence[int],
                strides: Sequence[int], padding: str | Sequence[tuple[int, int]]
                ) -> jax.Array:
  """The weight gradient of an NHWC × HWIO convolution, by the native kernel.

  Args:
    x: the convolution's input, ``(N, H, W, Ci)``, float32 or float64.
    dy: the cotangent of its output, ``(N, OH, OW, Co)``, same dtype.
    kernel_hw: ``(KH, KW)``.
    strides: ``(sh, sw)``, each ≥ 1.
    padding: ``"SAME"``/``"VALID"`` or ``((top, bottom), (left, right))``,
      non-negative.

  Returns:
    ``dw``, ``(KH, KW, Ci, Co)`` in ``x``'s dtype: the VJP of
    ``jax.lax.conv_general_dilated(x, ·, strides, padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"))`` at ``dy``.

  Raises:
    ValueError: shapes that do not describe one convolution, or a negative
      padding.
    RuntimeError: the kernel is unavailable here (:func:`takes`).

  Example:
    >>> import jax.numpy as jnp
    >>> from osgd_jax import cpu_conv
    >>> x = jnp.ones((2, 4, 4, 1))
    >>> dw = cpu_conv.weight_grad(x, jnp.ones((2, 4, 4, 1)), (3, 3), (1, 1),
    ...                           "SAME")
    >>> dw[:, :, 0, 0]
    Array([[18., 24., 18.],
           [24., 32., 24.],
           [18., 24., 18.]], dtype=float32)
  """
  kernel_hw = tuple(int(k) for k in kernel_hw)
  strides = tuple(int(s) for s in strides)
  if x.ndim != 4 or dy.ndim != 4 or len(kernel_hw) != 2 or len(strides) != 2:
    raise ValueError(
        f"cpu_conv.weight_grad takes x (N, H, W, Ci) and dy (N, OH, OW, Co)"
        f" of a 2-D convolution; got x {x.shape}, dy {dy.shape}, kernel"
        f" {kernel_hw}, strides {strides}.")
  if min(strides) < 1 or min(kernel_hw) < 1:
    raise ValueError(f"strides and kernel sizes must be >= 1; got strides"
                     f" {strides}, kernel {kernel_hw}.")
  pads = _explicit_pads(padding, x.shape[1:3], kernel_hw, strides)
  if pads is None:
    raise ValueError(f"cpu_conv.weight_grad needs non-negative padding; got"
                     f" {padding!r}.")
  expected = tuple(
      (size + lo + hi - k) // s + 1
      for size, (lo, hi), k, s in zip(x.shape[1:3], pads, kernel_hw, strides))
  if dy.shape[0] != x.shape[0] or tuple(dy.shape[1:3]) != expected:
    raise ValueError(
        f"dy must have shape (N, OH, OW, Co) = ({x.shape[0]}, {expected[0]},"
        f" {expected[1]}, Co) for x {x.shape}, kernel {kernel_hw}, strides"
        f" {strides} and padding {pads}; got {dy.shape}.")
  if dy.dtype != x.dtype or not _kernel_applies(x):
    raise RuntimeError(
        f"cpu_conv.weight_grad needs the native kernel for {x.dtype} (and dy"
        f" in the same dtype, got {dy.dtype}) on the CPU backend, which is"
        " unavailable here (see osgd_jax.native); conv_general_dilated falls"
        " back to XLA by itself.")
  return _weight_grad_fn(kernel_hw, strides, pads)(x, dy)


@functools.lru_cache(maxsize=None)
def _conv(strides, pads, precision):
  """The convolution with XLA's forward and dX and the kernel's dW."""

  def forward(x, w):
    return jax.lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=_LAYOUT, precision=precision)

  @jax.custom_vjp
  def conv(x, w):
    return forward(x, w)

  def conv_fwd(x, w):
    return forward(x, w), (x, w)

  def conv_bwd(residuals, dy):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x_: forward(x_, w), x)
    (dx,) = input_vjp(dy)
    dw = _weight_grad_fn(w.shape[:2], strides, pads)(x, dy)
    return dx, dw

  conv.defvjp(conv_fwd, conv_bwd)
  return conv


def conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None, feature_group_count: int = 1,
    batch_group_count: int = 1, precision: Any = None,
    preferred_element_type: Any = None, **kwargs: Any) -> jax.Array:
  """:func:`jax.lax.conv_general_dilated`, with a native weight gradient on CPU.

  Same arguments and result. Where :func:`takes` holds, the gradient with
  respect to ``rhs`` runs in the library's kernel; everywhere else this is
  :func:`jax.lax.conv_general_dilated` itself.

  Args:
    lhs: the input.
    rhs: the kernel.
    window_strides: strides.
    padding: ``"SAME"``, ``"VALID"``, ``"SAME_LOWER"`` or (low, high) pairs.
    lhs_dilation: input dilation.
    rhs_dilation: kernel dilation.
    dimension_numbers: layouts, e.g. ``("NHWC", "HWIO", "NHWC")``.
    feature_group_count: feature groups.
    batch_group_count: batch groups.
    precision: XLA's precision for the forward and input gradient.
    preferred_element_type: the output dtype.
    **kwargs: passed on to :func:`jax.lax.conv_general_dilated` (e.g.
      ``out_sharding``); any given disables the native path.

  Returns:
    The convolution's output.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from osgd_jax import cpu_conv
    >>> conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0),
    ...                 conv_general_dilated=cpu_conv.conv_general_dilated)
    >>> conv(jnp.ones((2, 8, 8, 3))).shape
    (2, 8, 8, 4)
  """
  xla = functools.partial(
      jax.lax.conv_general_dilated, lhs, rhs, window_strides, padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  if any(value is not None for value in kwargs.values()) or not takes(
      lhs, rhs, dimension_numbers=dimension_numbers,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      preferred_element_type=preferred_element_type):
    return xla(**kwargs)
  strides = tuple(int(s) for s in window_strides)
  pads = _explicit_pads(padding, lhs.shape[1:3], rhs.shape[:2], strides)
  if pads is None:
    return xla(**kwargs)
  return _conv(strides, pads, precision)(lhs, rhs)
