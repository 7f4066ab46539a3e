"""TorchJD 0.18's aggregators that read every coordinate, as Optax transforms.

TrimmedMean, GradDrop and ExcessMTL are no weighting of the Gram matrix:
they combine the exits' gradients coordinate by coordinate (or keep a
running sum per coordinate), so they are transforms only, on the same
contract as :func:`osgd_jax.osgd`. Their ``weights`` diagnostic is each
exit's mean multiplier over the coordinates.

================================  ===============================================
:func:`trimmed_mean`              TrimmedMean: per coordinate, without extremes
:func:`graddrop`                  GradDrop: per coordinate, one sign kept at
                                  random
:func:`excess_mtl`                ExcessMTL: weights following excess-risk
                                  estimates
================================  ===============================================
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from osgd_jax import aggregation
from osgd_jax import gram as gram_lib

__all__ = [
    "CoordinateState",
    "ExcessMTLState",
    "excess_mtl",
    "graddrop",
    "trimmed_mean",
]


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
