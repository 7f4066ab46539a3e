"""MGDA: the minimum-norm point of the convex hull of the exits' gradients."""

from __future__ import annotations

import functools

import jax
import optax

from osgd_jax.aggregation import _checks, _engine, _qp, _registry
from osgd_jax.aggregation._types import Granularity


def mgda_weighting(
  gram: jax.Array,
  *,
  max_iter: int = 100,
  tol: float | jax.Array = _qp.DEFAULT_TOL,
) -> jax.Array:
  """MGDA: the minimum-norm point of the convex hull of the gradients.

  ``w = argmin_{w ≥ 0, Σw = 1} ‖wᵀ G‖²``, the common descent direction of the
  multiple-gradient descent algorithm, in the form of Sener & Koltun (2018),
  who solve this QP on the Gram matrix by Frank–Wolfe. Here it is solved
  exactly by an active-set method, as a non-negative least squares problem
  at two scales, so that gradients whose norms span 1e-8 to 1e8 keep their
  say (``docs/design.md``, "Weightings: the one aggregation path").

  The update is a convex combination: its size is that of one gradient, not
  of their sum. It is 0 at a Pareto-stationary point (0 in the hull).

  Args:
    gram: ``(K, K)``.
    max_iter: cap on the active-set iterations (about K are needed).
    tol: relative tolerance of the optimality test.

  Returns:
    ``(K,)`` weights on the simplex.

  Example:
    >>> import jax.numpy as jnp
    >>> [round(v, 4) for v in mgda_weighting(jnp.eye(2)).tolist()]
    [0.5, 0.5]

  """
  return _qp.min_norm_point(gram, max_iter=max_iter, tol=tol)


def mgda(
  num_exits: int | None = None,
  *,
  granularity: Granularity = "global",
  max_iter: int = 100,
  tol: float = _qp.DEFAULT_TOL,
) -> optax.GradientTransformationExtraArgs:
  """MGDA: the minimum-norm point of the convex hull of the exits' gradients.

  ``u = Σ_k α_k g_k`` with ``α = argmin_{α ≥ 0, Σα = 1} ‖Σ_k α_k g_k‖²``
  (:func:`osgd_jax.weightings.mgda`), solved exactly under ``jax.jit``. No
  rescaling: u is a convex combination, so its size is that of one gradient,
  not of their sum (raise the learning rate by up to K against a summed
  loss). u = 0 when 0 is in the hull (a Pareto-stationary point).

  Properties: non-conflicting, ``⟨g_k, u⟩ ≥ ‖u‖² ≥ 0`` for every k;
  invariant to the exits' order; positively homogeneous (scaling all
  gradients by ``c > 0`` scales u by c); K=1 is the identity.

  Args:
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.
    max_iter: cap on active-set iterations (about K are needed).
    tol: relative tolerance of the optimality test.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState` (``weights`` is α).

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.mgda(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [0.5, 0.5]

  References:
    Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*,
    NeurIPS 2018. https://arxiv.org/abs/1810.04650
    Désidéri, *Multiple-gradient descent algorithm (MGDA) for
    multiobjective optimization*, Comptes Rendus Mathématique 350, 2012.
  """
  _checks.check_qp_options(max_iter, tol, "mgda")
  return _engine.from_weighting(
    functools.partial(mgda_weighting, max_iter=max_iter, tol=tol),
    num_exits=num_exits,
    granularity=granularity,
    name="mgda",
    # Weights of c·M: see docs/design.md, "Range, rank and derivatives".
    gram_degree=0.0,
  )


_registry.register("mgda", mgda, weighting=mgda_weighting)
