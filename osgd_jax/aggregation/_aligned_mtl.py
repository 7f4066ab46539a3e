"""Aligned-MTL: a preference-weighted sum of aligned (orthogonal) gradients."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from osgd_jax.aggregation import _checks, _engine, _linalg, _registry
from osgd_jax.aggregation._types import Granularity

#: The ``scale_mode`` values of :func:`aligned_mtl`.
ScaleMode = Literal["min", "median", "rmse"]
_NAME = "aligned_mtl"


def aligned_mtl_weighting(
  gram: jax.Array,
  *,
  pref_vector: jax.Array | Sequence[float] | None = None,
  scale_mode: ScaleMode = "min",
) -> jax.Array:
  """Aligned-MTL: the preference-weighted sum of aligned (orthogonal) gradients.

  Aligned-MTL replaces G by ``Ĝ = √λ · U Vᵀ`` (from the SVD ``G = U Σ Vᵀ``
  over the nonzero singular values), whose rows are orthogonal with equal
  norms ``√λ``: the gradients' conflicts and dominance removed, the condition
  number 1. The update is ``pᵀ Ĝ = wᵀ G`` with ``w = B p``,
  ``B = √λ · V_M Λ^{-1/2} V_Mᵀ`` on the nonzero eigenpairs of ``M``
  (``B = I`` when M is 0), and ``λ`` the smallest nonzero eigenvalue of M
  (``"min"``, the paper's), their median (``"median"``, the lower one) or
  their mean (``"rmse"``, the authors' code). Like TorchJD's, it works
  from the eigenpairs of M, whose small ones are known to ``eps`` times the
  largest: with norms spanning 1e-8…1e8, ``"median"`` and ``"rmse"`` lift
  such eigenvectors to the largest scale (about 1e-4 relative error in x64).

  Args:
    gram: ``(K, K)``.
    pref_vector: ``(K,)`` preferences p; ``None``: ``1/K`` each.
    scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.

  Returns:
    ``(K,)`` weights.

  Raises:
    ValueError: an unknown ``scale_mode`` or a ``pref_vector`` not of shape
      ``(K,)``.

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.asarray([[2.0, 0.0], [0.0, 1.0]])
    >>> [round(v, 4) for v in (aligned_mtl_weighting(g @ g.T) @ g).tolist()]
    [0.5, 0.5]

  """
  _checks.check_choice(scale_mode, "scale_mode", _NAME, ScaleMode)
  p = _checks.preference(gram, pref_vector, _NAME)
  k = gram.shape[-1]
  # Eigenvalues and M^(+1/2) with derivatives that need no eigenvector's:
  # finite at zero rows and repeated eigenvalues (docs/design.md, "Range,
  # rank and derivatives").
  lam, nonzero = _linalg.psd_eigvals(gram)
  rank = nonzero.sum()
  kept = jnp.where(nonzero, lam, 0.0)
  if scale_mode == "min":
    scale = jnp.min(jnp.where(nonzero, lam, jnp.inf))
  elif scale_mode == "median":
    # eigh sorts ascending, so the nonzero eigenvalues are the last `rank`.
    scale = lam[jnp.clip(k - rank + (rank - 1) // 2, 0, k - 1)]
  else:
    scale = kept.sum() / jnp.maximum(rank, 1)
  balance = jnp.sqrt(
    jnp.where(rank > 0, scale, 1.0)
  ) * _linalg.psd_power_matrix(gram, -0.5)
  balance = jnp.where(rank > 0, balance, jnp.eye(k, dtype=gram.dtype))
  return balance @ p


def aligned_mtl(
  num_exits: int | None = None,
  *,
  pref_vector: Sequence[float] | jax.Array | None = None,
  scale_mode: ScaleMode = "min",
  granularity: Granularity = "global",
) -> optax.GradientTransformationExtraArgs:
  """Aligned-MTL: the preference-weighted sum of the aligned gradients.

  The gradients are replaced by orthogonal ones of equal norm, spanning the
  same space (the condition number of the system made 1), and summed with
  the preferences (:func:`osgd_jax.weightings.aligned_mtl`, TorchJD's
  ``AlignedMTL``).

  Args:
    pref_vector: ``(K,)`` preferences; ``None``: ``1/K`` each.
    scale_mode: the common norm's square: the smallest nonzero eigenvalue of
      M (``"min"``, the paper's), their median (``"median"``) or mean
      (``"rmse"``).
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Raises:
    ValueError: an unknown ``scale_mode``, or a ``pref_vector`` that is not
      K finite numbers.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.aligned_mtl(num_exits=2)
    >>> g = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [0.5, 0.5]

  References:
    Senushkin, Patakin, Kuznetsov & Konushin, *Independent Component
    Alignment for Multi-Task Learning*, CVPR 2023.
    https://arxiv.org/abs/2305.19000
  """
  num_exits = _checks.check_num_exits(num_exits, _NAME)
  _checks.check_pref_vector(pref_vector, num_exits, _NAME)
  _checks.check_choice(scale_mode, "scale_mode", _NAME, ScaleMode)
  return _engine.from_weighting(
    functools.partial(
      aligned_mtl_weighting, pref_vector=pref_vector, scale_mode=scale_mode
    ),
    num_exits=num_exits,
    granularity=granularity,
    name=_NAME,
    # Weights of c·M: see docs/design.md, "Range, rank and derivatives".
    gram_degree=0.0,
  )


_registry.register("aligned-mtl", aligned_mtl, weighting=aligned_mtl_weighting)
