"""SDMGrad: MGDA's weights pulled towards a preferred direction (the mean)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from osgd_jax import gram as gram_lib
from osgd_jax.aggregation import _checks, _engine, _linalg, _registry, _stateful
from osgd_jax.aggregation._types import Granularity


def sdmgrad_weighting(
  gram: jax.Array,
  *,
  previous: jax.Array,
  pref_vector: jax.Array | Sequence[float] | None = None,
  lr: float | jax.Array = 10.0,
  momentum: float | jax.Array = 0.5,
  n_iter: int = 20,
  lambda_: float | jax.Array = 0.3,
) -> tuple[jax.Array, jax.Array]:
  """SDMGrad: MGDA's weights pulled towards a preferred direction.

  Stochastic direction-oriented multi-objective gradient descent minimises
  ``½‖(w + λ w̃)ᵀ G‖²`` over w on the simplex, w̃ the preferences (``1/K``,
  the mean), by ``n_iter`` steps of projected gradient descent with
  momentum from the previous step's w, on M scaled by the squared mean
  gradient norm; the update is ``(w + λ w̃)ᵀ G / (1 + λ)``. As for
  :func:`~osgd_jax.aggregation.modo`, the paper's M comes from two
  mini-batches; here it is ``G Gᵀ``. TorchJD's ``SDMGradWeighting``, with
  its defaults (LibMTL's).

  Args:
    gram: ``(K, K)``.
    previous: ``(K,)`` the previous step's w (``1/K`` at first).
    pref_vector: ``(K,)`` the preferences w̃; ``None``: ``1/K`` each.
    lr: the inner step size, > 0.
    momentum: the inner momentum, in [0, 1).
    n_iter: the inner steps.
    lambda_: the pull towards w̃, ≥ 0.

  Returns:
    ``(weights, w)``: the ``(K,)`` weights of the update and the new w.

  Example:
    >>> import jax.numpy as jnp
    >>> w, _ = sdmgrad_weighting(jnp.eye(2), previous=jnp.full(2, 0.5))
    >>> [round(v, 4) for v in w.tolist()]
    [0.5, 0.5]

  """
  target = _checks.preference(gram, pref_vector, "sdmgrad")
  scale = jnp.mean(gram_lib.safe_sqrt(jnp.diagonal(gram)))
  a = gram / (scale * scale + 1e-8)

  def step(_, carry):
    w, velocity = carry
    velocity = momentum * velocity + a @ (w + lambda_ * target)
    return _linalg.project_onto_simplex(w - lr * velocity), velocity

  w, _ = jax.lax.fori_loop(
    0, n_iter, step, (jnp.asarray(previous, gram.dtype), jnp.zeros_like(target))
  )
  return (w + lambda_ * target) / (1.0 + lambda_), w


def sdmgrad(
  num_exits: int | None = None,
  *,
  lr: float = 10.0,
  momentum: float = 0.5,
  n_iter: int = 20,
  lambda_: float = 0.3,
  pref_vector: Sequence[float] | jax.Array | None = None,
  granularity: Granularity = "global",
) -> optax.GradientTransformationExtraArgs:
  """SDMGrad: MGDA's weights pulled towards a preferred direction (the mean).

  ``n_iter`` projected momentum steps on ``½‖(w + λ w̃)ᵀ G‖²`` from the
  previous w, then ``u = (w + λ w̃)ᵀ G / (1 + λ)``
  (:func:`osgd_jax.weightings.sdmgrad`, TorchJD's ``SDMGradWeighting``), w
  kept in the state. As for :func:`~osgd_jax.aggregation.modo`, M is the
  step's ``G Gᵀ``.

  Args:
    lr: the inner step size, ``> 0``.
    momentum: the inner momentum, in [0, 1).
    n_iter: the inner steps.
    lambda_: the pull towards the preferences, ``≥ 0``.
    pref_vector: ``(K,)`` the preferences; ``None``: ``1/K`` each.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`~osgd_jax.aggregation.SimplexState` per group.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.sdmgrad(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [0.5, 0.5]

  References:
    Xiao, Ban & Ji, *Direction-oriented Multi-objective Learning: Simple and
    Provable Stochastic Algorithms*, NeurIPS 2023.
    https://arxiv.org/abs/2305.18409
  """
  name = "sdmgrad"
  num_exits = _checks.check_num_exits(num_exits, name)
  _checks.check_positive(lr, "lr", name)
  _checks.check_fraction(momentum, "momentum", name)
  _checks.check_positive_int(n_iter, "n_iter", name)
  _checks.check_nonnegative(lambda_, "lambda_", name)
  _checks.check_pref_vector(pref_vector, num_exits, name)

  def step(gram, previous):
    return sdmgrad_weighting(
      gram,
      previous=previous,
      pref_vector=pref_vector,
      lr=lr,
      momentum=momentum,
      n_iter=n_iter,
      lambda_=lambda_,
    )

  return _engine.from_weighting(
    _stateful.simplex_iteration(step),
    num_exits=num_exits,
    granularity=granularity,
    name=name,
  )


_registry.register("sdmgrad", sdmgrad)
