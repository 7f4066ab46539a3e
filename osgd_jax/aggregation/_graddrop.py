"""GradDrop: per coordinate, keep one sign, chosen at random by its purity."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from osgd_jax import gram as gram_lib
from osgd_jax.aggregation import _checks, _coordinatewise, _registry


def graddrop(
  num_exits: int | None = None,
  *,
  leak: Sequence[float] | None = None,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """GradDrop: per coordinate, keep one sign, chosen at random by its purity.

  For every coordinate, ``P = ½(1 + Σ_k g_k / Σ_k |g_k|)`` measures how
  positive the exits' values are; with U uniform on [0, 1], exit k's value
  is kept where ``P > U`` and it is positive, or ``P < U`` and it is
  negative, and the update is ``Σ_k (ℓ_k + (1 − ℓ_k) m_k) g_k`` (m the kept
  mask, ℓ the leak). As TorchJD's ``GradDrop``, it is applied to the
  parameters' gradients (the paper applies it at a shared activation
  layer), with the identity as the paper's f. Coordinates where every value
  is 0 give 0. U is drawn from a PRNG key that the state carries, split at
  every update.

  Args:
    leak: ``(K,)`` the leak ℓ_k in [0, 1] of each exit (1: always kept);
      ``None``: zeros.
    seed: seeds U.
    num_exits: K (required; see :func:`osgd_jax.osgd`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`~osgd_jax.aggregation.CoordinateState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.graddrop(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, -2.0], [3.0, -1.0]])}   # signs agree
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"].tolist()
    [4.0, -3.0]

  References:
    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, *Just Pick a
    Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout*,
    NeurIPS 2020. https://arxiv.org/abs/2010.06808
  """
  name = "graddrop"
  num_exits = _checks.check_num_exits(num_exits, name)
  _checks.check_seed(seed, name)
  if leak is not None:
    leaks = np.asarray(leak, np.float64)
    if leaks.shape != (num_exits,) or not np.all((leaks >= 0) & (leaks <= 1)):
      raise ValueError(
        f"{name}: leak must be {num_exits} numbers in [0, 1] (one per exit,"
        f" num_exits={num_exits}), got {leak!r}."
      )

  def combine(leaf, key):
    k = leaf.shape[0]
    ell = [0.0] * k if leak is None else [float(x) for x in leak]
    # The sums over K are written row by row: elementwise adds of K rows,
    # which XLA:CPU runs far faster than a reduction over the leading axis.
    rows = [leaf[i] for i in range(k)]
    total = functools.reduce(jnp.add, [jnp.abs(r) for r in rows])
    purity = 0.5 * (
      1.0 + functools.reduce(jnp.add, rows) * gram_lib.safe_inverse(total)
    )
    u = jax.random.uniform(key, leaf.shape[1:], leaf.dtype)
    above, below = purity > u, purity < u
    update, summed = jnp.zeros_like(total), []
    for row, leak_k in zip(rows, ell, strict=True):
      kept = (above & (row > 0)) | (below & (row < 0))
      multiplier = leak_k + (1.0 - leak_k) * kept.astype(leaf.dtype)
      update = update + multiplier * row
      summed.append(multiplier.sum())
    return update, jnp.stack(summed)

  return _coordinatewise.coordinatewise(
    combine, num_exits=num_exits, seed=seed, name=name
  )


_registry.register("graddrop", graddrop)
