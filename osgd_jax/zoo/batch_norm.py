"""BatchNorm whose train-mode statistic updates trace in linear time.

:class:`flax.nnx.BatchNorm` (flax 0.12) writes its running statistics with
``stat[...] = new``. For a full replacement of the same shape and dtype,
flax's ``Variable.set_value`` first compares the old and the new value's
shardings with ``getattr(value, "sharding", None)``. Inside a trace the new
value is a tracer (and so is the old one), and JAX answers that lookup with
an ``AttributeError`` whose message it composes there and then, by searching
the whole program traced so far for the tracer's origin. That is two
searches of the program per statistic, four per BatchNorm layer, so tracing
a network with n BatchNorm layers costs about n times its program's size:
quadratic in its depth, on every backend. ``Variable.set_value(new)``
without an index replaces the value with no comparison.

:class:`BatchNorm` is flax's module (constructor, parameters,
``nnx.BatchStat`` statistics, ``nnx.view`` and ``nnx.bridge`` names) whose
train-mode step computes flax's statistics and normalisation in the same
operations, in the same order, and stores the new running statistics with
``set_value``. Masks, ``axis_name``, complex inputs and the running-average
mode go to flax's own ``__call__`` unchanged. ``docs/design.md`` ("The
zoo's BatchNorm") has the measurements; ``tests/zoo/test_zoo_batchnorm.py``
checks the outputs and statistics against flax's, bit for bit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from jax import lax

__all__ = ["BatchNorm"]


class BatchNorm(nnx.BatchNorm):
  """:class:`flax.nnx.BatchNorm` with a train-mode step that traces in linear
  time (see the module docstring).

  Takes the same arguments and holds the same state as flax's BatchNorm. In
  train mode the running statistics are replaced by ``Variable.set_value``
  and never carry a gradient (``lax.stop_gradient``, as flax does for
  statistics it may update).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> norm = BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    >>> x = jnp.arange(6.0).reshape(2, 3)
    >>> y = nnx.jit(lambda norm, x: norm(x))(norm, x)
    >>> norm.mean[...]  # 0.9 * 0 + 0.1 * the batch mean
    Array([0.15, 0.25, 0.35], dtype=float32)
  """

  def __call__(
    self,
    x: Any,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Normalises ``x``, as :meth:`flax.nnx.BatchNorm.__call__` does.

    Args:
      x: the input; features on ``self.axis``.
      use_running_average: overrides the constructor's flag, as in flax.
      mask: positions that count in the statistics (flax's own step).

    Returns:
      The normalised input, of flax's shape and dtype.
    """
    if use_running_average is None:
      use_running_average = self.use_running_average
    if (
      use_running_average is not False
      or mask is not None
      or self.axis_name is not None
      or jnp.iscomplexobj(x)
    ):
      return super().__call__(x, use_running_average, mask=mask)
    axes = self.axis if isinstance(self.axis, tuple | list) else (self.axis,)
    feature_axes = sorted({a % x.ndim for a in axes})
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, _, _, scale, bias = self.promote_dtype(
      (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
    )
    # The batch statistics in at least float32, flax's fast variance
    # E[x²] - E[x]² clipped at 0 by default.
    stats_dtype = jnp.promote_types(
      jnp.result_type(x) if self.dtype is None else self.dtype, jnp.float32
    )
    x_stats = jnp.asarray(x, stats_dtype)
    mean = x_stats.mean(reduction_axes)
    if self.use_fast_variance:
      mean_of_square = lax.square(x_stats).mean(reduction_axes)
      var = jnp.maximum(0.0, mean_of_square - lax.square(mean))
    else:
      centred = x_stats - jnp.expand_dims(mean, reduction_axes)
      var = lax.square(centred).mean(reduction_axes)
    _replace(
      self.mean, self.momentum * self.mean[...] + (1 - self.momentum) * mean
    )
    _replace(
      self.var, self.momentum * self.var[...] + (1 - self.momentum) * var
    )
    stats_shape = [
      1 if i in reduction_axes else d for i, d in enumerate(x.shape)
    ]
    feature_shape = [
      d if i in feature_axes else 1 for i, d in enumerate(x.shape)
    ]
    y = x - mean.reshape(stats_shape)
    multiplier = lax.rsqrt(var.reshape(stats_shape) + self.epsilon)
    operands = [x]
    if scale is not None:
      multiplier *= scale.reshape(feature_shape)
      operands.append(scale)
    y *= multiplier
    if bias is not None:
      y += bias.reshape(feature_shape)
      operands.append(bias)
    return jnp.asarray(
      y, dtypes.canonicalize_dtype(*operands, dtype=self.dtype)
    )


def _replace(stat: nnx.Variable, new: jax.Array) -> None:
  """``stat[...] = new`` without flax's sharding comparison, where they agree.

  ``set_value`` stores ``new`` as it is; flax's indexed write would cast a
  value of another dtype or broadcast another shape, so those go through it.
  """
  new = lax.stop_gradient(new)
  old = stat.get_value()
  if new.shape == old.shape and new.dtype == old.dtype:
    stat.set_value(new)
  else:
    stat[...] = new
