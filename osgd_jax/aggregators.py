"""Baseline aggregators of per-exit gradients, with the same contract as ``osgd``.

Every transformation of the library takes the per-exit gradients stacked on
a leading axis (leaves ``(K, *param.shape)``, as
:func:`osgd_jax.value_and_per_exit_grads` returns them) and emits one
parameter-shaped update, so each must come first in an Optax chain, like
:func:`osgd_jax.osgd`. Each here is :func:`osgd_jax.from_weighting` of a
weighting of :mod:`osgd_jax.weightings`; the ones whose weighting needs a step
count, a running average or a PRNG key keep it in their state, whose shapes
are fixed at ``init``.

================================  ===============================================
:func:`weighted_sum`              fixed or scheduled loss weights (MSDNet's
                                  uniform sum, linear and geometric ramps, the
                                  SDN ramp; TorchJD's ``Mean``, ``Sum`` and
                                  ``Constant``)
:func:`adaptive_loss_balancing`   AdaLoss: ``w_k ∝ 1 / EMA(loss_k)``
:func:`pcgrad`                    PCGrad: project away conflicting gradients
:func:`mgda`                      MGDA: the min-norm point of the convex hull
:func:`upgrad`                    UPGrad: mean of the projections onto the dual
                                  cone
================================  ===============================================

The rest of TorchJD 0.18's aggregators are in
:mod:`osgd_jax.gramian_aggregators` (weightings of the Gram matrix) and
:mod:`osgd_jax.coordinatewise` (TrimmedMean, GradDrop, ExcessMTL, which read
every coordinate).

``granularity="global"`` (the default here) computes one weight vector from
the Gram matrix of the whole flattened parameter vector, as the papers do;
``"leaf"`` computes weights per parameter tensor. Per leaf, an exit that does
not reach a tensor (its row is zero there) changes what MGDA and UPGrad do on
it: MGDA's hull then contains 0, so that tensor gets no update.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from osgd_jax import aggregation
from osgd_jax import weightings

__all__ = [
    "AdaLossState",
    "KeyState",
    "PCGradState",
    "WEIGHT_PRESETS",
    "adaptive_loss_balancing",
    "check_qp_options",
    "keyed",
    "mgda",
    "pcgrad",
    "upgrad",
    "weighted_sum",
]

#: The named loss weightings :func:`weighted_sum` takes.
WEIGHT_PRESETS = ("uniform", "linear", "geometric", "sdn", "mean", "sum")


def _counting(schedule: Callable[[jax.Array, jax.Array], jax.Array]
              ) -> aggregation.StatefulWeighting:
  """A weighting ``schedule(gram, step)`` whose state counts the updates."""

  def apply(gram, count, **extra_args):
    del extra_args
    return schedule(gram, count), optax.safe_increment(count)

  return aggregation.StatefulWeighting(
      init=lambda num_exits: jnp.zeros((), jnp.int32), apply=apply)


def _scheduled(schedule: Callable[[jax.Array], Any]):
  """A user's ``schedule(step) -> (K,)``, checked against K at trace time."""

  def weights(gram, count):
    k = gram.shape[-1]
    w = jnp.asarray(schedule(count))
    if w.shape != (k,):
      raise ValueError(
          f"weighted_sum's schedule returned weights of shape {tuple(w.shape)}"
          f" but the gradients have K={k} exits; return one weight per exit,"
          f" shape ({k},).")
    return w.astype(gram.dtype)

  return weights


def weighted_sum(
    weights: str | Sequence[float] | jax.Array | Callable[[jax.Array], Any]
    = "uniform",
    *,
    num_exits: int | None = None,
    total_steps: int | None = None,
    cap: float | Sequence[float] = 0.9,
    ratio: float = 2.0,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """A fixed or scheduled weighted sum of the per-exit gradients.

  ``u = Σ_k w_k g_k``: the gradient of the weighted loss ``Σ_k w_k ℓ_k``, from
  the stacked per-exit gradients. With ``"uniform"`` weights it is the plain
  summed-loss baseline.

  Presets (by name): ``"uniform"`` (:func:`osgd_jax.weightings.uniform`,
  MSDNet's summed loss; TorchJD's ``Sum``, also named ``"sum"``), ``"mean"``
  (:func:`~osgd_jax.weightings.mean`, TorchJD's ``Mean``), ``"linear"`` and
  ``"geometric"`` (ramps towards the later exits that sum to K;
  :func:`~osgd_jax.weightings.linear`,
  :func:`~osgd_jax.weightings.geometric`), and ``"sdn"``, the Shallow-Deep
  Networks schedule (:func:`~osgd_jax.weightings.sdn`) whose early-exit
  weights rise over ``total_steps`` updates. A fixed vector is TorchJD's
  ``Constant`` (:func:`~osgd_jax.weightings.constant`).

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
  weighting: weightings.Weighting | aggregation.StatefulWeighting
  if isinstance(weights, str):
    if weights not in WEIGHT_PRESETS:
      raise ValueError(
          f"unknown weighted_sum preset {weights!r}; choose one of"
          f" {WEIGHT_PRESETS}, or pass a (K,) vector or a schedule.")
    if weights == "sdn":
      if total_steps is None:
        raise ValueError(
            "weighted_sum('sdn') needs total_steps, the number of training"
            " steps over which the early exits' weights rise.")
      aggregation.check_positive_int(total_steps, "total_steps", name)
      if not isinstance(cap, jax.Array):  # an injected cap is not checked
        caps = np.asarray(cap, np.float64)
        if not np.all(np.isfinite(caps)) or not np.all(caps >= 0):
          raise ValueError(
              f"weighted_sum('sdn') needs finite caps >= 0, got {cap!r}.")
      weighting = _counting(lambda gram, count: weightings.sdn(
          gram, progress=count / total_steps, cap=cap))
    elif weights == "geometric":
      if (aggregation.is_checkable_number(ratio)
          and not (np.isfinite(ratio) and ratio > 0)):
        raise ValueError(
            f"the geometric ratio must be a finite number > 0, got {ratio!r}.")
      weighting = functools.partial(weightings.geometric, ratio=ratio)
    else:
      weighting = getattr(weightings, "uniform" if weights == "sum" else weights)
  elif callable(weights):
    weighting = _counting(_scheduled(weights))
  else:
    fixed = np.asarray(weights, np.float32)
    if fixed.ndim != 1 or fixed.size == 0 or not np.all(np.isfinite(fixed)):
      raise ValueError(
          "weighted_sum weights must be a preset name, a schedule, or a"
          f" non-empty 1-D vector of finite numbers; got {weights!r}.")
    if num_exits is not None and fixed.shape[0] != num_exits:
      raise ValueError(
          f"weighted_sum got {fixed.shape[0]} weights but"
          f" num_exits={num_exits}; give one weight per exit.")
    num_exits = fixed.shape[0]
    weighting = functools.partial(weightings.constant, weights=fixed)
  return aggregation.from_weighting(
      weighting, num_exits=num_exits, granularity=granularity, name=name)


class AdaLossState(NamedTuple):
  """AdaLoss's weighting state: the loss EMA and the number of updates so far.

  Attributes:
    ema: ``(K,)`` the exponential moving average of the exits' losses.
    count: the number of updates so far (the first sets ``ema`` to the
      losses).
  """

  ema: jax.Array
  count: jax.Array


def adaptive_loss_balancing(
    decay: float = 0.9,
    eps: float = 1e-8,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """AdaLoss: weights inversely proportional to a running average of the losses.

  ``w_k = K · (1/ℓ̄_k) / Σ_j (1/ℓ̄_j)`` (:func:`osgd_jax.weightings.adaloss`),
  ``u = Σ_k w_k g_k``, where ``ℓ̄_k`` is an exponential moving average of exit
  k's loss, updated with this step's losses before the weights are formed
  (the first update sets it to the losses). This is Hu et al.'s balancing,
  whose weights ``1/ℓ̄_k`` make the update the gradient of ``Σ_k log ℓ_k``
  when ``ℓ̄ = ℓ``. Assumptions: the weights are normalised to sum to K, the
  uniform sum's total; the average is an EMA with ``decay``.

  The losses reach the transformation as an extra argument of ``update``::

    updates, state = tx.update(grads, state, params, losses=losses)

  with ``losses`` the ``(K,)`` vector the gradients are of (the first output
  of :func:`osgd_jax.value_and_per_exit_grads`). ``optax.chain`` forwards it.

  Invariance: scaling exit k's loss (hence its gradient) by ``c_k > 0``
  leaves the update's direction unchanged; its size changes by the factor
  ``Σ_j 1/ℓ̄_j / Σ_j 1/(c_j ℓ̄_j)`` of the normalisation.

  Args:
    decay: EMA decay of the losses, in [0, 1); 0 uses the current losses.
    eps: floor on ``ℓ̄_k``, so that a zero loss gives a finite weight.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``; the weights do not depend on
      the gradients, so both give the same update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is an
    :class:`AdaLossState` per group.

  Raises:
    ValueError: a bad option (at construction); ``losses`` missing or not of
      shape ``(K,)`` (at trace time).

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.adaptive_loss_balancing(num_exits=2)
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> updates, state = tx.update({"w": jnp.ones((2, 3))}, state,
    ...                            losses=jnp.array([1.0, 3.0]))
    >>> state.weights.tolist()
    [1.5, 0.5]

  References:
    Hu, Dey, Hebert & Bagnell, *Learning Anytime Predictions in Neural
    Networks via Adaptive Loss Balancing*, AAAI 2019.
    https://arxiv.org/abs/1708.06832
  """
  name = "adaptive_loss_balancing"
  aggregation.check_fraction(decay, "decay", name)
  if aggregation.is_checkable_number(eps) and not eps > 0:
    raise ValueError(f"eps must be > 0, got {eps!r}.")

  def init(k):
    return AdaLossState(jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.int32))

  def apply(gram, state: AdaLossState, *, losses=None, **extra_args):
    del extra_args
    k = gram.shape[-1]
    if losses is None:
      raise ValueError(
          f"{name} needs the per-exit losses: call"
          " tx.update(grads, state, params, losses=losses) with the (K,)"
          " losses the gradients are of.")
    if jnp.shape(losses) != (k,):
      raise ValueError(
          f"{name} got losses of shape {jnp.shape(losses)}, but the gradients"
          f" have K={k} exits; pass the ({k},) vector of per-exit losses.")
    losses = jnp.asarray(losses, jnp.float32)
    ema = jnp.where(state.count == 0, losses,
                    decay * state.ema + (1 - decay) * losses)
    weights = weightings.adaloss(gram, losses=ema.astype(gram.dtype), eps=eps)
    return weights, AdaLossState(ema, optax.safe_increment(state.count))

  return aggregation.from_weighting(
      aggregation.StatefulWeighting(init, apply), num_exits=num_exits,
      granularity=granularity, name=name)


class KeyState(NamedTuple):
  """The weighting state of a random weighting: its PRNG key.

  Attributes:
    key_data: the raw data (uint32) of the PRNG key that draws the next
      random numbers (``jax.random.wrap_key_data`` turns it into a key); raw
      data, so that it checkpoints like any array.
  """

  key_data: jax.Array


# PCGrad's weighting state (its key draws the visiting orders).
PCGradState = KeyState


def keyed(draw: Callable[..., jax.Array], seed: int
          ) -> aggregation.StatefulWeighting:
  """A random weighting whose PRNG key the Optax state carries.

  Args:
    draw: a weighting ``draw(gram, key=...)``, such as
      :func:`osgd_jax.weightings.pcgrad`.
    seed: the seed of the first key.

  Returns:
    A :class:`~osgd_jax.StatefulWeighting` whose state is a
    :class:`KeyState`; each step splits the key and passes one half to
    ``draw``.

  Example:
    >>> import osgd_jax
    >>> tx = osgd_jax.from_weighting(keyed(osgd_jax.weightings.pcgrad, 0),
    ...                              num_exits=2)
  """

  def init(k):
    del k
    return KeyState(jax.random.key_data(jax.random.key(seed)))

  def apply(gram, state: KeyState, **extra_args):
    del extra_args
    key, subkey = jax.random.split(jax.random.wrap_key_data(state.key_data))
    return draw(gram, key=subkey), KeyState(jax.random.key_data(key))

  return aggregation.StatefulWeighting(init, apply)


def pcgrad(
    seed: int = 0,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
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
    :class:`KeyState` (``PCGradState``) per group.

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
  return aggregation.from_weighting(
      keyed(weightings.pcgrad, seed), num_exits=num_exits,
      granularity=granularity, name="pcgrad")


def check_qp_options(max_iter: Any, tol: Any, name: str) -> None:
  """Checks a QP solver's ``max_iter`` (an int >= 1) and ``tol`` (in [0, 1)).

  Example:
    >>> check_qp_options(100, 1e-6, "mgda")
  """
  aggregation.check_positive_int(max_iter, "max_iter", name)
  aggregation.check_fraction(tol, "tol", name)


def mgda(
    *,
    num_exits: int | None = None,
    granularity: str = "global",
    max_iter: int = 100,
    tol: float = weightings.DEFAULT_QP_TOL,
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
  """
  check_qp_options(max_iter, tol, "mgda")
  return aggregation.from_weighting(
      functools.partial(weightings.mgda, max_iter=max_iter, tol=tol),
      num_exits=num_exits, granularity=granularity, name="mgda")


def upgrad(
    *,
    num_exits: int | None = None,
    granularity: str = "global",
    max_iter: int = 100,
    tol: float = weightings.DEFAULT_QP_TOL,
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
  check_qp_options(max_iter, tol, "upgrad")
  return aggregation.from_weighting(
      functools.partial(weightings.upgrad, max_iter=max_iter, tol=tol),
      num_exits=num_exits, granularity=granularity, name="upgrad")
