"""DualProj: the mean gradient projected onto the dual cone of all of them."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import optax

from osgd_jax import gram as gram_lib
from osgd_jax.aggregation import _checks, _engine, _qp, _registry
from osgd_jax.aggregation._types import Granularity


def dualproj_weighting(
  gram: jax.Array,
  *,
  pref_vector: jax.Array | Sequence[float] | None = None,
  max_iter: int = 100,
  tol: float | jax.Array = _qp.DEFAULT_TOL,
) -> jax.Array:
  """DualProj: the mean gradient, projected onto the dual cone of all of them.

  The preference-weighted sum ``pᵀ G`` (the mean by default) is projected
  onto ``{v : ⟨v, g_j⟩ ≥ 0 for all j}``, the directions that conflict with
  no exit, as GEM projects a gradient against its episodic memory (its
  Equation 11). The projection is ``(p + λ)ᵀ G`` with ``λ ≥ 0`` solving
  ``min_{λ ≥ 0} ½ λᵀMλ + λᵀ M p``, solved exactly by an active-set method in
  the basis ``g_k / ‖g_k‖`` (as :func:`upgrad`'s projections; TorchJD adds
  ``1e-4 · I`` to the trace-normalised M instead). Zero rows constrain
  nothing.

  Properties: non-conflicting; non-conflicting gradients give ``pᵀ G``
  unchanged; invariant to the exits' order (with uniform p).

  Args:
    gram: ``(K, K)``.
    pref_vector: ``(K,)`` preferences p; ``None``: ``1/K`` each.
    max_iter: cap on the active-set iterations.
    tol: relative tolerance of the optimality test.

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [-1.0, 1.0]])
    >>> [round(v, 4) for v in (dualproj_weighting(g @ g.T) @ g).tolist()]
    [0.0, 0.5]

  """
  norms, corr = gram_lib.gram_statistics(gram)
  return _qp.project_onto_dual_cone(
    norms,
    corr,
    _checks.preference(gram, pref_vector, "dualproj"),
    max_iter=max_iter,
    tol=tol,
  )


def dualproj(
  num_exits: int | None = None,
  *,
  pref_vector: Sequence[float] | jax.Array | None = None,
  granularity: Granularity = "global",
  max_iter: int = 100,
  tol: float = _qp.DEFAULT_TOL,
) -> optax.GradientTransformationExtraArgs:
  """DualProj: the mean gradient projected onto the dual cone of all of them.

  ``u`` is the projection of ``Σ_k p_k g_k`` (the mean by default) onto
  ``{v : ⟨v, g_j⟩ ≥ 0 for all j}`` (:func:`osgd_jax.weightings.dualproj`,
  TorchJD's ``DualProj``; GEM's projection), solved exactly under
  ``jax.jit``.

  Properties: non-conflicting (``⟨g_j, u⟩ ≥ 0`` for every j); a mean of
  non-conflicting gradients passes unchanged; invariant to the exits' order
  (uniform preferences); positively homogeneous. The update is a mean: its
  size is that of one gradient.

  Args:
    pref_vector: ``(K,)`` preferences; ``None``: ``1/K`` each.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``.
    max_iter: cap on active-set iterations.
    tol: relative tolerance of the optimality test.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.dualproj(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]   # (0, ½) ⟂ g_1
    [0.0, 0.5]

  References:
    Lopez-Paz & Ranzato, *Gradient Episodic Memory for Continual Learning*,
    NeurIPS 2017. https://arxiv.org/abs/1706.08840
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024.
    https://arxiv.org/abs/2406.16232
  """
  name = "dualproj"
  num_exits = _checks.check_num_exits(num_exits, name)
  _checks.check_pref_vector(pref_vector, num_exits, name)
  _checks.check_qp_options(max_iter, tol, name)
  return _engine.from_weighting(
    functools.partial(
      dualproj_weighting, pref_vector=pref_vector, max_iter=max_iter, tol=tol
    ),
    num_exits=num_exits,
    granularity=granularity,
    name=name,
    # Weights of c·M: see docs/design.md, "Range, rank and derivatives".
    gram_degree=0.0,
  )


_registry.register("dualproj", dualproj, weighting=dualproj_weighting)
