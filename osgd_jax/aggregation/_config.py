"""ConFIG: the conflict-free direction with equal cosines to every gradient."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from osgd_jax import gram as gram_lib
from osgd_jax.aggregation import _checks, _engine, _linalg, _registry
from osgd_jax.aggregation._types import Granularity


def config_weighting(
  gram: jax.Array, *, pref_vector: jax.Array | Sequence[float] | None = None
) -> jax.Array:
  """ConFIG: the conflict-free direction with equal cosines to every gradient.

  The direction v solves ``Ĝ v = p`` in the least-squares sense of minimum
  norm (``v = Ĝ⁺ p``, Ĝ the gradients scaled to unit norm, p = 1 by
  default: equal cosines with every gradient, hence none conflicts), and the
  update is ``u = (Σ_i ⟨g_i, v̂⟩) v̂`` with ``v̂ = v / ‖v‖``: the unit
  direction, as long as the gradients' summed projections on it. Exact from
  the Gram matrix: ``v = Σ_k β_k ĝ_k`` with ``β = C⁺ p`` for the cosines C.
  TorchJD's ``ConFIG``; 0 when v is.

  Properties: non-conflicting when ``Ĝ v = p`` is solvable with ``p > 0``
  (in particular for linearly independent gradients); invariant to the
  exits' order (uniform p) and, in direction, to each gradient's scale.
  Numerics: v is as ill-conditioned as Ĝ, and the Gram matrix squares that
  condition number (TorchJD takes the pseudo-inverse of Ĝ itself): in
  float32, gradients whose cosines are within about 1e-3 of ±1 give an
  inaccurate v, and the update may then conflict.

  Args:
    gram: ``(K, K)``.
    pref_vector: ``(K,)`` the target cosines' proportions; ``None``: ones.

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [0.0, 2.0]])
    >>> [round(v, 4) for v in (config_weighting(g @ g.T) @ g).tolist()]
    [1.5, 1.5]

  """
  k = gram.shape[-1]
  p = (
    jnp.ones((k,), gram.dtype)
    if pref_vector is None
    else _checks.preference(gram, pref_vector, "config")
  )
  norms, corr = gram_lib.gram_statistics(gram)
  # C⁺ differentiates as a matrix function: finite at zero rows and
  # repeated eigenvalues (docs/design.md, "Range, rank and derivatives").
  beta = _linalg.pinv_apply(corr, p)
  c_beta = corr @ beta
  v_sq = beta @ c_beta  # ‖v‖²
  length_times_norm = norms @ c_beta  # Σ_i ⟨g_i, v⟩
  return (
    (length_times_norm * gram_lib.safe_inverse(v_sq))
    * beta
    * (gram_lib.safe_inverse(norms))
  )


def config(
  num_exits: int | None = None,
  *,
  pref_vector: Sequence[float] | jax.Array | None = None,
  granularity: Granularity = "global",
) -> optax.GradientTransformationExtraArgs:
  """ConFIG: a conflict-free direction with equal cosines to every gradient.

  ``u = (Σ_i ⟨g_i, v̂⟩) v̂`` with ``v = Ĝ⁺ p`` for the unit gradients Ĝ
  (:func:`osgd_jax.weightings.config`, TorchJD's ``ConFIG``), exact from the
  Gram matrix.

  Args:
    pref_vector: ``(K,)`` proportions of the target cosines; ``None``: ones.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.aggregation.config(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [1.5, 1.5]

  References:
    Liu, Chu & Thuerey, *ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks*, ICLR 2025. https://arxiv.org/abs/2408.11104
  """
  name = "config"
  num_exits = _checks.check_num_exits(num_exits, name)
  _checks.check_pref_vector(pref_vector, num_exits, name)
  return _engine.from_weighting(
    functools.partial(config_weighting, pref_vector=pref_vector),
    num_exits=num_exits,
    granularity=granularity,
    name=name,
    # Weights of c·M: see docs/design.md, "Range, rank and derivatives".
    gram_degree=0.0,
  )


_registry.register("config", config, weighting=config_weighting)
