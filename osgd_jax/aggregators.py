"""Baseline aggregators of per-exit gradients, with the same contract as ``osgd``.

Every transformation here takes the per-exit gradients stacked on a leading
axis (leaves ``(K, *param.shape)``, as :func:`osgd_jax.value_and_per_exit_grads`
returns them) and emits one param-shaped update, so each must come first in an
Optax chain, like :func:`osgd_jax.osgd`.

All of them are one algorithm with a different *weighting*: a function of the
K×K Gram matrix ``M = G Gᵀ`` (and of a small state and the update's extra
arguments) returning weights ``w`` (K,); the update is ``Σ_k w_k g_k``. The
Gram matrix costs one pass over the gradients and the weighted sum a second,
whatever K is; the K×K work is negligible. Every weighting runs under
``jax.jit`` with static shapes.

==============================  ===============================================
:func:`weighted_sum`            fixed or scheduled loss weights (MSDNet's
                                uniform sum, linear and geometric ramps, the
                                SDN ramp)
:func:`adaptive_loss_balancing` AdaLoss: ``w_k ∝ 1 / EMA(loss_k)``
:func:`pcgrad`                  PCGrad: project away conflicting gradients
:func:`mgda`                    MGDA: the min-norm point of the convex hull
:func:`upgrad`                  UPGrad: mean of the projections onto the dual
                                cone
==============================  ===============================================

``granularity="global"`` (the default here) computes one weight vector from
the Gram matrix of the whole flattened parameter vector, as the papers do;
``"leaf"`` computes weights per parameter tensor. Per leaf, an exit that does
not reach a tensor (its row is zero there) changes what MGDA and UPGrad do on
it: MGDA's hull then contains 0, so that tensor gets no update.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from osgd_jax import orthogonalize
from osgd_jax import transform

__all__ = [
    "AggregatorState",
    "WEIGHT_PRESETS",
    "adaptive_loss_balancing",
    "mgda",
    "pcgrad",
    "upgrad",
    "weighted_sum",
]

WEIGHT_PRESETS = ("uniform", "linear", "geometric", "sdn")


class AggregatorState(NamedTuple):
  """State of a baseline aggregator: diagnostics to log, and its own state.

  Attributes:
    weights: ``(K,)`` the weights ``w`` of the last update, ``u = Σ_k w_k g_k``
      (with ``granularity="leaf"``: their mean over leaves, weighted by size).
    exit_norms: ``(K,)`` norm of each exit's gradient over all parameters.
    cosine: ``(K, K)`` cosine similarity between exits' gradients, as in
      :class:`osgd_jax.OsgdState`.
    inner: the weighting's own state: a step count (:func:`weighted_sum`), a
      loss EMA (:func:`adaptive_loss_balancing`), a PRNG key's data
      (:func:`pcgrad`), or ``()``.
  """

  weights: jax.Array
  exit_norms: jax.Array
  cosine: jax.Array
  inner: Any


# ``(M (K, K), inner_state, extra_args) -> (w (K,), new_inner_state)``.
Weighting = Callable[[jax.Array, Any, Mapping[str, Any]], tuple[jax.Array, Any]]


def _check_num_exits(num_exits) -> None:
  if num_exits is not None and (
      not isinstance(num_exits, (int, np.integer)) or num_exits < 1):
    raise ValueError(
        f"num_exits must be a positive int, got {num_exits!r}. Under"
        " optax.inject_hyperparams pass static_args=('num_exits',).")


def _aggregator(
    weighting: Weighting,
    *,
    name: str,
    granularity: str,
    num_exits: int | None,
    init_inner: Callable[[], Any],
) -> optax.GradientTransformationExtraArgs:
  """Wraps a weighting into the generic factory of :mod:`osgd_jax.transform`.

  The weighting runs once per group (once, or once per leaf); its new inner
  state must not depend on the Gram matrix (a step count, a loss EMA, a key),
  so every group computes the same one and the first is kept.
  """
  _check_num_exits(num_exits)
  k0 = num_exits or 0

  def init() -> AggregatorState:
    return AggregatorState(
        weights=jnp.zeros((k0,), jnp.float32),
        exit_norms=jnp.zeros((k0,), jnp.float32),
        cosine=jnp.zeros((k0, k0), jnp.float32),
        inner=init_inner())

  def weighting_fn(gram, state, extra_args):
    return weighting(gram, state.inner, extra_args)

  def finish(aggregation: transform.Aggregation, state) -> AggregatorState:
    del state
    exit_norms, cosine = transform._gram_stats(  # pylint: disable=protected-access
        aggregation.grams, aggregation.sizes, aggregation.compute_dtype)
    weights = transform._group_mean(  # pylint: disable=protected-access
        aggregation.weights, aggregation.sizes)
    inner = jax.tree.map(lambda x: x[0], aggregation.group_outputs)
    as32 = lambda x: x.astype(jnp.float32)
    return AggregatorState(as32(weights), as32(exit_norms), as32(cosine), inner)

  return transform._aggregate(  # pylint: disable=protected-access
      weighting_fn, granularity, name=name, init=init, finish=finish,
      num_exits=num_exits)


# --- weighted sums -----------------------------------------------------------


def _preset_weights(preset: str, num_exits: int, count: jax.Array, *,
                    ratio: float, total_steps: int | None,
                    cap: float | Sequence[float]) -> jax.Array:
  k = num_exits
  index = jnp.arange(1, k + 1, dtype=jnp.float32)
  if preset == "uniform":
    return jnp.ones((k,), jnp.float32)
  if preset == "linear":
    return index * (k / index.sum())
  if preset == "geometric":
    ramp = jnp.asarray(ratio, jnp.float32) ** (index - 1)
    return ramp * (k / ramp.sum())
  # SDN: the final exit weighs 1; early exit k's weight rises linearly from
  # 0.01 with training progress until it reaches its cap.
  if k == 1:
    return jnp.ones((1,), jnp.float32)
  if isinstance(cap, (int, float)):
    caps = cap * index[:-1] / (k - 1)
  else:
    caps = jnp.asarray(cap, jnp.float32).reshape(-1)
    if caps.shape != (k - 1,):
      raise ValueError(
          f"weighted_sum('sdn') got {caps.shape[0]} caps but the gradients have"
          f" K={k} exits; pass K-1 caps (one per early exit) or one number.")
  progress = count.astype(jnp.float32) / total_steps
  early = jnp.minimum(caps, 0.01 + caps * progress)
  return jnp.concatenate([early, jnp.ones((1,), jnp.float32)])


def weighted_sum(
    weights: str | Sequence[float] | jax.Array | Callable[[jax.Array], jax.Array]
    = "uniform",
    *,
    total_steps: int | None = None,
    cap: float | Sequence[float] = 0.9,
    ratio: float = 2.0,
    granularity: str = "global",
    num_exits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """A fixed or scheduled weighted sum of the per-exit gradients.

  ``u = Σ_k w_k g_k``: the gradient of the weighted loss ``Σ_k w_k ℓ_k``, from
  the stacked per-exit gradients. With ``"uniform"`` weights it is the plain
  summed-loss baseline.

  Presets (by name; K comes from the gradients):

  * ``"uniform"``: ``w_k = 1``, MSDNet's summed loss (Huang et al., 2018).
  * ``"linear"``: ``w_k ∝ k``, later exits weigh more;
  * ``"geometric"``: ``w_k ∝ ratio**(k-1)``. Both ramps are normalised to
    ``Σ_k w_k = K``, the uniform sum's total, so a learning rate tuned for
    the plain sum stays in range.
  * ``"sdn"``: the Shallow-Deep Networks schedule (Kaya et al., 2019): the
    final exit weighs 1; early exit k (of K-1) has a cap
    ``c_k = cap · k / (K-1)`` (SDN's 0.15, 0.3, ..., 0.9 for six early exits
    with ``cap=0.9``) or ``cap[k-1]`` given K-1 caps, and weight
    ``min(c_k, 0.01 + c_k · step / total_steps)``. ``total_steps`` is then
    required.

  Invariances: linear in the gradients; a row scaled by ``c`` scales its
  contribution by ``c``.

  Args:
    weights: a preset name (above), a fixed ``(K,)`` vector, or a schedule:
      a function of the step count (an int32 scalar, 0 at the first update)
      returning a ``(K,)`` vector, traceable under ``jax.jit``.
    total_steps: training steps over which the ``"sdn"`` ramp rises.
    cap: the ``"sdn"`` caps: one number (the last early exit's cap; earlier
      exits' caps are proportional to their index) or K-1 numbers.
    ratio: the ``"geometric"`` ratio between consecutive exits.
    granularity: ``"global"`` or ``"leaf"``; a weighted sum is the same
      either way.
    num_exits: K, if known: fixes the state's shapes at ``init`` (needed by
      ``jax.lax.scan``) and is checked against the gradients.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`AggregatorState`; ``inner`` is the step count.

  Raises:
    ValueError: an unknown preset, ``"sdn"`` without ``total_steps``, or
      weights whose length is not K (at trace time).

  Example:
    >>> import jax.numpy as jnp, optax, osgd_jax
    >>> tx = optax.chain(osgd_jax.weighted_sum("sdn", total_steps=1000),
    ...                  optax.sgd(0.1, momentum=0.9))
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
  if isinstance(weights, str):
    if weights not in WEIGHT_PRESETS:
      raise ValueError(
          f"unknown weighted_sum preset {weights!r}; choose one of"
          f" {WEIGHT_PRESETS}, or pass a (K,) vector or a schedule.")
    if weights == "sdn":
      if total_steps is None or int(total_steps) < 1:
        raise ValueError(
            "weighted_sum('sdn') needs total_steps >= 1, the training steps"
            f" over which the early exits' weights rise; got {total_steps!r}.")
      if not np.all(np.asarray(cap, np.float64) >= 0):
        raise ValueError(f"weighted_sum('sdn') needs caps >= 0, got {cap!r}.")
    if weights == "geometric" and not ratio > 0:
      raise ValueError(f"the geometric ratio must be > 0, got {ratio!r}.")
    preset = weights
    schedule = lambda count, k: _preset_weights(
        preset, k, count, ratio=ratio, total_steps=total_steps, cap=cap)
  elif callable(weights):
    schedule = lambda count, k: weights(count)
  else:
    fixed = np.asarray(weights, np.float32)
    if fixed.ndim != 1 or fixed.size == 0 or not np.all(np.isfinite(fixed)):
      raise ValueError(
          "weighted_sum weights must be a preset name, a schedule, or a"
          f" non-empty 1-D vector of finite numbers; got {weights!r}.")
    if num_exits is not None and fixed.shape[0] != num_exits:
      raise ValueError(
          f"weighted_sum got {fixed.shape[0]} weights but num_exits={num_exits}.")
    schedule = lambda count, k: jnp.asarray(fixed)

  def weighting(gram, count, extra_args):
    del extra_args
    k = gram.shape[-1]
    w = jnp.asarray(schedule(count, k))
    if w.shape != (k,):
      raise ValueError(
          f"weighted_sum weights have shape {tuple(w.shape)} but the gradients"
          f" have K={k} exits; give one weight per exit, shape ({k},).")
    return w.astype(gram.dtype), optax.safe_increment(count)

  return _aggregator(
      weighting, name="weighted_sum", granularity=granularity,
      num_exits=num_exits, init_inner=lambda: jnp.zeros((), jnp.int32))


class AdaLossState(NamedTuple):
  """AdaLoss's inner state: the loss EMA and the number of updates so far."""

  ema: jax.Array
  count: jax.Array


def adaptive_loss_balancing(
    decay: float = 0.9,
    eps: float = 1e-8,
    *,
    granularity: str = "global",
    num_exits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """AdaLoss: weights inversely proportional to a running average of the losses.

  ``w_k = K · (1/ℓ̄_k) / Σ_j (1/ℓ̄_j)``, ``u = Σ_k w_k g_k``, where ``ℓ̄_k`` is an
  exponential moving average of exit k's loss, updated with this step's
  losses before the weights are formed (the first update sets it to the
  losses). This is Hu et al.'s balancing, whose weights ``1/ℓ̄_k`` make the
  update the gradient of ``Σ_k log ℓ_k`` when ``ℓ̄ = ℓ``. Assumptions: the
  weights are normalised to sum to K, the uniform sum's total; the average
  is an EMA with ``decay``.

  The losses reach the transformation as an extra argument of ``update``::

    updates, state = tx.update(grads, state, params, losses=losses)

  with ``losses`` the ``(K,)`` vector the gradients are of (the first output
  of :func:`osgd_jax.value_and_per_exit_grads`). ``optax.chain`` forwards it.

  Invariance: scaling exit k's loss (hence its gradient) by ``c_k > 0`` leaves
  the update's direction unchanged; its size changes by the factor
  ``Σ_j 1/ℓ̄_j / Σ_j 1/(c_j ℓ̄_j)`` of the normalisation.

  Args:
    decay: EMA decay of the losses, in [0, 1); 0 uses the current losses.
    eps: floor on ``ℓ̄_k``, so that a zero loss gives a finite weight.
    granularity: ``"global"`` or ``"leaf"``; the weights do not depend on
      the gradients, so both give the same update.
    num_exits: K, if known: fixes the state's shapes at ``init``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`AggregatorState`; ``inner`` is an :class:`AdaLossState`.

  Raises:
    ValueError: ``losses`` missing, or not of shape ``(K,)`` (at trace time).

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.adaptive_loss_balancing()
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> updates, state = tx.update({"w": jnp.ones((2, 3))}, state,
    ...                            losses=jnp.array([1.0, 3.0]))
    >>> state.weights.tolist()
    [1.5, 0.5]

  References:
    Hu, Dey, Hebert & Bagnell, *Learning Anytime Predictions in Neural Networks
    via Adaptive Loss Balancing*, AAAI 2019. https://arxiv.org/abs/1708.06832
  """
  if not 0 <= decay < 1:
    raise ValueError(f"decay must be in [0, 1), got {decay!r}.")
  if not eps > 0:
    raise ValueError(f"eps must be > 0, got {eps!r}.")
  k0 = num_exits or 0

  def weighting(gram, inner: AdaLossState, extra_args):
    k = gram.shape[-1]
    losses = extra_args.get("losses")
    if losses is None:
      raise ValueError(
          "adaptive_loss_balancing needs the per-exit losses: call"
          " tx.update(grads, state, params, losses=losses) with the (K,)"
          " losses the gradients are of.")
    if jnp.shape(losses) != (k,):
      raise ValueError(
          f"adaptive_loss_balancing got losses of shape {jnp.shape(losses)},"
          f" but the gradients have K={k} exits; pass the ({k},) vector of"
          " per-exit losses.")
    losses = jnp.asarray(losses).astype(jnp.float32)
    if inner.ema.shape != (k,):  # K was unknown at init: this is the first step
      ema = losses
    else:
      ema = jnp.where(inner.count == 0, losses,
                      decay * inner.ema + (1 - decay) * losses)
    inverse = 1.0 / jnp.maximum(ema, eps)
    w = k * inverse / inverse.sum()
    return w.astype(gram.dtype), AdaLossState(
        ema, optax.safe_increment(inner.count))

  return _aggregator(
      weighting, name="adaptive_loss_balancing", granularity=granularity,
      num_exits=num_exits,
      init_inner=lambda: AdaLossState(jnp.zeros((k0,), jnp.float32),
                                      jnp.zeros((), jnp.int32)))


# --- PCGrad ------------------------------------------------------------------


def _pcgrad_orders(key: jax.Array, num_exits: int) -> jax.Array:
  """``(K, K)``: row i is the random order in which task i visits the others.

  Sorting i.i.d. 32-bit random keys gives uniform permutations (ties, of
  probability ~K²/2³³, fall back to index order); one draw for all rows
  compiles much faster than K calls of ``jax.random.permutation``.
  """
  bits = jax.random.bits(key, (num_exits, num_exits), jnp.uint32)
  return jnp.argsort(bits, axis=-1).astype(jnp.int32)


def _pcgrad_weights(gram: jax.Array, orders: jax.Array) -> jax.Array:
  """PCGrad in the Gram basis: ``g_i^PC = Σ_m c_im g_m``, ``w = Σ_i c_i``.

  Every inner product PCGrad needs is ``⟨g_i^PC, g_j⟩ = Σ_m c_im M_mj``, so the
  projections are exact without touching the gradients.
  """
  k = gram.shape[-1]
  diag = jnp.diagonal(gram)
  inv_sq = orthogonalize.safe_inverse(diag)
  tasks = jnp.arange(k)

  def visit(position, coeff):
    j = orders[:, position]                        # task i's next other task
    dots = jnp.sum(coeff * gram[:, j].T, axis=-1)  # ⟨g_i^PC, g_j⟩, original g_j
    # The conflict test uses the current g_i^PC; a zero g_j never conflicts.
    conflict = (dots < 0) & (j != tasks)
    step = jnp.where(conflict, dots * inv_sq[j], 0.0)
    return coeff - step[:, None] * jax.nn.one_hot(j, k, dtype=gram.dtype)

  coeff = jax.lax.fori_loop(0, k, visit, jnp.eye(k, dtype=gram.dtype))
  return coeff.sum(axis=0)


def pcgrad(
    seed: int = 0,
    *,
    granularity: str = "global",
    num_exits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """PCGrad: "gradient surgery" that removes conflicting components.

  For every task (exit) i, starting from ``g_i^PC = g_i``, the other tasks j
  are visited in a random order; whenever ``⟨g_i^PC, g_j⟩ < 0`` the projection
  onto the normal plane of the *original* ``g_j`` is applied,
  ``g_i^PC ← g_i^PC − ⟨g_i^PC, g_j⟩ / ‖g_j‖² · g_j``. The update is
  ``Σ_i g_i^PC`` (Algorithm 1 of the paper). Everything is computed exactly
  from the K×K Gram matrix.

  The orders are drawn from a PRNG key that the state carries, split at every
  update, so a run is reproducible from ``seed``; under
  ``granularity="leaf"`` every leaf uses the same orders.

  Invariances: with K=2 and non-conflicting gradients the update is their
  sum; for given orders, scaling all gradients by ``c > 0`` scales the update
  by ``c``.

  Args:
    seed: seeds the orders.
    granularity: ``"global"`` (the paper's) or ``"leaf"``.
    num_exits: K, if known: fixes the state's shapes at ``init``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`AggregatorState`; ``inner`` is the key's data (uint32, for
    ``jax.random.wrap_key_data``), so it checkpoints like any array.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.pcgrad(seed=0)
    >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> updates["w"].tolist()   # g1^PC = (½, ½), g2^PC = (0, 1)
    [0.5, 1.5]

  References:
    Yu, Kumar, Gupta, Levine, Hausman & Finn, *Gradient Surgery for Multi-Task
    Learning*, NeurIPS 2020. https://arxiv.org/abs/2001.06782
  """
  seed = int(seed)

  def weighting(gram, key_data, extra_args):
    del extra_args
    key, subkey = jax.random.split(jax.random.wrap_key_data(key_data))
    orders = _pcgrad_orders(subkey, gram.shape[-1])
    return _pcgrad_weights(gram, orders), jax.random.key_data(key)

  return _aggregator(
      weighting, name="pcgrad", granularity=granularity, num_exits=num_exits,
      init_inner=lambda: jax.random.key_data(jax.random.key(seed)))


# --- MGDA and UPGrad: a small non-negative QP --------------------------------


def _nnqp(q: jax.Array, c: jax.Array, allowed: jax.Array, *, max_iter: int,
          tol: float) -> jax.Array:
  """Solves ``min_{x ≥ 0} ½ xᵀ q x + cᵀ x`` (q PSD), ``x_k = 0`` where not allowed.

  The Lawson–Hanson active-set method on the normal equations: exact after
  finitely many steps (about K), where projected-gradient or Frank–Wolfe
  iterations converge slowly on the ill-conditioned Grams that nearly
  collinear gradients give. Its two nested loops (add the variable with the
  most negative gradient; step back while the passive solution has
  non-positive entries) run as one ``while_loop`` with one linear solve per
  iteration, which compiles about twice as fast. An entering variable is kept
  only if the step it starts lowers the objective, so a numerically
  dependent one is refused rather than cycled on. ``tol`` is relative to the
  size of the terms of the gradient ``q x + c``, below which it is noise.
  """
  k = q.shape[-1]
  dtype = q.dtype
  eye = jnp.eye(k, dtype=dtype)
  objective = lambda x: 0.5 * x @ (q @ x) + c @ x

  def solve_on(passive):
    # The unconstrained minimiser over the passive set, zero elsewhere. The
    # system is symmetric positive definite while the passive columns are
    # independent, so Cholesky suffices (and compiles far faster than LU); a
    # numerically singular one gives non-finite values, which are refused.
    p = passive.astype(dtype)
    a = q * (p[:, None] * p[None, :]) + eye * (1.0 - p)
    return jax.scipy.linalg.cho_solve(
        jax.scipy.linalg.cho_factor(a, lower=True), -c * p) * p

  class Carry(NamedTuple):
    x: jax.Array          # current point: feasible, positive on `passive`
    passive: jax.Array
    s: jax.Array          # minimiser over `passive` (pending)
    base_x: jax.Array     # the point before `entering` entered
    base_passive: jax.Array
    entering: jax.Array   # one-hot, or all False
    refused: jax.Array
    it: jax.Array
    done: jax.Array

  def body(cr: Carry) -> Carry:
    finite = jnp.all(jnp.isfinite(cr.s))
    s = jnp.where(finite, cr.s, cr.base_x)
    stepping = finite & jnp.any(cr.passive & (s <= 0))

    # Inner step: move from x towards s until a passive variable hits zero.
    blocking = cr.passive & (s <= 0)
    # x − s > 0 where x > 0 ≥ s; the entering variable has x = 0 (ratio 0).
    ratio = jnp.where(blocking, cr.x / jnp.where(cr.x - s > 0, cr.x - s, 1.0),
                      jnp.inf)
    alpha = jnp.clip(jnp.min(ratio), 0.0, 1.0)
    inner_x = cr.x + alpha * (s - cr.x)
    inner_passive = cr.passive & ~(blocking & (ratio <= alpha))
    inner_x = jnp.where(inner_passive, inner_x, 0.0)

    # Outer step: s is positive on the passive set. Keep it if the entry
    # paid off, else go back and refuse the entering variable; then pick the
    # next variable to enter.
    pending = jnp.any(cr.entering)
    accept = finite & (~pending | (objective(s) < objective(cr.base_x)))
    x = jnp.where(accept, s, cr.base_x)
    passive = jnp.where(accept, cr.passive, cr.base_passive)
    # A refused variable may become useful once the passive set changes.
    refused = jnp.where(accept & pending, False, cr.refused | cr.entering)
    gradient = q @ x + c
    noise = jnp.abs(q) @ jnp.abs(x) + jnp.abs(c) + 1.0
    candidates = allowed & ~passive & ~refused & (-gradient > tol * noise)
    j = jnp.argmax(jnp.where(candidates, -gradient, -jnp.inf))
    entering = jax.nn.one_hot(j, k, dtype=jnp.bool_) & candidates

    new = Carry(
        x=jnp.where(stepping, inner_x, x),
        passive=jnp.where(stepping, inner_passive, passive | entering),
        s=cr.s,
        base_x=jnp.where(stepping, cr.base_x, x),
        base_passive=jnp.where(stepping, cr.base_passive, passive),
        entering=jnp.where(stepping, cr.entering, entering),
        refused=jnp.where(stepping, cr.refused, refused),
        it=cr.it + 1,
        done=~stepping & ~jnp.any(candidates))
    return new._replace(s=solve_on(new.passive))

  zeros = jnp.zeros((k,), dtype)
  none = jnp.zeros((k,), jnp.bool_)
  start = Carry(zeros, none, zeros, zeros, none, none, none,
                jnp.zeros((), jnp.int32), jnp.zeros((), jnp.bool_))
  final = jax.lax.while_loop(
      lambda cr: ~cr.done & (cr.it < max_iter), body, start)
  return final.x


DEFAULT_QP_TOL = 1e-6
SCALE_FLOOR = 1e-12


def _mgda_weights(gram: jax.Array, *, max_iter: int, tol: float) -> jax.Array:
  """The min-norm convex combination ``α`` of the rows, from their Gram matrix.

  ``min_{α ∈ simplex} αᵀ M α`` is solved as the non-negative least squares
  ``min_{u ≥ 0} ‖Gᵀu‖²/σ + (1ᵀu − 1)²``, i.e. ``½ uᵀ(M/σ + 11ᵀ)u − 1ᵀu``: its
  KKT conditions are MGDA's with ``α = u / 1ᵀu`` for any scale σ > 0, and
  unlike ``min ½ uᵀMu − 1ᵀu`` it stays bounded when 0 is in the hull. The
  scale matters in floating point: the ``11ᵀ`` term swamps Gram entries far
  below σ. A first solve with σ = max_k M_kk gives ‖d*‖², a second solve
  with σ ≈ ‖d*‖² (clipped to 1e-12 of max_k M_kk, so q stays finite) puts
  the rows that decide the answer at unit scale, e.g. gradients whose norms
  span 1e-8 to 1e8.
  """
  k = gram.shape[-1]
  if k == 1:  # the hull is the one row
    return jnp.ones((1,), gram.dtype)
  max_diag = jnp.max(jnp.diagonal(gram))
  ones = jnp.ones((k, k), gram.dtype)

  def solve(sigma):
    u = _nnqp(gram * orthogonalize.safe_inverse(sigma) + ones, -ones[0],
              jnp.ones((k,), jnp.bool_), max_iter=max_iter, tol=tol)
    alpha = u / jnp.sum(u)
    return alpha, alpha @ (gram @ alpha)

  def phase(_, carry):
    best, best_sq, sigma = carry
    alpha, norm_sq = solve(sigma)
    # Both solves give points of the hull; keep the shorter. When 0 is (nearly)
    # in the hull the second, at a tiny σ, is the worse conditioned one.
    better = norm_sq < best_sq
    best = jnp.where(better, alpha, best)
    best_sq = jnp.where(better, norm_sq, best_sq)
    return best, best_sq, jnp.clip(norm_sq, SCALE_FLOOR * max_diag, max_diag)

  # A loop rather than two calls: the solver is compiled once.
  alpha, _, _ = jax.lax.fori_loop(
      0, 2, phase, (jnp.full((k,), 1.0 / k, gram.dtype), jnp.inf, max_diag))
  return alpha


def _upgrad_weights(gram: jax.Array, *, max_iter: int, tol: float) -> jax.Array:
  """UPGrad's weights: the mean of every row's projection onto the dual cone.

  The projection of ``g_i`` onto ``{v : G v ≥ 0}`` is ``g_i + Gᵀλ`` with
  ``λ = argmin_{λ ≥ 0} ½ λᵀMλ + λᵀ M e_i`` (the Lagrangian dual). Solved in
  the equilibrated basis ``ĝ_k = g_k / ‖g_k‖`` (Gram C, unit diagonal), which
  makes it independent of the rows' scales; zero rows constrain nothing.
  """
  k = gram.shape[-1]
  if k == 1:  # a row lies in its own dual cone
    return jnp.ones((1,), gram.dtype)
  diag = jnp.diagonal(gram)
  norms = jnp.sqrt(diag)
  inv_norms = orthogonalize.safe_inverse(norms)
  corr = gram * inv_norms[:, None] * inv_norms[None, :]
  nonzero = diag > 0
  # Row i of corr is C e_i, the linear term of row i's dual problem.
  mu = jax.vmap(lambda ci: _nnqp(corr, ci, nonzero, max_iter=max_iter,
                                 tol=tol))(corr)
  # v_i = ‖g_i‖ (ĝ_i + Σ_k μ_ik ĝ_k) = g_i + Σ_k μ_ik ‖g_i‖/‖g_k‖ g_k.
  lam = mu * norms[:, None] * inv_norms[None, :]
  return (1.0 + lam.sum(axis=0)) / k


def _check_qp_options(max_iter, tol) -> None:
  if not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
    raise ValueError(f"max_iter must be a positive int, got {max_iter!r}.")
  if not 0 <= tol < 1:
    raise ValueError(f"tol must be in [0, 1), got {tol!r}.")


def mgda(
    *,
    granularity: str = "global",
    max_iter: int = 100,
    tol: float = DEFAULT_QP_TOL,
    num_exits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """MGDA: the minimum-norm point of the convex hull of the exits' gradients.

  ``u = Σ_k α_k g_k`` with ``α = argmin_{α ≥ 0, Σα = 1} ‖Σ_k α_k g_k‖²``, the
  common descent direction of the multiple-gradient descent algorithm in the
  form of Sener & Koltun (2018), who solve this QP on the K×K Gram matrix by
  Frank–Wolfe. Here it is solved exactly by an active-set method (see
  ``_mgda_weights``), under ``jax.jit``. No rescaling: u is the min-norm point
  itself, a convex combination, so its size is that of one gradient, not of
  their sum (raise the learning rate by up to K against a summed loss).
  u = 0 when 0 is in the hull (Pareto-stationary point).

  Properties: non-conflicting, ``⟨g_k, u⟩ ≥ ‖u‖² ≥ 0`` for every k;
  invariant to the exits' order; positively homogeneous (scaling all
  gradients by ``c > 0`` scales u by c); K=1 is the identity.

  Args:
    granularity: ``"global"`` (the paper's) or ``"leaf"``.
    max_iter: cap on active-set iterations (about K are needed).
    tol: relative tolerance of the optimality test.
    num_exits: K, if known: fixes the state's shapes at ``init``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`AggregatorState` (``weights`` is α).

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.mgda()
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]
    [0.5, 0.5]

  References:
    Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*,
    NeurIPS 2018. https://arxiv.org/abs/1810.04650
    Désidéri, *Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization*, Comptes Rendus Mathématique 350, 2012.
  """
  _check_qp_options(max_iter, tol)

  def weighting(gram, inner, extra_args):
    del extra_args
    return _mgda_weights(gram, max_iter=max_iter, tol=tol), inner

  return _aggregator(weighting, name="mgda", granularity=granularity,
                     num_exits=num_exits, init_inner=tuple)


def upgrad(
    *,
    granularity: str = "global",
    max_iter: int = 100,
    tol: float = DEFAULT_QP_TOL,
    num_exits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """UPGrad: the mean of the gradients' projections onto their dual cone.

  Every gradient g_i is projected onto the dual cone of all of them,
  ``{v : ⟨v, g_j⟩ ≥ 0 for all j}`` (the directions that conflict with no
  exit), and the projections are averaged:
  ``u = (1/K) Σ_i argmin_{v : Gv ≥ 0} ‖v − g_i‖``. Each projection is
  ``g_i + Σ_j λ_ij g_j`` with ``λ_i ≥ 0`` solving the dual
  ``min_{λ ≥ 0} ½ λᵀMλ + λᵀ M e_i``, a K-variable QP on the Gram matrix
  solved exactly by an active-set method under ``jax.jit``. This is TorchJD's
  recommended aggregator with uniform preference, without its regularisation
  of M.

  Properties (TorchJD's): non-conflicting (``⟨g_j, u⟩ ≥ 0`` for every j, since
  the cone is convex); linear under scaling (for ``c > 0``,
  ``u(diag(c) G) = (1/K) Σ_i c_i v_i`` is linear in c, as scaling a row does
  not change the cone); invariant to the exits' order; non-conflicting
  gradients are averaged unchanged; K=1 is the identity. The update is a
  mean: its size is that of one gradient, not of their sum.

  Args:
    granularity: ``"global"`` (TorchJD's) or ``"leaf"``.
    max_iter: cap on active-set iterations per projection.
    tol: relative tolerance of the optimality test.
    num_exits: K, if known: fixes the state's shapes at ``init``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`AggregatorState`.

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = osgd_jax.upgrad()
    >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> updates, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> [round(v, 4) for v in updates["w"].tolist()]   # mean of (½, ½), (0, 1)
    [0.25, 0.75]

  References:
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024.
    https://arxiv.org/abs/2406.16232 (TorchJD: https://github.com/TorchJD/torchjd)
  """
  _check_qp_options(max_iter, tol)

  def weighting(gram, inner, extra_args):
    del extra_args
    return _upgrad_weights(gram, max_iter=max_iter, tol=tol), inner

  return _aggregator(weighting, name="upgrad", granularity=granularity,
                     num_exits=num_exits, init_inner=tuple)
