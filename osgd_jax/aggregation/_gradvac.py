"""Gradient Vaccine: every pair's cosine raised to a running target."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from osgd_jax import gram as gram_lib
from osgd_jax.aggregation import _checks, _engine, _registry, _stateful
from osgd_jax.aggregation._types import Granularity


def gradvac_weighting(
  gram: jax.Array,
  *,
  target: jax.Array,
  key: jax.Array,
  beta: float | jax.Array = 0.5,
  eps: float | jax.Array = 1e-8,
) -> tuple[jax.Array, jax.Array]:
  """Gradient Vaccine: raises every pair's cosine to its running target.

  As :func:`pcgrad`, every task (exit) i visits the others j in a random
  order, starting from ``g_i^GV = g_i``. With ``φ_ij`` the cosine of
  ``g_i^GV`` and the original ``g_j``, and ``φ̂_ij`` its target, when
  ``φ_ij < φ̂_ij`` a multiple of ``g_j`` is added that brings the cosine up
  to ``φ̂_ij``:

  ``g_i^GV += ‖g_i^GV‖ (φ̂_ij √(1−φ_ij²) − φ_ij √(1−φ̂_ij²))
  / (‖g_j‖ √(1−φ̂_ij²)) · g_j``

  (the paper's Equation 3, with ``eps`` added to this denominator and to the
  cosine's, as TorchJD's ``GradVac`` does); then the target follows the
  cosine, ``φ̂_ij ← (1−β) φ̂_ij + β φ_ij``. The update is ``Σ_i g_i^GV``.
  Targets start at 0, where the first step is PCGrad-like. Unlike the other
  weightings this one returns its new state too.

  Args:
    gram: ``(K, K)``.
    target: ``(K, K)`` the targets ``φ̂`` (row i: task i's targets).
    key: a PRNG key that draws the visiting orders.
    beta: the EMA rate of the targets, in [0, 1].
    eps: added to the denominators.

  Returns:
    ``(weights, new_target)``: ``(K,)`` and ``(K, K)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> g = jnp.asarray([[1.0, 0.0], [-1.0, 1.0]])
    >>> w, target = gradvac_weighting(g @ g.T, target=jnp.zeros((2, 2)),
    ...                     key=jax.random.key(0))
    >>> [round(v, 4) for v in (w @ g).tolist()]   # as PCGrad at target 0
    [0.5, 1.5]
    >>> round(float(target[0, 1]), 4)   # ½ · cos(g_1, g_2)
    -0.3536

  """
  k = gram.shape[-1]
  orders = _stateful.visiting_orders(key, k)
  target = jnp.asarray(target, gram.dtype)
  norms = gram_lib.safe_sqrt(jnp.diagonal(gram))
  tasks = jnp.arange(k)

  def visit(position, carry):
    coeff, target = carry
    j = orders[:, position]  # task i's next other task
    cg = coeff @ gram  # row i: ⟨g_i^GV, g_m⟩
    dots = jnp.take_along_axis(cg, j[:, None], axis=1)[:, 0]
    norm_i = gram_lib.safe_sqrt(jnp.sum(cg * coeff, axis=-1))
    norm_j = norms[j]
    phi = dots / (norm_i * norm_j + eps)
    phi_hat = target[tasks, j]
    other = j != tasks
    sin_phi = gram_lib.safe_sqrt(1.0 - phi * phi)
    sin_hat = gram_lib.safe_sqrt(1.0 - phi_hat * phi_hat)
    step = (
      norm_i * (phi_hat * sin_phi - phi * sin_hat) / (norm_j * sin_hat + eps)
    )
    step = jnp.where(other & (phi < phi_hat), step, 0.0)
    coeff = coeff + step[:, None] * jax.nn.one_hot(j, k, dtype=gram.dtype)
    new_hat = jnp.where(other, (1.0 - beta) * phi_hat + beta * phi, phi_hat)
    return coeff, target.at[tasks, j].set(new_hat)

  coeff, target = jax.lax.fori_loop(
    0, k, visit, (jnp.eye(k, dtype=gram.dtype), target)
  )
  return coeff.sum(axis=0), target


class GradVacState(NamedTuple):
  """GradVac's weighting state.

  Attributes:
    target: ``(K, K)`` the cosine targets ``φ̂`` (row i: task i's), an EMA
      of the cosines seen; 0 at ``init``.
    key_data: the raw data of the PRNG key that draws the visiting orders
      (as :class:`~osgd_jax.aggregation.KeyState`'s).
  """

  target: jax.Array
  key_data: jax.Array


def gradvac(
  num_exits: int | None = None,
  *,
  beta: float = 0.5,
  eps: float = 1e-8,
  seed: int = 0,
  granularity: Granularity = "global",
) -> optax.GradientTransformationExtraArgs:
  """Gradient Vaccine: every pair's cosine raised to a running target.

  As PCGrad, but instead of projecting a conflict away, task i's gradient
  gets the multiple of ``g_j`` that brings their cosine up to the target
  ``φ̂_ij``, an EMA (rate ``beta``) of the cosines seen at earlier steps
  (:func:`osgd_jax.weightings.gradvac`, TorchJD's ``GradVac``). The
  update is the sum of the modified gradients. The targets and the PRNG key
  of the visiting orders live in the state; under ``granularity="leaf"``
  every leaf has its own targets (the paper's per-parameter-group variant)
  and the same key.

  Args:
    beta: the targets' EMA rate, in [0, 1].
    eps: added to the denominators, ``≥ 0``.
    seed: seeds the visiting orders.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the whole model) or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`GradVacState` per group.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.gradvac(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> updates, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]   # PCGrad at target 0
    [0.5, 1.5]
    >>> state.weighting_state.target.shape   # one group
    (1, 2, 2)

  References:
    Wang, Tsvetkov, Firat & Cao, *Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models*,
    ICLR 2021. https://arxiv.org/abs/2010.05874
  """
  name = "gradvac"
  _checks.check_unit_interval(beta, "beta", name)
  _checks.check_nonnegative(eps, "eps", name)
  _checks.check_seed(seed, name)

  def init(k):
    return GradVacState(
      jnp.zeros((k, k), jnp.float32), _stateful.seed_key_data(seed)
    )

  def apply(gram, state: GradVacState, **extra_args):
    del extra_args
    key_data, subkey = _stateful.split_key_data(state.key_data)
    weights, target = gradvac_weighting(
      gram,
      target=state.target.astype(gram.dtype),
      key=subkey,
      beta=beta,
      eps=eps,
    )
    return weights, GradVacState(target, key_data)

  return _engine.from_weighting(
    _engine.StatefulWeighting(init, apply),
    num_exits=num_exits,
    granularity=granularity,
    name=name,
  )


_registry.register("gradvac", gradvac)
