"""Baseline aggregators of per-exit gradients, with the same contract as ``osgd``.

Every transformation here takes the per-exit gradients stacked on a leading
axis (leaves ``(K, *param.shape)``, as :func:`osgd_jax.value_and_per_exit_grads`
returns them) and emits one parameter-shaped update, so each must come first
in an Optax chain, like :func:`osgd_jax.osgd`. Each is
:func:`osgd_jax.from_weighting` of a weighting of :mod:`osgd_jax.weightings`;
the ones whose weighting needs a step count, a running average or a PRNG key
keep it in their state, whose shapes are fixed at ``init``.

================================  ===============================================
:func:`weighted_sum`              fixed or scheduled loss weights (MSDNet's
                                  uniform sum, linear and geometric ramps, the
                                  SDN ramp)
:func:`adaptive_loss_balancing`   AdaLoss: ``w_k ∝ 1 / EMA(loss_k)``
:func:`pcgrad`                    PCGrad: project away conflicting gradients
:func:`mgda`                      MGDA: the min-norm point of the convex hull
:func:`upgrad`                    UPGrad: mean of the projections onto the dual
                                  cone
:func:`random_weighting`          Random: softmax of Gaussian weights, every step
:func:`imtl_g`                    IMTL-G: equal projections on the unit gradients
:func:`aligned_mtl`               Aligned-MTL: the sum of aligned (orthogonal,
                                  equal-norm) gradients
:func:`krum`                      Krum: the gradient(s) nearest their neighbours
:func:`dualproj`                  DualProj: the mean, projected onto the dual cone
:func:`gradvac`                   GradVac: cosines raised to running targets
:func:`cagrad`                    CAGrad: the best worst case in a ball around
                                  the mean
:func:`config`                    ConFIG: equal cosines with every gradient
:func:`fairgrad`                  FairGrad: α-fair improvements of the exits
:func:`modo`                      MoDo: one projected step of MGDA's weights per
                                  update
:func:`sdmgrad`                   SDMGrad: MGDA's weights pulled to the mean
:func:`crmogm`                    CR-MOGM: any weighting, smoothed by an EMA
:func:`pcd`                       PCD: exit 1 first, the others guaranteed
                                  progress
:func:`nash_mtl`                  Nash-MTL: the Nash bargaining solution
:func:`trimmed_mean`              TrimmedMean: per coordinate, without extremes
                                  (no weighting: coordinate-wise)
:func:`graddrop`                  GradDrop: per coordinate, one sign kept at
                                  random (no weighting: coordinate-wise)
:func:`excess_mtl`                ExcessMTL: weights following excess-risk
                                  estimates (reads every coordinate)
================================  ===============================================

TorchJD's ``Mean``, ``Sum`` and ``Constant`` are :func:`weighted_sum` with
``"mean"``, ``"sum"`` (``"uniform"``) and a vector of weights.

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
from osgd_jax import gram as gram_lib
from osgd_jax import weightings

__all__ = [
    "AdaLossState",
    "CRMOGMState",
    "CRMOGM_WEIGHTINGS",
    "CoordinateState",
    "ExcessMTLState",
    "GradVacState",
    "KeyState",
    "NashMTLState",
    "PCDState",
    "PCGradState",
    "SimplexState",
    "WEIGHT_PRESETS",
    "adaptive_loss_balancing",
    "aligned_mtl",
    "cagrad",
    "config",
    "crmogm",
    "dualproj",
    "excess_mtl",
    "fairgrad",
    "graddrop",
    "gradvac",
    "imtl_g",
    "krum",
    "mgda",
    "modo",
    "nash_mtl",
    "pcd",
    "pcgrad",
    "random_weighting",
    "sdmgrad",
    "trimmed_mean",
    "upgrad",
    "weighted_sum",
]

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


def _keyed(draw: Callable[..., jax.Array], seed: int
           ) -> aggregation.StatefulWeighting:
  """``draw(gram, key=)`` with a key that the state carries, split per step."""

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
      _keyed(weightings.pcgrad, seed), num_exits=num_exits,
      granularity=granularity, name="pcgrad")


def _check_qp_options(max_iter: Any, tol: Any, name: str) -> None:
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
  _check_qp_options(max_iter, tol, "mgda")
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
  _check_qp_options(max_iter, tol, "upgrad")
  return aggregation.from_weighting(
      functools.partial(weightings.upgrad, max_iter=max_iter, tol=tol),
      num_exits=num_exits, granularity=granularity, name="upgrad")


def random_weighting(
    seed: int = 0,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """Random weighting: ``u = Σ_k w_k g_k`` with ``w = softmax(z)``, ``z ~ N(0, I)``.

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
    :class:`KeyState` per group.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.random_weighting(seed=0, num_exits=3)
    >>> _, state = tx.update({"w": jnp.ones((3, 2))}, tx.init({"w": jnp.zeros(2)}))
    >>> round(float(state.weights.sum()), 5)
    1.0

  References:
    Lin, Ye, Xu, Shi & Zhang, *Reasonable Effectiveness of Random Weighting:
    A Litmus Test for Multi-Task Learning*, TMLR 2022.
    https://arxiv.org/abs/2111.10603
  """
  return aggregation.from_weighting(
      _keyed(weightings.random_weighting, seed), num_exits=num_exits,
      granularity=granularity, name="random_weighting")


def imtl_g(
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """IMTL-G: the update with equal projections on every exit's unit gradient.

  ``u = Σ_k w_k g_k`` with ``w = M⁺ d / Σ(M⁺ d)``, ``d_k = ‖g_k‖``
  (:func:`osgd_jax.weightings.imtl_g`, TorchJD's ``IMTLG``): ``⟨u, g_k⟩ /
  ‖g_k‖`` is the same for every exit, so none is favoured.

  Invariance: scaling exit k's gradient by ``c_k > 0`` leaves the line of
  u unchanged (its size and sign follow the normalisation ``Σ w = 1``);
  invariant to the exits' order.

  Args:
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.imtl_g(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [0.75, 0.75]

  References:
    Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021.
    https://openreview.net/forum?id=IMPnRXEWpvr
  """
  return aggregation.from_weighting(
      weightings.imtl_g, num_exits=num_exits, granularity=granularity,
      name="imtl_g")


def aligned_mtl(
    pref_vector: Sequence[float] | jax.Array | None = None,
    scale_mode: str = "min",
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """Aligned-MTL: the preference-weighted sum of the aligned gradients.

  The gradients are replaced by orthogonal ones of equal norm, spanning the
  same space (the condition number of the system made 1), and summed with
  the preferences (:func:`osgd_jax.weightings.aligned_mtl`, TorchJD's
  ``AlignedMTL``).

  Args:
    pref_vector: ``(K,)`` preferences; ``None``: ``1/K`` each.
    scale_mode: the common norm's square: the smallest nonzero eigenvalue of
      M (``"min"``, the paper's), their median (``"median"``) or mean
      (``"rmse"``).
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Raises:
    ValueError: an unknown ``scale_mode``, or a ``pref_vector`` that is not
      K finite numbers.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.aligned_mtl(num_exits=2)
    >>> g = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [0.5, 0.5]

  References:
    Senushkin, Patakin, Kuznetsov & Konushin, *Independent Component
    Alignment for Multi-Task Learning*, CVPR 2023.
    https://arxiv.org/abs/2305.19000
  """
  name = "aligned_mtl"
  num_exits = aggregation.check_num_exits(num_exits, name)
  aggregation.check_pref_vector(pref_vector, num_exits, name)
  if scale_mode not in weightings.ALIGNED_MTL_SCALE_MODES:
    raise ValueError(
        f"{name}: scale_mode must be one of"
        f" {weightings.ALIGNED_MTL_SCALE_MODES}, got {scale_mode!r}.")
  return aggregation.from_weighting(
      functools.partial(weightings.aligned_mtl, pref_vector=pref_vector,
                        scale_mode=scale_mode),
      num_exits=num_exits, granularity=granularity, name=name)


def krum(
    n_byzantine: int = 0,
    n_selected: int = 1,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """Krum: the gradient(s) nearest their neighbours, robust to outliers.

  ``u`` is the mean of the ``n_selected`` gradients whose summed distances
  to their ``K − n_byzantine − 2`` nearest neighbours are the smallest
  (:func:`osgd_jax.weightings.krum`, TorchJD's ``Krum``). Made for
  Byzantine-robust distributed training, where up to ``n_byzantine``
  gradients may be arbitrary.

  Args:
    n_byzantine: how many gradients may be adversarial, ``≥ 0``; K must be
      at least ``n_byzantine + 3``.
    n_selected: how many gradients to average (Multi-Krum), ``1 ≤ · ≤ K``.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Raises:
    ValueError: ``n_byzantine`` or ``n_selected`` out of range for K.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.krum(num_exits=3)
    >>> g = {"w": jnp.array([[1.0, 0.0], [1.2, 0.0], [-5.0, 4.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"].tolist()
    [1.0, 0.0]

  References:
    Blanchard, El Mhamdi, Guerraoui & Stainer, *Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent*, NeurIPS 2017.
    https://papers.nips.cc/paper/6617
  """
  name = "krum"
  num_exits = aggregation.check_num_exits(num_exits, name)
  if (isinstance(n_byzantine, bool) or not isinstance(n_byzantine, int)
      or n_byzantine < 0):
    raise ValueError(
        f"{name}: n_byzantine must be an int >= 0, got {n_byzantine!r}.")
  aggregation.check_positive_int(n_selected, "n_selected", name)
  if num_exits < n_byzantine + 3 or num_exits < n_selected:
    raise ValueError(
        f"{name} with n_byzantine={n_byzantine} and n_selected={n_selected}"
        f" needs num_exits >= {max(n_byzantine + 3, n_selected)}, got"
        f" num_exits={num_exits}; lower n_byzantine or n_selected.")
  return aggregation.from_weighting(
      functools.partial(weightings.krum, n_byzantine=n_byzantine,
                        n_selected=n_selected),
      num_exits=num_exits, granularity=granularity, name=name)


def dualproj(
    pref_vector: Sequence[float] | jax.Array | None = None,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
    max_iter: int = 100,
    tol: float = weightings.DEFAULT_QP_TOL,
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
  """
  name = "dualproj"
  num_exits = aggregation.check_num_exits(num_exits, name)
  aggregation.check_pref_vector(pref_vector, num_exits, name)
  _check_qp_options(max_iter, tol, name)
  return aggregation.from_weighting(
      functools.partial(weightings.dualproj, pref_vector=pref_vector,
                        max_iter=max_iter, tol=tol),
      num_exits=num_exits, granularity=granularity, name=name)


class GradVacState(NamedTuple):
  """GradVac's weighting state.

  Attributes:
    target: ``(K, K)`` the cosine targets ``φ̂`` (row i: task i's), an EMA
      of the cosines seen; 0 at ``init``.
    key_data: the raw data of the PRNG key that draws the visiting orders
      (as :class:`KeyState`'s).
  """

  target: jax.Array
  key_data: jax.Array


def gradvac(
    beta: float = 0.5,
    eps: float = 1e-8,
    seed: int = 0,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
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
  aggregation.check_unit_interval(beta, "beta", name)
  aggregation.check_nonnegative(eps, "eps", name)

  def init(k):
    return GradVacState(jnp.zeros((k, k), jnp.float32),
                        jax.random.key_data(jax.random.key(seed)))

  def apply(gram, state: GradVacState, **extra_args):
    del extra_args
    key, subkey = jax.random.split(jax.random.wrap_key_data(state.key_data))
    weights, target = weightings.gradvac(
        gram, target=state.target.astype(gram.dtype), key=subkey, beta=beta,
        eps=eps)
    return weights, GradVacState(target, jax.random.key_data(key))

  return aggregation.from_weighting(
      aggregation.StatefulWeighting(init, apply), num_exits=num_exits,
      granularity=granularity, name=name)


def cagrad(
    c: float = 0.4,
    norm_eps: float = 1e-4,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
    bisections: int = 40,
    max_iter: int = 100,
    tol: float = weightings.DEFAULT_QP_TOL,
) -> optax.GradientTransformationExtraArgs:
  """CAGrad: the best worst-case improvement within a ball around the mean.

  ``u = g_0 + c ‖g_0‖ g_w / ‖g_w‖``, the direction within ``c ‖g_0‖`` of the
  mean gradient ``g_0`` that maximises ``min_k ⟨g_k, u⟩``
  (:func:`osgd_jax.weightings.cagrad`, TorchJD's ``CAGrad``), solved under
  ``jax.jit`` by a bisection over simplex QPs, with no convex-solver
  dependency. ``c = 0`` is the mean; as c grows the update approaches
  MGDA's direction. No update when the worst case cannot be improved (e.g.
  an exit with a zero gradient).

  Args:
    c: the ball's radius relative to ``‖g_0‖``, ``≥ 0`` (the paper's 0.4).
    norm_eps: below this ``‖g_w‖``, relative to the gradients' Frobenius
      norm, no update.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.
    bisections: steps of the bisection.
    max_iter: cap on the active-set iterations of each QP.
    tol: relative tolerance of their optimality test.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.cagrad(0.5, num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [0.75, 0.75]

  References:
    Liu, Liu, Jin, Stone & Liu, *Conflict-Averse Gradient Descent for
    Multi-task Learning*, NeurIPS 2021. https://arxiv.org/abs/2110.14048
  """
  name = "cagrad"
  aggregation.check_nonnegative(c, "c", name)
  aggregation.check_nonnegative(norm_eps, "norm_eps", name)
  aggregation.check_positive_int(bisections, "bisections", name)
  _check_qp_options(max_iter, tol, name)
  return aggregation.from_weighting(
      functools.partial(weightings.cagrad, c=c, norm_eps=norm_eps,
                        bisections=bisections, max_iter=max_iter, tol=tol),
      num_exits=num_exits, granularity=granularity, name=name)


def config(
    pref_vector: Sequence[float] | jax.Array | None = None,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """ConFIG: a conflict-free direction with equal cosines to every gradient.

  ``u = (Σ_i ⟨g_i, v̂⟩) v̂`` with ``v = Ĝ⁺ p`` for the unit gradients Ĝ
  (:func:`osgd_jax.weightings.config`, TorchJD's ``ConFIG``), exact from the
  Gram matrix.

  Args:
    pref_vector: ``(K,)`` proportions of the target cosines; ``None``: ones.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.config(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [1.5, 1.5]

  References:
    Liu, Chu & Thuerey, *ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks*, ICLR 2025. https://arxiv.org/abs/2408.11104
  """
  name = "config"
  num_exits = aggregation.check_num_exits(num_exits, name)
  aggregation.check_pref_vector(pref_vector, num_exits, name)
  return aggregation.from_weighting(
      functools.partial(weightings.config, pref_vector=pref_vector),
      num_exits=num_exits, granularity=granularity, name=name)


def fairgrad(
    alpha: float = 1.0,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
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
    >>> tx = osgd_jax.fairgrad(1.0, num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]   # ⟨g_k, u⟩ = 1/w_k
    [1.0, 1.0]

  References:
    Ban & Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024.
    https://arxiv.org/abs/2402.15638
  """
  name = "fairgrad"
  aggregation.check_nonnegative(alpha, "alpha", name)
  aggregation.check_positive_int(max_iter, "max_iter", name)
  return aggregation.from_weighting(
      functools.partial(weightings.fairgrad, alpha=alpha, max_iter=max_iter),
      num_exits=num_exits, granularity=granularity, name=name)


class SimplexState(NamedTuple):
  """The weights a MoDo or SDMGrad step starts from.

  Attributes:
    iterate: ``(K,)`` on the simplex, ``1/K`` at ``init`` (not named
      ``weights``, which names the applied weights in every state).
  """

  iterate: jax.Array


def _uniform_start(k: int) -> SimplexState:
  return SimplexState(jnp.full((k,), 1.0 / k, jnp.float32))


def modo(
    gamma: float = 0.1,
    rho: float = 0.1,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """MoDo: weights that take one projected-gradient step towards MGDA's per update.

  ``λ ← Π_Δ(λ − γ (M λ + ρ λ))``, ``u = λᵀ G``
  (:func:`osgd_jax.weightings.modo`, TorchJD's ``MoDoWeighting``), λ kept
  in the state. The paper's M pairs two independent mini-batches; on the
  stacked-gradient contract it is the step's ``G Gᵀ``.

  Args:
    gamma: the weights' step size, ``> 0``.
    rho: their ℓ2 regularisation, ``≥ 0``.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`SimplexState` per group.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.modo(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0 ** 0.5]])}
    >>> _, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in state.weights.tolist()]
    [0.55, 0.45]

  References:
    Chen, Fernando, Ying & Chen, *Three-Way Trade-Off in Multi-Objective
    Learning: Optimization, Generalization and Conflict-Avoidance*, JMLR 25,
    2024. https://arxiv.org/abs/2305.20057
  """
  name = "modo"
  if aggregation.is_checkable_number(gamma) and not gamma > 0:
    raise ValueError(f"{name}: gamma must be > 0, got {gamma!r}.")
  aggregation.check_nonnegative(rho, "rho", name)

  def apply(gram, state: SimplexState, **extra_args):
    del extra_args
    weights = weightings.modo(gram, previous=state.iterate.astype(gram.dtype),
                              gamma=gamma, rho=rho)
    return weights, SimplexState(weights)

  return aggregation.from_weighting(
      aggregation.StatefulWeighting(_uniform_start, apply),
      num_exits=num_exits, granularity=granularity, name=name)


def sdmgrad(
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    lambda_: float = 0.3,
    pref_vector: Sequence[float] | jax.Array | None = None,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """SDMGrad: MGDA's weights pulled towards a preferred direction (the mean).

  ``n_iter`` projected momentum steps on ``½‖(w + λ w̃)ᵀ G‖²`` from the
  previous w, then ``u = (w + λ w̃)ᵀ G / (1 + λ)``
  (:func:`osgd_jax.weightings.sdmgrad`, TorchJD's ``SDMGradWeighting``), w
  kept in the state. As for :func:`modo`, M is the step's ``G Gᵀ``.

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
    :class:`SimplexState` per group.

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
  num_exits = aggregation.check_num_exits(num_exits, name)
  if aggregation.is_checkable_number(lr) and not lr > 0:
    raise ValueError(f"{name}: lr must be > 0, got {lr!r}.")
  aggregation.check_fraction(momentum, "momentum", name)
  aggregation.check_positive_int(n_iter, "n_iter", name)
  aggregation.check_nonnegative(lambda_, "lambda_", name)
  aggregation.check_pref_vector(pref_vector, num_exits, name)

  def apply(gram, state: SimplexState, **extra_args):
    del extra_args
    weights, w = weightings.sdmgrad(
        gram, previous=state.iterate.astype(gram.dtype),
        pref_vector=pref_vector, lr=lr, momentum=momentum, n_iter=n_iter,
        lambda_=lambda_)
    return weights, SimplexState(w)

  return aggregation.from_weighting(
      aggregation.StatefulWeighting(_uniform_start, apply),
      num_exits=num_exits, granularity=granularity, name=name)


# The weightings of osgd_jax.weightings that crmogm takes by name: those
# that need nothing but the Gram matrix.
CRMOGM_WEIGHTINGS = ("upgrad", "mgda", "dualproj", "imtl_g", "aligned_mtl",
                     "cagrad", "config", "fairgrad", "nash_mtl", "pcd", "osgd",
                     "mean", "uniform")


class CRMOGMState(NamedTuple):
  """CR-MOGM's weighting state.

  Attributes:
    smoothed: ``(K,)`` the smoothed weights of the previous update.
    count: the number of updates so far (the first takes the inner weights
      as they are).
    inner: the wrapped weighting's own state (``()`` for a pure one).
  """

  smoothed: jax.Array
  count: jax.Array
  inner: Any


def crmogm(
    weighting: str | weightings.Weighting | aggregation.StatefulWeighting
    = "upgrad",
    alpha: float = 0.9,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """CR-MOGM: any weighting's weights, smoothed by an EMA across steps.

  ``λ_t = α λ_{t−1} + (1 − α) λ̂_t`` with ``λ̂_t`` the wrapped weighting's
  weights, and ``λ_1 = λ̂_1``; ``u = λ_tᵀ G``. The paper shows that this
  smoothing makes stochastic multi-objective gradient manipulation (MGDA,
  UPGrad and kin) converge; TorchJD's ``CRMOGMWeighting``.

  Args:
    weighting: the name of a weighting of :mod:`osgd_jax.weightings` that
      reads the Gram matrix only (``CRMOGM_WEIGHTINGS``: ``"upgrad"``,
      ``"mgda"``, ...), with its defaults; a function ``(K, K) -> (K,)``; or
      a :class:`osgd_jax.StatefulWeighting`.
    alpha: the EMA's weight on the previous weights, in [0, 1]; 0: no
      smoothing.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`CRMOGMState` per group.

  Raises:
    ValueError: an unknown weighting name or ``alpha`` outside [0, 1].

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.crmogm("mgda", alpha=0.5, num_exits=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> for g in ([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 3.0]]):
    ...   _, state = tx.update({"w": jnp.asarray(g)}, state)
    >>> [round(v, 4) for v in state.weights.tolist()]   # ½(½, ½) + ½(0.9, 0.1)
    [0.7, 0.3]

  References:
    Zhou, Zhang, Jiang, Chen, Wang & Xu, *On the Convergence of Stochastic
    Multi-Objective Gradient Manipulation and Beyond*, NeurIPS 2022.
    https://openreview.net/forum?id=ScwfQ7hdwyP
  """
  name = "crmogm"
  aggregation.check_unit_interval(alpha, "alpha", name)
  if isinstance(weighting, str):
    if weighting not in CRMOGM_WEIGHTINGS:
      raise ValueError(
          f"{name}: unknown weighting {weighting!r}; name one of"
          f" {CRMOGM_WEIGHTINGS}, or pass a function (K, K) -> (K,) or an"
          " osgd_jax.StatefulWeighting.")
    weighting = getattr(weightings, weighting)
  inner = (weighting if isinstance(weighting, aggregation.StatefulWeighting)
           else aggregation.stateless(weighting))

  def init(k):
    return CRMOGMState(jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.int32),
                       inner.init(k))

  def apply(gram, state: CRMOGMState, **extra_args):
    fresh, inner_state = inner.apply(gram, state.inner, **extra_args)
    previous = state.smoothed.astype(gram.dtype)
    weights = jnp.where(state.count == 0, fresh,
                        alpha * previous + (1.0 - alpha) * fresh)
    return weights, CRMOGMState(weights, optax.safe_increment(state.count),
                                inner_state)

  return aggregation.from_weighting(
      aggregation.StatefulWeighting(init, apply), num_exits=num_exits,
      granularity=granularity, name=name)


class PCDState(NamedTuple):
  """PCD's weighting state.

  Attributes:
    sq_norm_ema: ``(K,)`` the EMA of the exits' squared gradient norms.
    count: the number of updates so far (for the EMA's bias correction).
  """

  sq_norm_ema: jax.Array
  count: jax.Array


def pcd(
    tau: float | Sequence[float] = 0.02,
    beta: float = 0.999,
    eps: float = 1e-8,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
    max_iter: int = 100,
    tol: float = weightings.DEFAULT_QP_TOL,
) -> optax.GradientTransformationExtraArgs:
  """PCD: follow exit 1's gradient, guaranteeing each other exit some progress.

  Exit 1 (the first row; reorder the exits to choose another) is the
  primary objective: the update is the closest direction to its normalised
  gradient that gives every other exit at least the fraction ``tau`` of the
  progress of a step along its own normalised gradient, rescaled to
  ``‖g_1‖`` (:func:`osgd_jax.weightings.pcd`, TorchJD's ``PCD``). Each
  gradient is normalised by ``1/√(v̂_i + eps)``, v̂ the bias-corrected EMA
  (decay ``beta``) of its squared norm, kept in the state. For anytime
  networks, a natural choice is the exit that must be best (the last:
  reverse the exits) or the one served most.

  Args:
    tau: the guaranteed fraction, in [0, 1]: one number or K−1.
    beta: the EMA's decay, in [0, 1).
    eps: added to the EMA before its inverse square root, ``≥ 0``.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` or ``"leaf"``.
    max_iter: cap on the active-set iterations.
    tol: relative tolerance of the optimality test.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`PCDState` per group.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.pcd(tau=0.0, num_exits=2)
    >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]   # g_1's size, ⟂ g_2
    [0.7071, 0.7071]

  References:
    Varam et al., *Not All Objectives Are Born Equal: Priority-Constrained
    Descent for Hierarchical Multi-Objective Optimization*, TMLR 2026.
    https://openreview.net/forum?id=HT01yGHLEt
  """
  name = "pcd"
  num_exits = aggregation.check_num_exits(num_exits, name)
  if not isinstance(tau, jax.Array):
    taus = np.asarray(tau, np.float64).reshape(-1)
    if taus.shape not in ((1,), (num_exits - 1,)) or not np.all(
        (taus >= 0) & (taus <= 1)):
      raise ValueError(
          f"{name}: tau must be one number or {num_exits - 1} (one per"
          f" secondary exit), each in [0, 1]; got {tau!r}.")
  aggregation.check_fraction(beta, "beta", name)
  aggregation.check_nonnegative(eps, "eps", name)
  _check_qp_options(max_iter, tol, name)

  def init(k):
    return PCDState(jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.int32))

  def apply(gram, state: PCDState, **extra_args):
    del extra_args
    sq_norms = jnp.maximum(jnp.diagonal(gram), 0.0)
    count = optax.safe_increment(state.count)
    ema = beta * state.sq_norm_ema.astype(gram.dtype) + (1 - beta) * sq_norms
    debiased = ema / (1 - jnp.asarray(beta, gram.dtype) ** count)
    scales = gram_lib.safe_inverse(jnp.sqrt(debiased + eps))
    weights = weightings.pcd(gram, scales=scales, tau=tau, max_iter=max_iter,
                             tol=tol)
    # A non-finite gradient leaves the EMA as it was (and the update NaN).
    finite = jnp.all(jnp.isfinite(gram))
    return weights, PCDState(
        jnp.where(finite, ema, state.sq_norm_ema.astype(gram.dtype)),
        jnp.where(finite, count, state.count))

  return aggregation.from_weighting(
      aggregation.StatefulWeighting(init, apply), num_exits=num_exits,
      granularity=granularity, name=name)


class NashMTLState(NamedTuple):
  """Nash-MTL's weighting state.

  Attributes:
    alpha: ``(K,)`` the bargaining weights last solved for (before the norm
      clipping), reused between updates.
    count: the number of updates so far.
  """

  alpha: jax.Array
  count: jax.Array


def nash_mtl(
    max_norm: float = 1.0,
    update_weights_every: int = 1,
    *,
    num_exits: int | None = None,
    granularity: str = "global",
    max_iter: int = 50,
) -> optax.GradientTransformationExtraArgs:
  """Nash-MTL: the exits' Nash bargaining solution, norm-clipped.

  ``u = αᵀ G`` with ``⟨g_k, u⟩ = 1/α_k`` on the Frobenius-normalised Gram
  matrix, clipped to norm ``max_norm``
  (:func:`osgd_jax.weightings.nash_mtl`, TorchJD's ``NashMTL`` with its
  defaults). α is solved for every ``update_weights_every`` updates and
  reused in between, as the paper does to save time; here that saves
  little, since the solve is a few K×K Newton steps under ``jax.jit``
  (TorchJD's needs cvxpy).

  Args:
    max_norm: the largest norm of the update, ``≥ 0``; 0: unbounded.
    update_weights_every: solve for α every this many updates.
    num_exits: K (required; see :func:`osgd_jax.osgd`).
    granularity: ``"global"`` (the paper's) or ``"leaf"``.
    max_iter: the Newton steps.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`osgd_jax.AggregationState`; its ``weighting_state`` is a
    :class:`NashMTLState` per group.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.nash_mtl(num_exits=2)
    >>> g = {"w": jnp.array([[0.1, 0.0], [0.0, 0.2]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [0.2031, 0.2031]

  References:
    Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022.
    https://arxiv.org/abs/2202.01017
  """
  name = "nash_mtl"
  aggregation.check_nonnegative(max_norm, "max_norm", name)
  aggregation.check_positive_int(update_weights_every, "update_weights_every",
                                 name)
  aggregation.check_positive_int(max_iter, "max_iter", name)

  def init(k):
    return NashMTLState(jnp.ones((k,), jnp.float32), jnp.zeros((), jnp.int32))

  def apply(gram, state: NashMTLState, **extra_args):
    del extra_args
    solve = state.count % update_weights_every == 0
    fresh = weightings.nash_mtl(gram, max_norm=0.0, max_iter=max_iter)
    alpha = jnp.where(solve, fresh, state.alpha.astype(gram.dtype))
    weights = weightings.clip_update_norm(gram, alpha, max_norm)
    return weights, NashMTLState(alpha, optax.safe_increment(state.count))

  return aggregation.from_weighting(
      aggregation.StatefulWeighting(init, apply), num_exits=num_exits,
      granularity=granularity, name=name)


# --- aggregators of the gradients themselves, coordinate by coordinate -------


class CoordinateState(NamedTuple):
  """The state of an aggregator that combines the gradients coordinate-wise.

  Its update is no weighted sum of the exits' gradients; ``weights`` holds
  each exit's multiplier averaged over the coordinates instead (the
  fraction of its values kept, for TrimmedMean divided by the number
  kept), beside the Gram diagnostics, for ``optax.tree_utils.tree_get``.

  Attributes:
    weights: ``(K,)`` each exit's mean multiplier over the coordinates, at
      the last update.
    exit_norms: ``(K,)`` the norm of each exit's gradient, at the last
      update.
    cosine: ``(K, K)`` the cosines between the exits' gradients.
    key_data: the PRNG key of a random aggregator (GradDrop); else ``()``.
  """

  weights: jax.Array
  exit_norms: jax.Array
  cosine: jax.Array
  key_data: Any


def _coordinatewise(
    combine: Callable[[jax.Array, Any], tuple[jax.Array, jax.Array]],
    *,
    num_exits: int | None,
    seed: int | None,
    name: str,
) -> optax.GradientTransformationExtraArgs:
  """A transformation applying ``combine(leaf, key) -> (update, multipliers)``.

  ``combine`` maps one stacked leaf ``(K, ...)`` to its update ``(...)`` and
  the exits' multipliers summed over its coordinates, ``(K,)``.
  """
  num_exits = aggregation.check_num_exits(num_exits, name)

  def init_fn(params):
    del params
    k = num_exits
    key_data = (() if seed is None
                else jax.random.key_data(jax.random.key(seed)))
    zeros = jnp.zeros((k,), aggregation.DIAGNOSTICS_DTYPE)
    return CoordinateState(
        zeros, zeros, jnp.zeros((k, k), aggregation.DIAGNOSTICS_DTYPE),
        key_data)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    with jax.named_scope(name):
      stacked = aggregation.read_stacked(updates, num_exits=num_exits,
                                         params=params, name=name)
      if stacked is None:
        return updates, state
      key_data = state.key_data
      # A step with a NaN or Inf gradient keeps the key, as every
      # aggregator keeps its state, for optax.apply_if_finite after it.
      finite = aggregation.all_finite(stacked.leaves)
      if seed is not None:
        key, subkey = jax.random.split(jax.random.wrap_key_data(key_data))
        key_data = jnp.where(finite, jax.random.key_data(key), key_data)
      outs = []
      multipliers = jnp.zeros((num_exits,), stacked.compute_dtype)
      for i, leaf in enumerate(stacked.leaves):
        leaf_key = (None if seed is None
                    else jax.random.fold_in(subkey, i))
        leaf = leaf.astype(stacked.compute_dtype)
        out, summed = combine(leaf, leaf_key)
        # A non-finite gradient is not hidden (GradDrop's mask would drop
        # it): its coordinates' update is non-finite too.
        out = jnp.where(jnp.all(jnp.isfinite(leaf), axis=0), out,
                        leaf.sum(axis=0))
        outs.append(out.astype(stacked.leaves[i].dtype))
        multipliers = multipliers + summed
      weights = multipliers / max(sum(stacked.sizes), 1)
      exit_norms, cosine = gram_lib.gram_statistics(stacked.grams.sum(axis=0))
      as_state = lambda x: x.astype(aggregation.DIAGNOSTICS_DTYPE)
      return (jax.tree.unflatten(stacked.treedef, outs),
              CoordinateState(as_state(weights), as_state(exit_norms),
                              as_state(cosine), key_data))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def trimmed_mean(
    trim_number: int = 1,
    *,
    num_exits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Trimmed mean: per coordinate, the mean of the exits' values without extremes.

  Every coordinate's K values are sorted and the ``trim_number`` largest and
  smallest dropped; the update is the mean of the rest (TorchJD's
  ``TrimmedMean``; Yin et al.'s coordinate-wise trimmed mean, robust to
  ``trim_number`` arbitrary gradients). No weighting of the Gram matrix
  gives it, so it is not :func:`osgd_jax.from_weighting` of one: it sorts
  the stacked gradients along K, leaf by leaf (coordinates are independent,
  so there is no ``granularity``).

  Args:
    trim_number: how many values to drop at each end, ``≥ 0``;
      ``K ≥ 2 trim_number + 1``.
    num_exits: K (required; see :func:`osgd_jax.osgd`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`CoordinateState`.

  Raises:
    ValueError: K is too small for ``trim_number``.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.trimmed_mean(1, num_exits=3)
    >>> g = {"w": jnp.array([[1.0, -5.0], [2.0, 0.0], [9.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"].tolist()   # the medians
    [2.0, 0.0]

  References:
    Yin, Chen, Kannan & Bartlett, *Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates*, ICML 2018.
    https://arxiv.org/abs/1803.01498
  """
  name = "trimmed_mean"
  num_exits = aggregation.check_num_exits(num_exits, name)
  if (isinstance(trim_number, bool) or not isinstance(trim_number, int)
      or trim_number < 0 or num_exits < 2 * trim_number + 1):
    raise ValueError(
        f"{name}: trim_number must be an int with 0 <= trim_number and"
        f" num_exits >= 2 * trim_number + 1 (num_exits={num_exits}), got"
        f" {trim_number!r}.")

  kept_count = num_exits - 2 * trim_number

  def combine(leaf, key):
    del key
    rows = [leaf[i] for i in range(num_exits)]
    # K is small: an odd-even transposition network of elementwise min/max
    # sorts every coordinate in one pass each, where a sort along the K
    # axis is a slow kernel on XLA:CPU.
    for round_ in range(num_exits):
      for i in range(round_ % 2, num_exits - 1, 2):
        rows[i], rows[i + 1] = (jnp.minimum(rows[i], rows[i + 1]),
                                jnp.maximum(rows[i], rows[i + 1]))
    update = sum(rows[trim_number:num_exits - trim_number]) / kept_count
    # Exit k's rank among the K values of each coordinate (ties by index),
    # for the diagnostics: which exits' values are kept.
    summed = []
    for k in range(num_exits):
      rank = sum(((leaf[j] < leaf[k]) | ((leaf[j] == leaf[k]) & (j < k))
                  ).astype(jnp.int32) for j in range(num_exits) if j != k)
      inside = (rank >= trim_number) & (rank < num_exits - trim_number)
      # A sum over the parameter axes as they are: a reshape would merge
      # axes split over devices (docs/design.md, "Sharding").
      summed.append(inside.astype(leaf.dtype).sum())
    return update, jnp.stack(summed) / kept_count

  return _coordinatewise(combine, num_exits=num_exits, seed=None, name=name)


def graddrop(
    leak: Sequence[float] | None = None,
    seed: int = 0,
    *,
    num_exits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """GradDrop: per coordinate, keep one sign, chosen at random by its purity.

  For every coordinate, ``P = ½(1 + Σ_k g_k / Σ_k |g_k|)`` measures how
  positive the exits' values are; with U uniform on [0, 1], exit k's value
  is kept where ``P > U`` and it is positive, or ``P < U`` and it is
  negative, and the update is ``Σ_k (ℓ_k + (1 − ℓ_k) m_k) g_k`` (m the kept
  mask, ℓ the leak). As TorchJD's ``GradDrop``, it is applied to the
  parameters' gradients (the paper applies it at a shared activation
  layer), with the identity as the paper's f. Coordinates where every value
  is 0 give 0. U is drawn from a PRNG key that the state carries, split at
  every update.

  Args:
    leak: ``(K,)`` the leak ℓ_k in [0, 1] of each exit (1: always kept);
      ``None``: zeros.
    seed: seeds U.
    num_exits: K (required; see :func:`osgd_jax.osgd`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`CoordinateState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.graddrop(num_exits=2)
    >>> g = {"w": jnp.array([[1.0, -2.0], [3.0, -1.0]])}   # signs agree
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"].tolist()
    [4.0, -3.0]

  References:
    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, *Just Pick a
    Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout*,
    NeurIPS 2020. https://arxiv.org/abs/2010.06808
  """
  name = "graddrop"
  num_exits = aggregation.check_num_exits(num_exits, name)
  if leak is not None:
    leaks = np.asarray(leak, np.float64)
    if leaks.shape != (num_exits,) or not np.all((leaks >= 0) & (leaks <= 1)):
      raise ValueError(
          f"{name}: leak must be {num_exits} numbers in [0, 1] (one per exit,"
          f" num_exits={num_exits}), got {leak!r}.")

  def combine(leaf, key):
    k = leaf.shape[0]
    ell = [0.0] * k if leak is None else [float(x) for x in leak]
    # The sums over K are written row by row: elementwise adds of K rows,
    # which XLA:CPU runs far faster than a reduction over the leading axis.
    rows = [leaf[i] for i in range(k)]
    total = sum(jnp.abs(r) for r in rows)
    purity = 0.5 * (1.0 + sum(rows) * gram_lib.safe_inverse(total))
    u = jax.random.uniform(key, leaf.shape[1:], leaf.dtype)
    above, below = purity > u, purity < u
    update, summed = 0.0, []
    for r, l in zip(rows, ell):
      multiplier = l + (1.0 - l) * ((above & (r > 0)) | (below & (r < 0))
                                    ).astype(leaf.dtype)
      update = update + multiplier * r
      summed.append(multiplier.sum())
    return update, jnp.stack(summed)

  return _coordinatewise(combine, num_exits=num_exits, seed=seed, name=name)


class ExcessMTLState(NamedTuple):
  """ExcessMTL's state.

  Attributes:
    weights: ``(K,)`` the task weights, on the simplex (``1/K`` at
      ``init``).
    exit_norms: ``(K,)`` the norm of each exit's gradient, at the last
      update.
    cosine: ``(K, K)`` the cosines between the exits' gradients.
    sq_grad_sum: the running sum of the squared gradients, shaped like the
      stacked gradients (``(K, *param.shape)`` per leaf, float32): K times
      the parameters' memory.
    initial: ``(K,)`` the excess-risk baseline of the scale processing.
    warmup_sum: ``(K,)`` the excess risks summed over the warm-up.
    count: the number of updates so far.
  """

  weights: jax.Array
  exit_norms: jax.Array
  cosine: jax.Array
  sq_grad_sum: Any
  initial: jax.Array
  warmup_sum: jax.Array
  count: jax.Array


def excess_mtl(
    robust_step_size: float = 1.0,
    n_warmup_steps: int = 0,
    *,
    num_exits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """ExcessMTL: weights that follow the exits' estimated excess risks.

  Each update estimates exit k's excess risk by a second-order expansion
  with an AdaGrad-like diagonal curvature, ``r_k = Σ_n g_kn² / √(S_kn +
  1e-7)`` with S the running sum of the squared gradients (the paper's
  Equations 6–7), divides it by a baseline (the first update's, or the
  warm-up's mean: the scale processing of its Section 3.2) and moves the
  weights by an exponentiated-gradient step, ``w ← softmax(log w + η r)``
  (Equation 9); the update is ``Σ_k w_k g_k``. During the ``n_warmup_steps``
  first updates the weights stay ``1/K`` while the baseline is gathered. As
  TorchJD's ``ExcessMTL``, weights start at ``1/K`` (the authors' code: 1).

  It reads every coordinate of the gradients, not only their Gram matrix,
  and its state holds S: K times the parameters' memory. The whole model is
  one group.

  Args:
    robust_step_size: η, ``> 0``.
    n_warmup_steps: updates that gather the baseline, ``≥ 0`` (the paper
      suggests three epochs); 0: the first update's risks.
    num_exits: K (required; see :func:`osgd_jax.osgd`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`ExcessMTLState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.excess_mtl(num_exits=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update({"w": jnp.eye(2)}, state, params)
    >>> bool(abs(float(state.weights.sum()) - 1) < 1e-6)
    True

  References:
    He, Huang, Yuan, Li & Zhou, *Robust Multi-Task Learning with Excess
    Risks*, ICML 2024. https://proceedings.mlr.press/v235/he24n.html
  """
  name = "excess_mtl"
  num_exits = aggregation.check_num_exits(num_exits, name)
  if (aggregation.is_checkable_number(robust_step_size)
      and not robust_step_size > 0):
    raise ValueError(
        f"{name}: robust_step_size must be > 0, got {robust_step_size!r}.")
  if (isinstance(n_warmup_steps, bool) or not isinstance(n_warmup_steps, int)
      or n_warmup_steps < 0):
    raise ValueError(
        f"{name}: n_warmup_steps must be an int >= 0, got {n_warmup_steps!r}."
        " Under optax.inject_hyperparams pass"
        " static_args=('n_warmup_steps',).")
  f32 = aggregation.DIAGNOSTICS_DTYPE

  def init_fn(params):
    k = num_exits
    zeros = jnp.zeros((k,), f32)
    return ExcessMTLState(
        weights=jnp.full((k,), 1.0 / k, f32), exit_norms=zeros,
        cosine=jnp.zeros((k, k), f32),
        # Shaped, and on a mesh split, like the stacked gradients.
        sq_grad_sum=jax.tree.map(
            lambda p: jnp.broadcast_to(jnp.zeros_like(p, f32)[None],
                                       (k,) + jnp.shape(p)), params),
        initial=zeros, warmup_sum=zeros, count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    with jax.named_scope(name):
      stacked = aggregation.read_stacked(updates, num_exits=num_exits,
                                         params=params, name=name)
      if stacked is None:
        return updates, state
      dtype = stacked.compute_dtype
      sq = [leaf.astype(dtype) ** 2 for leaf in stacked.leaves]
      sums = [s.astype(dtype) + q for s, q in
              zip(jax.tree.leaves(state.sq_grad_sum), sq)]
      risk = sum(jnp.sum(q / jnp.sqrt(s + 1e-7), axis=tuple(
          range(1, q.ndim))) for q, s in zip(sq, sums))
      count = state.count
      warming = count < n_warmup_steps
      first = count == n_warmup_steps
      warmup_sum = jnp.where(warming, state.warmup_sum + risk,
                             state.warmup_sum)
      if n_warmup_steps > 0:
        baseline = jnp.where(first, warmup_sum / n_warmup_steps,
                             state.initial)
        scaled = risk / (baseline + 1e-7)
      else:
        baseline = jnp.where(first, risk, state.initial)
        scaled = jnp.where(first, risk, risk / (baseline + 1e-7))
      weights = state.weights.astype(dtype)
      weights = jnp.where(
          warming, weights,
          jax.nn.softmax(jnp.log(weights) + robust_step_size * scaled))
      new_updates = aggregation.combine(stacked, weights[None], "global")
      exit_norms, cosine = gram_lib.gram_statistics(stacked.grams.sum(axis=0))
      new_state = ExcessMTLState(
          weights=weights.astype(f32), exit_norms=exit_norms.astype(f32),
          cosine=cosine.astype(f32),
          sq_grad_sum=jax.tree.unflatten(
              stacked.treedef, [s.astype(f32) for s in sums]),
          initial=jnp.where(warming, state.initial, baseline).astype(f32),
          warmup_sum=warmup_sum.astype(f32),
          count=optax.safe_increment(count))
      # A step with a NaN or Inf gradient leaves the running sums and
      # weights as they were, for optax.apply_if_finite after it.
      finite = aggregation.all_finite(stacked.leaves)
      kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                          new_state, state)
      return new_updates, kept._replace(exit_norms=new_state.exit_norms,
                                        cosine=new_state.cosine)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
