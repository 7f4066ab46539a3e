"""Weighted sums of the exits' gradients: fixed, scheduled, or preset.

The gradient of a weighted loss ``Σ_k w_k ℓ_k`` is ``Σ_k w_k g_k``: the
summed-loss baseline (MSDNet's), ramps towards the later exits, the
Shallow-Deep Networks schedule, and TorchJD's ``Sum``, ``Mean`` and
``Constant``. Each preset is a name of the registry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from osgd_jax.aggregation import _checks, _engine, _linalg, _registry, _stateful
from osgd_jax.aggregation._types import Granularity, Weighting

#: The preset names :func:`weighted_sum` takes (``"uniform"`` is ``"sum"``).
WeightPreset = Literal["sum", "uniform", "mean", "linear", "geometric", "sdn"]


def uniform_weighting(gram: jax.Array) -> jax.Array:
  """All exits weigh 1: the gradient of the summed loss (MSDNet's).

  Args:
    gram: ``(K, K)``; only K is read.

  Returns:
    ``(K,)`` ones.

  Example:
    >>> import jax.numpy as jnp
    >>> uniform_weighting(jnp.eye(3)).tolist()
    [1.0, 1.0, 1.0]

  """
  return jnp.ones(gram.shape[-1:], gram.dtype)


def mean_weighting(gram: jax.Array) -> jax.Array:
  """Mean: every exit weighs ``1/K``, the average of the gradients.

  TorchJD's ``Mean``; :func:`~osgd_jax.weightings.uniform` is its ``Sum``.
  The update is the gradient of the mean loss.

  Args:
    gram: ``(K, K)``; only K is read.

  Returns:
    ``(K,)`` weights ``1/K``.

  Example:
    >>> import jax.numpy as jnp
    >>> mean_weighting(jnp.eye(4)).tolist()
    [0.25, 0.25, 0.25, 0.25]
  """
  return uniform_weighting(gram) / gram.shape[-1]


def linear_weighting(gram: jax.Array) -> jax.Array:
  """``w_k ∝ k``: later exits weigh more; the weights sum to K.

  Normalised to the uniform sum's total K, so that a learning rate tuned for
  the summed loss stays in range.

  Args:
    gram: ``(K, K)``; only K is read.

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> linear_weighting(jnp.eye(3)).tolist()
    [0.5, 1.0, 1.5]
  """
  index = _linalg.exit_index(gram)
  return index * (gram.shape[-1] / index.sum())


def geometric_weighting(
  gram: jax.Array, *, ratio: float | jax.Array = 2.0
) -> jax.Array:
  """``w_k ∝ ratio**(k-1)``: later exits weigh more; the weights sum to K.

  Normalised as :func:`~osgd_jax.weightings.linear` is.

  Args:
    gram: ``(K, K)``; only K is read.
    ratio: the ratio between consecutive exits' weights, > 0.

  Returns:
    ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> w = geometric_weighting(jnp.eye(3), ratio=2.0)
    >>> [round(v, 4) for v in w.tolist()]
    [0.4286, 0.8571, 1.7143]
  """
  ramp = jnp.asarray(ratio, gram.dtype) ** (_linalg.exit_index(gram) - 1)
  return ramp * (gram.shape[-1] / ramp.sum())


def sdn_weighting(
  gram: jax.Array,
  *,
  progress: float | jax.Array,
  cap: float | Sequence[float] = 0.9,
) -> jax.Array:
  """The Shallow-Deep Networks schedule of exit weights.

  The final exit weighs 1. Early exit k of K-1 has a cap ``c_k`` (``cap ·
  k / (K-1)`` for one number: SDN's 0.15, 0.3, ..., 0.9 for six early exits
  with ``cap=0.9``; or ``cap[k-1]`` given K-1 numbers) and the weight
  ``min(c_k, 0.01 + c_k · progress)``, which rises over training.

  Args:
    gram: ``(K, K)``; only K is read.
    progress: the fraction of training done, ``step / total_steps``.
    cap: one number (the last early exit's cap) or K-1 caps.

  Returns:
    ``(K,)`` weights.

  Raises:
    ValueError: K-1 caps were expected.

  Example:
    >>> import jax.numpy as jnp
    >>> w = sdn_weighting(jnp.eye(3), progress=1.0, cap=0.8)
    >>> [round(v, 4) for v in w.tolist()]
    [0.4, 0.8, 1.0]

  """
  k = gram.shape[-1]
  if k == 1:
    return jnp.ones((1,), gram.dtype)
  caps = jnp.asarray(cap, gram.dtype).reshape(-1)
  if caps.shape == (1,):
    caps = caps * _linalg.exit_index(gram)[:-1] / (k - 1)
  elif caps.shape != (k - 1,):
    raise ValueError(
      f"sdn got {caps.shape[0]} caps but the gradients have K={k} exits;"
      " pass K-1 caps (one per early exit) or one number."
    )
  early = jnp.minimum(caps, 0.01 + caps * jnp.asarray(progress, gram.dtype))
  return jnp.concatenate([early, jnp.ones((1,), gram.dtype)])


def constant_weighting(
  gram: jax.Array, *, weights: ArrayLike | Sequence[float]
) -> jax.Array:
  """Constant: fixed, user-given weights (TorchJD's ``Constant``).

  The update is the gradient of the weighted loss ``Σ_k w_k ℓ_k``. As a
  transformation this is :func:`~osgd_jax.aggregation.weighted_sum` with a
  vector.

  Args:
    gram: ``(K, K)``; only K is read.
    weights: ``(K,)`` the weights.

  Returns:
    ``(K,)`` ``weights``, in the Gram matrix's dtype.

  Raises:
    ValueError: ``weights`` is not of shape ``(K,)``.

  Example:
    >>> import jax.numpy as jnp
    >>> constant_weighting(jnp.eye(2), weights=[0.5, 2.0]).tolist()
    [0.5, 2.0]
  """
  k = gram.shape[-1]
  if np.shape(weights) != (k,):
    raise ValueError(
      f"constant got weights of shape {np.shape(weights)}, but the"
      f" gradients have K={k} exits; pass one weight per exit, shape ({k},)."
    )
  return jnp.asarray(weights, gram.dtype)


# The presets that are a fixed function of K.
_FIXED_PRESETS: dict[str, Weighting] = {
  "sum": uniform_weighting,
  "uniform": uniform_weighting,
  "mean": mean_weighting,
  "linear": linear_weighting,
  "geometric": geometric_weighting,
}


def _scheduled(schedule: Callable[[jax.Array], Any]):
  """A user's ``schedule(step) -> (K,)``, checked against K at trace time."""

  def weights(gram, count):
    k = gram.shape[-1]
    w = jnp.asarray(schedule(count))
    if w.shape != (k,):
      raise ValueError(
        f"weighted_sum's schedule returned weights of shape {tuple(w.shape)}"
        f" but the gradients have K={k} exits; return one weight per exit,"
        f" shape ({k},)."
      )
    return w.astype(gram.dtype)

  return weights


def weighted_sum(
  weights: WeightPreset
  | Sequence[float]
  | jax.Array
  | Callable[[jax.Array], Any] = "uniform",
  num_exits: int | None = None,
  *,
  total_steps: int | None = None,
  cap: float | Sequence[float] = 0.9,
  ratio: float = 2.0,
  granularity: Granularity = "global",
) -> optax.GradientTransformationExtraArgs:
  """A fixed or scheduled weighted sum of the per-exit gradients.

  ``u = Σ_k w_k g_k``: the gradient of the weighted loss ``Σ_k w_k ℓ_k``, from
  the stacked per-exit gradients. With ``"uniform"`` weights it is the plain
  summed-loss baseline.

  Presets (by name, each also a name of
  :func:`~osgd_jax.aggregation.create`): ``"sum"``
  (:func:`osgd_jax.weightings.uniform`, MSDNet's summed loss; TorchJD's
  ``Sum``, also named ``"uniform"``), ``"mean"``
  (:func:`osgd_jax.weightings.mean`, TorchJD's ``Mean``), ``"linear"`` and
  ``"geometric"`` (ramps towards the later exits that sum to K;
  :func:`osgd_jax.weightings.linear`, :func:`osgd_jax.weightings.geometric`),
  and ``"sdn"``, the Shallow-Deep Networks schedule
  (:func:`osgd_jax.weightings.sdn`) whose early-exit weights rise over
  ``total_steps`` updates. A fixed vector is TorchJD's ``Constant``
  (:func:`osgd_jax.weightings.constant`).

  Invariances: linear in the gradients; a row scaled by ``c`` scales its
  contribution by ``c``.

  Args:
    weights: a preset name (above), a fixed ``(K,)`` vector, or a schedule:
      a function of the step count (an int32 scalar, 0 at the first update)
      returning a ``(K,)`` vector, traceable under ``jax.jit``.
    num_exits: K. Required unless ``weights`` is a fixed vector.
    total_steps: training steps over which the ``"sdn"`` ramp rises.
    cap: the ``"sdn"`` caps: one number (the last early exit's cap; earlier
      exits' caps are proportional to their index) or K-1 numbers.
    ratio: the ``"geometric"`` ratio between consecutive exits.
    granularity: ``"global"`` or ``"leaf"``; a weighted sum is the same
      either way.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; a schedule's ``weighting_state`` is
    the step count.

  Raises:
    ValueError: an unknown preset, ``"sdn"`` without ``total_steps``, no
      ``num_exits``, or weights whose length is not K.

  Example:
    >>> import jax.numpy as jnp, optax, osgd_jax
    >>> tx = optax.chain(
    ...     osgd_jax.weighted_sum("sdn", num_exits=4, total_steps=1000),
    ...     optax.sgd(0.1, momentum=0.9))
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> updates, state = tx.update({"w": jnp.ones((4, 3))}, state)
    >>> updates["w"].shape
    (3,)

  References:
    Huang et al., *Multi-Scale Dense Networks for Resource Efficient Image
    Classification*, ICLR 2018. https://arxiv.org/abs/1703.09844
    Kaya, Hong & Dumitras, *Shallow-Deep Networks: Understanding and
    Mitigating Network Overthinking*, ICML 2019.
    https://arxiv.org/abs/1810.07052
  """
  name = "weighted_sum"
  _checks.check_not_num_exits(weights, "weights", name, num_exits)
  weighting: Weighting | _engine.StatefulWeighting
  if isinstance(weights, str):
    if weights not in get_args(WeightPreset):
      raise ValueError(
        f"unknown weighted_sum preset {weights!r}; choose one of"
        f" {get_args(WeightPreset)}, or pass a (K,) vector or a schedule."
      )
    if weights == "sdn":
      if total_steps is None:
        raise ValueError(
          "weighted_sum('sdn') needs total_steps, the number of training"
          " steps over which the early exits' weights rise."
        )
      steps = _checks.check_positive_int(total_steps, "total_steps", name)
      if not isinstance(cap, jax.Array):  # an injected cap is not checked
        caps = np.asarray(cap, np.float64)
        if not np.all(np.isfinite(caps)) or not np.all(caps >= 0):
          raise ValueError(
            f"weighted_sum('sdn') needs finite caps >= 0, got {cap!r}."
          )
      weighting = _stateful.counting(
        lambda gram, count: sdn_weighting(gram, progress=count / steps, cap=cap)
      )
    elif weights == "geometric":
      _checks.check_positive(ratio, "ratio", name)
      weighting = functools.partial(geometric_weighting, ratio=ratio)
    else:
      weighting = _FIXED_PRESETS[weights]
  elif callable(weights):
    weighting = _stateful.counting(_scheduled(weights))
  else:
    fixed = np.asarray(weights, np.float32)
    if fixed.ndim != 1 or fixed.size == 0 or not np.all(np.isfinite(fixed)):
      raise ValueError(
        "weighted_sum weights must be a preset name, a schedule, or a"
        f" non-empty 1-D vector of finite numbers; got {weights!r}."
      )
    if num_exits is not None and fixed.shape[0] != num_exits:
      raise ValueError(
        f"weighted_sum got {fixed.shape[0]} weights but"
        f" num_exits={num_exits}; give one weight per exit."
      )
    num_exits = fixed.shape[0]
    weighting = functools.partial(constant_weighting, weights=fixed)
  return _engine.from_weighting(
    weighting,
    num_exits=num_exits,
    granularity=granularity,
    name=name,
    # Weights of c·M: see docs/design.md, "Range, rank and derivatives".
    gram_degree=0.0,
  )


for _preset in ("sum", "mean", "linear", "geometric"):
  _registry.register(
    _preset, weighted_sum, weights=_preset, weighting=_FIXED_PRESETS[_preset]
  )
_registry.register("sdn", weighted_sum, weights="sdn")
