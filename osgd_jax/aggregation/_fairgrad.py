"""FairGrad: α-fair weights, the solution of ``M w = w^{-1/α}``."""

from __future__ import annotations

import functools

import jax
import optax

from osgd_jax.aggregation import _checks, _engine, _linalg, _registry
from osgd_jax.aggregation._types import Granularity


def fairgrad_weighting(
  gram: jax.Array, *, alpha: float | jax.Array = 1.0, max_iter: int = 50
) -> jax.Array:
  """FairGrad: α-fair weights, the solution of ``M w = w^{-1/α}``, ``w > 0``.

  Fair resource allocation in multi-task learning: the update ``d = wᵀ G``
  maximises the α-fair utility of the tasks' improvements ``⟨g_k, d⟩``,
  whose optimality condition is ``⟨g_k, d⟩ = w_k^{-1/α}`` for every k (the
  paper's Equation 4). α = 1 is proportional fairness (Nash-MTL's
  bargaining solution); α → ∞ approaches max-min fairness (MGDA-like);
  α = 0 gives the mean. Solved by Newton's method on ``log w``, with steps
  at most 1 in ``log w`` (TorchJD uses SciPy's bounded least squares). The
  equation has no positive solution when the gradients can be combined
  positively into 0, e.g. with a zero gradient: its weight then grows at
  every Newton step (finite, and it multiplies a zero gradient).

  Args:
    gram: ``(K, K)``.
    alpha: the fairness parameter, ≥ 0.
    max_iter: the Newton steps.

  Returns:
    ``(K,)`` positive weights.

  Example:
    >>> import jax.numpy as jnp
    >>> w = fairgrad_weighting(jnp.diag(jnp.asarray([1.0, 4.0])), alpha=1.0)
    >>> [round(v, 4) for v in w.tolist()]   # w_k² M_kk = 1
    [1.0, 0.5]

  """
  return _linalg.solve_fair_equation(gram, alpha=alpha, max_iter=max_iter)


def _fair_degree(alpha: float | jax.Array) -> float | None:
  """How the weights scale with M: ``w(c·M) = c^(-α/(1+α)) w(M)``.

  ``M w = w^(-1/α)`` at ``c·M`` is solved by ``c^p w`` with ``1 + p =
  −p/α``. ``None`` (the true Gram matrix) for an injected α.
  """
  if isinstance(alpha, jax.Array):
    return None
  return -float(alpha) / (1.0 + float(alpha))


def fairgrad(
  num_exits: int | None = None,
  *,
  alpha: float = 1.0,
  granularity: Granularity = "global",
  max_iter: int = 50,
) -> optax.GradientTransformationExtraArgs:
  """FairGrad: α-fair weights, ``M w = w^{-1/α}``, solved by Newton under jit.

  The update ``u = wᵀ G`` maximises the α-fair utility of the exits'
  improvements ``⟨g_k, u⟩`` (:func:`osgd_jax.weightings.fairgrad`, TorchJD's
  ``FairGrad``): α = 1 is proportional fairness (Nash-MTL's solution), large
  α approaches max-min fairness, α = 0 the mean.

  Args:
    alpha: the fairness parameter, ``≥ 0`` (TorchJD has no default; the
      paper tunes it in {0.5, 1, 2, 5, ...}).
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.
    max_iter: the Newton steps.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.fairgrad(2, alpha=1.0)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]   # ⟨g_k, u⟩ = 1/w_k
    [1.0, 1.0]

  References:
    Ban & Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024.
    https://arxiv.org/abs/2402.15638
  """
  name = "fairgrad"
  _checks.check_nonnegative(alpha, "alpha", name)
  _checks.check_positive_int(max_iter, "max_iter", name)
  return _engine.from_weighting(
    functools.partial(fairgrad_weighting, alpha=alpha, max_iter=max_iter),
    num_exits=num_exits,
    granularity=granularity,
    name=name,
    # Weights of c·M: see docs/design.md, "Range, rank and derivatives".
    gram_degree=_fair_degree(alpha),
  )


_registry.register("fairgrad", fairgrad, weighting=fairgrad_weighting)
