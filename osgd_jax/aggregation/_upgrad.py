"""UPGrad: the mean of the gradients' projections onto their dual cone."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from osgd_jax import gram as gram_lib
from osgd_jax.aggregation import _checks, _engine, _qp, _registry
from osgd_jax.aggregation._types import Granularity


def upgrad_weighting(
  gram: jax.Array,
  *,
  max_iter: int = 100,
  tol: float | jax.Array = _qp.DEFAULT_TOL,
) -> jax.Array:
  """UPGrad: the mean of the gradients' projections onto their dual cone.

  Every gradient g_i is projected onto the dual cone of all of them,
  ``{v : ⟨v, g_j⟩ ≥ 0 for all j}`` (the directions that conflict with no
  exit), and the projections are averaged. The projection of g_i is
  ``g_i + Σ_j λ_ij g_j`` with ``λ_i ≥ 0`` solving the dual
  ``min_{λ ≥ 0} ½ λᵀMλ + λᵀ M e_i``, a K-variable QP solved exactly by an
  active-set method, in the basis ``g_k / ‖g_k‖`` so that it does not depend
  on the rows' scales; zero rows constrain nothing. This is TorchJD's
  recommended aggregator with uniform preference, without its
  regularisation of M. The update is a mean: about the size of one
  gradient, not of their sum.

  Args:
    gram: ``(K, K)``.
    max_iter: cap on the active-set iterations per projection.
    tol: relative tolerance of the optimality test.

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [-1.0, 1.0]])
    >>> [round(v, 4) for v in (upgrad_weighting(g @ g.T) @ g).tolist()]
    [0.25, 0.75]

  """
  k = gram.shape[-1]
  if k == 1:  # a row lies in its own dual cone
    return jnp.ones((1,), gram.dtype)
  norms, corr = gram_lib.gram_statistics(gram)
  # Row i's projection has weights e_i + λ_i; the update is their mean.
  projected = jax.vmap(
    lambda p: _qp.project_onto_dual_cone(
      norms, corr, p, max_iter=max_iter, tol=tol
    )
  )(jnp.eye(k, dtype=gram.dtype))
  return projected.mean(axis=0)


def upgrad(
  num_exits: int | None = None,
  *,
  granularity: Granularity = "global",
  max_iter: int = 100,
  tol: float = _qp.DEFAULT_TOL,
) -> optax.GradientTransformationExtraArgs:
  """UPGrad: the mean of the gradients' projections onto their dual cone.

  Every gradient g_i is projected onto the dual cone of all of them,
  ``{v : ⟨v, g_j⟩ ≥ 0 for all j}`` (the directions that conflict with no
  exit), and the projections are averaged
  (:func:`osgd_jax.weightings.upgrad`), solved exactly under ``jax.jit``.

  Properties (TorchJD's): non-conflicting (``⟨g_j, u⟩ ≥ 0`` for every j);
  linear under scaling (for ``c > 0``, ``u(diag(c) G) = (1/K) Σ_i c_i v_i``);
  invariant to the exits' order; non-conflicting gradients are averaged
  unchanged; K=1 is the identity. The update is a mean: its size is that of
  one gradient, not of their sum.

  Args:
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (TorchJD's) or ``"leaf"``.
    max_iter: cap on active-set iterations per projection.
    tol: relative tolerance of the optimality test.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.upgrad(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]   # mean of (½, ½), (0, 1)
    [0.25, 0.75]

  References:
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024.
    https://arxiv.org/abs/2406.16232 (TorchJD: https://github.com/TorchJD/torchjd)
  """
  _checks.check_qp_options(max_iter, tol, "upgrad")
  return _engine.from_weighting(
    functools.partial(upgrad_weighting, max_iter=max_iter, tol=tol),
    num_exits=num_exits,
    granularity=granularity,
    name="upgrad",
    # Weights of c·M: see docs/design.md, "Range, rank and derivatives".
    gram_degree=0.0,
  )


_registry.register("upgrad", upgrad, weighting=upgrad_weighting)
