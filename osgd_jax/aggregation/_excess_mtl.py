"""ExcessMTL: weights that follow the exits' estimated excess risks."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from osgd_jax.aggregation import _checks, _engine, _registry, _stateful


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
  num_exits: int | None = None,
  *,
  robust_step_size: float = 1.0,
  n_warmup_steps: int = 0,
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
  num_exits = _checks.check_num_exits(num_exits, name)
  _checks.check_positive(robust_step_size, "robust_step_size", name)
  _checks.check_count(n_warmup_steps, "n_warmup_steps", name)
  f32 = _engine.DIAGNOSTICS_DTYPE

  def init_fn(params):
    k = num_exits
    zeros = jnp.zeros((k,), f32)
    return ExcessMTLState(
      weights=jnp.full((k,), 1.0 / k, f32),
      exit_norms=zeros,
      cosine=jnp.zeros((k, k), f32),
      # Shaped, and on a mesh split, like the stacked gradients.
      sq_grad_sum=jax.tree.map(
        lambda p: jnp.broadcast_to(
          jnp.zeros_like(p, f32)[None], (k,) + jnp.shape(p)
        ),
        params,
      ),
      initial=zeros,
      warmup_sum=zeros,
      count=jnp.zeros((), jnp.int32),
    )

  def apply_fn(stacked, state, **extra_args):
    del extra_args
    dtype = stacked.compute_dtype
    sq = [leaf.astype(dtype) ** 2 for leaf in stacked.leaves]
    sums = [
      s.astype(dtype) + q
      for s, q in zip(jax.tree.leaves(state.sq_grad_sum), sq, strict=True)
    ]
    risk = sum(
      jnp.sum(q / jnp.sqrt(s + 1e-7), axis=tuple(range(1, q.ndim)))
      for q, s in zip(sq, sums, strict=True)
    )
    count = state.count
    warming = count < n_warmup_steps
    first = count == n_warmup_steps
    warmup_sum = jnp.where(warming, state.warmup_sum + risk, state.warmup_sum)
    if n_warmup_steps > 0:
      baseline = jnp.where(first, warmup_sum / n_warmup_steps, state.initial)
      scaled = risk / (baseline + 1e-7)
    else:
      baseline = jnp.where(first, risk, state.initial)
      scaled = jnp.where(first, risk, risk / (baseline + 1e-7))
    weights = state.weights.astype(dtype)
    weights = jnp.where(
      warming,
      weights,
      jax.nn.softmax(jnp.log(weights) + robust_step_size * scaled),
    )
    new_updates = _engine.combine(stacked, weights[None], "global")
    exit_norms, cosine = _engine.gram_diagnostics(stacked)
    new_state = ExcessMTLState(
      weights=weights.astype(f32),
      exit_norms=exit_norms,
      cosine=cosine,
      sq_grad_sum=jax.tree.unflatten(
        stacked.treedef, [s.astype(f32) for s in sums]
      ),
      initial=jnp.where(warming, state.initial, baseline).astype(f32),
      warmup_sum=warmup_sum.astype(f32),
      count=_stateful.next_count(count),
    )
    # A step with a NaN or Inf gradient leaves the running sums and
    # weights as they were, for optax.apply_if_finite after it.
    finite = _engine.all_finite(stacked.leaves)
    kept = _engine.keep_if_finite(finite, new_state, state)
    return new_updates, kept._replace(
      exit_norms=new_state.exit_norms, cosine=new_state.cosine
    )

  return _engine.stacked_transformation(
    init_fn, apply_fn, num_exits=num_exits, name=name
  )


_registry.register("excess-mtl", excess_mtl)
