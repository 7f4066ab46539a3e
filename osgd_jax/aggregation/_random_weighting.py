"""Random weighting: softmax of Gaussian weights, fresh at every step."""

from __future__ import annotations

import jax
import optax

from osgd_jax.aggregation import _checks, _engine, _registry, _stateful
from osgd_jax.aggregation._types import Granularity


def random_softmax_weighting(gram: jax.Array, *, key: jax.Array) -> jax.Array:
  """Random weighting: ``w = softmax(z)``, ``z ~ N(0, I_K)``, fresh every step.

  Lin et al.'s random weighting of the gradients (their Algorithm 2; TorchJD's
  ``Random``): positive weights summing to 1, drawn at every step without
  looking at the gradients. A litmus test for multi-task methods: a method
  that does not beat it has not shown what its weighting adds.

  Args:
    gram: ``(K, K)``; only K is read.
    key: a PRNG key.

  Returns:
    ``(K,)`` positive weights on the simplex.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> w = random_softmax_weighting(jnp.eye(3), key=jax.random.key(0))
    >>> bool(jnp.all(w > 0)), round(float(w.sum()), 6)
    (True, 1.0)

  """
  z = jax.random.normal(key, gram.shape[-1:], gram.dtype)
  return jax.nn.softmax(z)


def random_weighting(
  num_exits: int | None = None,
  *,
  seed: int = 0,
  granularity: Granularity = "global",
) -> optax.GradientTransformationExtraArgs:
  """Random weighting: ``u = Σ_k w_k g_k``, ``w = softmax(z)``, ``z ~ N(0, I)``.

  Fresh weights at every step (:func:`osgd_jax.weightings.random_weighting`,
  TorchJD's ``Random``), from a PRNG key that the state carries, split at
  every update, so a run is reproducible from ``seed``. Under
  ``granularity="leaf"`` every leaf starts from the same key, hence draws
  the same weights. The weights sum to 1: the update is about the size of
  one gradient.

  Args:
    seed: seeds the weights.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`~osgd_jax.aggregation.KeyState` per group.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.random_weighting(seed=0, num_exits=3)
    >>> _, state = tx.update({"w": jnp.ones((3, 2))},
    ...                      tx.init({"w": jnp.zeros(2)}))
    >>> round(float(state.weights.sum()), 5)
    1.0

  References:
    Lin, Ye, Xu, Shi & Zhang, *Reasonable Effectiveness of Random Weighting:
    A Litmus Test for Multi-Task Learning*, TMLR 2022.
    https://arxiv.org/abs/2111.10603
  """
  _checks.check_seed(seed, "random_weighting")
  return _engine.from_weighting(
    _stateful.keyed(random_softmax_weighting, seed),
    num_exits=num_exits,
    granularity=granularity,
    name="random_weighting",
    # Weights of c·M: see docs/design.md, "Range, rank and derivatives".
    gram_degree=0.0,
  )


_registry.register("random", random_weighting)
