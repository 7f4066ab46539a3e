"""IMTL-G: the update with equal projections on every exit's unit gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from osgd_jax import gram as gram_lib
from osgd_jax.aggregation import _engine, _linalg, _registry
from osgd_jax.aggregation._types import Granularity


def imtl_g_weighting(gram: jax.Array) -> jax.Array:
  """IMTL-G: the update whose projections on every unit gradient are equal.

  Impartial multi-task learning (gradient part) looks for ``u = wᵀ G`` with
  ``Σ w = 1`` and ``⟨u, g_k/‖g_k‖⟩`` the same for every k, so that no exit
  is favoured: ``M w ∝ d`` with ``d_k = ‖g_k‖``. In the generalisation of
  Quinton & Rey (TorchJD's ``IMTLG``), which also covers linearly dependent
  gradients, ``w = M⁺ d / Σ(M⁺ d)``, with ``M⁺`` the pseudo-inverse (its
  eigenvalues at or below ``K·eps·λ_max`` counted as zero). The weights are 0
  where ``Σ(M⁺ d)`` is zero to rounding, relative to ``Σ|M⁺ d|``. When the
  nonzero gradients are linearly independent, ``M⁺ d`` is computed in the
  basis ``g_k/‖g_k‖``, exact for norms from 1e-8 to 1e8 (TorchJD's pinv of M
  is not); linearly dependent gradients of very different norms remain
  ill-conditioned.

  Invariance: scaling gradient k by ``c_k > 0`` leaves the line of u
  unchanged; its size, and even its sign, follow the normalisation
  ``Σ w = 1``, which the scales change.

  Args:
    gram: ``(K, K)``.

  Returns:
    ``(K,)`` weights summing to 1 (or 0).

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [0.0, 3.0]])
    >>> # The update makes equal cosines with the two gradients.
    >>> [round(v, 4) for v in (imtl_g_weighting(g @ g.T) @ g).tolist()]
    [0.75, 0.75]

  """
  # When the nonzero rows are independent, M⁺ d = S⁻¹ C⁺ 1 for M = S C S,
  # S = diag(‖g_k‖), C the cosines: exact, without squaring the rows' scales
  # into the condition number (norms from 1e-8 to 1e8 would leave nothing
  # of M's small eigenvalues). Otherwise (S C S)⁺ ≠ S⁻¹ C⁺ S⁻¹, and M⁺ d
  # is formed from M itself.
  # The pseudo-inverses differentiate as matrix functions (finite at zero
  # rows and repeated eigenvalues: docs/design.md, "Range, rank and
  # derivatives").
  norms, corr = gram_lib.gram_statistics(gram)
  _, keep_c = _linalg.psd_eigvals(corr)
  rows = norms > 0
  equilibrated = _linalg.pinv_apply(
    corr, rows.astype(gram.dtype)
  ) * gram_lib.safe_inverse(norms)
  direct = _linalg.pinv_apply(gram, norms)
  v = jnp.where(keep_c.sum() == rows.sum(), equilibrated, direct)
  total = v.sum()
  degenerate = jnp.abs(total) <= (
    gram.shape[-1] * jnp.finfo(gram.dtype).eps * jnp.abs(v).sum()
  )
  return jnp.where(degenerate, 0.0, v / jnp.where(degenerate, 1.0, total))


def imtl_g(
  num_exits: int | None = None,
  *,
  granularity: Granularity = "global",
) -> optax.GradientTransformationExtraArgs:
  """IMTL-G: the update with equal projections on every exit's unit gradient.

  ``u = Σ_k w_k g_k`` with ``w = M⁺ d / Σ(M⁺ d)``, ``d_k = ‖g_k‖``
  (:func:`osgd_jax.weightings.imtl_g`, TorchJD's ``IMTLG``): ``⟨u, g_k⟩ /
  ‖g_k‖`` is the same for every exit, so none is favoured.

  Invariance: scaling exit k's gradient by ``c_k > 0`` leaves the line of
  u unchanged (its size and sign follow the normalisation ``Σ w = 1``);
  invariant to the exits' order.

  Args:
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.imtl_g(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [0.75, 0.75]

  References:
    Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021.
    https://openreview.net/forum?id=IMPnRXEWpvr
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024.
    https://arxiv.org/abs/2406.16232
  """
  return _engine.from_weighting(
    imtl_g_weighting,
    num_exits=num_exits,
    granularity=granularity,
    name="imtl_g",
    # Weights of c·M: see docs/design.md, "Range, rank and derivatives".
    gram_degree=0.0,
  )


_registry.register("imtl-g", imtl_g, weighting=imtl_g_weighting)
