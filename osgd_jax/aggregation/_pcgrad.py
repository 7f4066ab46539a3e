"""PCGrad: "gradient surgery" that projects away conflicting components."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from osgd_jax import gram as gram_lib
from osgd_jax.aggregation import _checks, _engine, _registry, _stateful
from osgd_jax.aggregation._types import Granularity

# PCGrad's weighting state (its key draws the visiting orders).
PCGradState = _stateful.KeyState


def pcgrad_weighting(gram: jax.Array, *, key: jax.Array) -> jax.Array:
  """PCGrad, "gradient surgery": projects away conflicting components.

  For every task (exit) i, starting from ``g_i^PC = g_i``, the other tasks j
  are visited in a random order; whenever ``⟨g_i^PC, g_j⟩ < 0``,
  ``g_i^PC ← g_i^PC − ⟨g_i^PC, g_j⟩ / ‖g_j‖² · g_j`` (the projection onto the
  normal plane of the *original* g_j). The update is ``Σ_i g_i^PC``
  (Algorithm 1 of the paper). Every inner product it needs is
  ``⟨g_i^PC, g_j⟩ = Σ_m c_im M_mj`` for ``g_i^PC = Σ_m c_im g_m``, so it is
  exact from the Gram matrix.

  Args:
    gram: ``(K, K)``.
    key: a PRNG key that draws the visiting orders.

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [-1.0, 1.0]])
    >>> w = pcgrad_weighting(g @ g.T, key=jax.random.key(0))
    >>> (w @ g).tolist()   # g1^PC = (½, ½), g2^PC = (0, 1)
    [0.5, 1.5]

  """
  k = gram.shape[-1]
  orders = _stateful.visiting_orders(key, k)
  inv_sq = gram_lib.safe_inverse(jnp.diagonal(gram))
  tasks = jnp.arange(k)

  def visit(position, coeff):
    j = orders[:, position]  # task i's next other task
    dots = jnp.sum(coeff * gram[:, j].T, axis=-1)  # ⟨g_i^PC, g_j⟩, original g_j
    # The conflict test uses the current g_i^PC; a zero g_j never conflicts.
    conflict = (dots < 0) & (j != tasks)
    step = jnp.where(conflict, dots * inv_sq[j], 0.0)
    return coeff - step[:, None] * jax.nn.one_hot(j, k, dtype=gram.dtype)

  coeff = jax.lax.fori_loop(0, k, visit, jnp.eye(k, dtype=gram.dtype))
  return coeff.sum(axis=0)


def pcgrad(
  num_exits: int | None = None,
  *,
  seed: int = 0,
  granularity: Granularity = "global",
) -> optax.GradientTransformationExtraArgs:
  """PCGrad: "gradient surgery" that removes conflicting components.

  For every task (exit) i, starting from ``g_i^PC = g_i``, the other tasks j
  are visited in a random order; whenever ``⟨g_i^PC, g_j⟩ < 0`` the
  projection onto the normal plane of the *original* ``g_j`` is applied. The
  update is ``Σ_i g_i^PC`` (Algorithm 1 of the paper;
  :func:`osgd_jax.weightings.pcgrad`), computed exactly from the Gram matrix.

  The orders are drawn from a PRNG key that the state carries, split at every
  update, so a run is reproducible from ``seed``. Under
  ``granularity="leaf"`` every leaf starts from the same key.

  Invariances: with K=2 and non-conflicting gradients the update is their
  sum; for given orders, scaling all gradients by ``c > 0`` scales the
  update by ``c``.

  Args:
    seed: seeds the orders.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`~osgd_jax.aggregation.KeyState` (``PCGradState``) per group.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.pcgrad(seed=0, num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"].tolist()   # g1^PC = (½, ½), g2^PC = (0, 1)
    [0.5, 1.5]

  References:
    Yu, Kumar, Gupta, Levine, Hausman & Finn, *Gradient Surgery for
    Multi-Task Learning*, NeurIPS 2020. https://arxiv.org/abs/2001.06782
  """
  _checks.check_seed(seed, "pcgrad")
  return _engine.from_weighting(
    _stateful.keyed(pcgrad_weighting, seed),
    num_exits=num_exits,
    granularity=granularity,
    name="pcgrad",
    # Weights of c·M: see docs/design.md, "Range, rank and derivatives".
    gram_degree=0.0,
  )


_registry.register("pcgrad", pcgrad)
