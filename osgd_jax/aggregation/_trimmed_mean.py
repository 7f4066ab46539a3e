"""Trimmed mean: per coordinate, the mean of the exits' non-extreme values."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import optax

from osgd_jax.aggregation import _checks, _coordinatewise, _registry


def trimmed_mean(
  num_exits: int | None = None,
  *,
  trim_number: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """Trimmed mean: per coordinate, the mean of the exits' non-extreme values.

  Every coordinate's K values are sorted and the ``trim_number`` largest and
  smallest dropped; the update is the mean of the rest (TorchJD's
  ``TrimmedMean``; Yin et al.'s coordinate-wise trimmed mean, robust to
  ``trim_number`` arbitrary gradients). No weighting of the Gram matrix
  gives it, so it is not :func:`~osgd_jax.aggregation.from_weighting` of
  one: it sorts the stacked gradients along K, leaf by leaf (coordinates
  are independent, so there is no ``granularity``).

  Args:
    trim_number: how many values to drop at each end, ``≥ 0``;
      ``K ≥ 2 trim_number + 1``.
    num_exits: K (required; see :func:`osgd_jax.osgd`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`~osgd_jax.aggregation.CoordinateState`.

  Raises:
    ValueError: K is too small for ``trim_number``.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.trimmed_mean(3, trim_number=1)
    >>> g = {"w": jnp.array([[1.0, -5.0], [2.0, 0.0], [9.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"].tolist()   # the medians
    [2.0, 0.0]

  References:
    Yin, Chen, Kannan & Bartlett, *Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates*, ICML 2018.
    https://arxiv.org/abs/1803.01498
  """
  name = "trimmed_mean"
  num_exits = _checks.check_num_exits(num_exits, name)
  if (
    isinstance(trim_number, bool)
    or not isinstance(trim_number, int)
    or not 0 <= trim_number <= (num_exits - 1) // 2
  ):
    raise ValueError(
      f"{name}: trim_number must be an int with 0 <= trim_number and"
      f" num_exits >= 2 * trim_number + 1 (num_exits={num_exits}), got"
      f" {trim_number!r}."
    )

  kept_count = num_exits - 2 * trim_number

  def combine(leaf, key):
    del key
    rows = [leaf[i] for i in range(num_exits)]
    # K is small: an odd-even transposition network of elementwise min/max
    # sorts every coordinate in one pass each, where a sort along the K
    # axis is a slow kernel on XLA:CPU.
    for round_ in range(num_exits):
      for i in range(round_ % 2, num_exits - 1, 2):
        rows[i], rows[i + 1] = (
          jnp.minimum(rows[i], rows[i + 1]),
          jnp.maximum(rows[i], rows[i + 1]),
        )
    update = (
      functools.reduce(jnp.add, rows[trim_number : num_exits - trim_number])
      / kept_count
    )
    # Exit k's rank among the K values of each coordinate (ties by index),
    # for the diagnostics: which exits' values are kept.
    summed = []
    for k in range(num_exits):
      # Started from an array, so that K = 1 (no other exit) ranks 0 too.
      rank = sum(
        (
          ((leaf[j] < leaf[k]) | ((leaf[j] == leaf[k]) & (j < k))).astype(
            jnp.int32
          )
          for j in range(num_exits)
          if j != k
        ),
        jnp.zeros(leaf.shape[1:], jnp.int32),
      )
      inside = (rank >= trim_number) & (rank < num_exits - trim_number)
      # A sum over the parameter axes as they are: a reshape would merge
      # axes split over devices (docs/design.md, "Sharding").
      summed.append(inside.astype(leaf.dtype).sum())
    return update, jnp.stack(summed) / kept_count

  return _coordinatewise.coordinatewise(
    combine, num_exits=num_exits, seed=None, name=name
  )


_registry.register("trimmed-mean", trimmed_mean)
