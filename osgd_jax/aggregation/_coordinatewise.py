"""The engine of the aggregators combining gradients coordinate by coordinate.

TrimmedMean and GradDrop are no weighting of the Gram matrix: they combine
the exits' values of every coordinate, leaf by leaf. Their ``weights``
diagnostic is each exit's mean multiplier over the coordinates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from osgd_jax.aggregation import _checks, _engine, _stateful


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


def coordinatewise(
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
  num_exits = _checks.check_num_exits(num_exits, name)

  def init_fn(params):
    del params
    k = num_exits
    key_data = () if seed is None else _stateful.seed_key_data(seed)
    zeros = jnp.zeros((k,), _engine.DIAGNOSTICS_DTYPE)
    return CoordinateState(
      zeros, zeros, jnp.zeros((k, k), _engine.DIAGNOSTICS_DTYPE), key_data
    )

  def apply_fn(stacked, state, **extra_args):
    del extra_args
    key_data = state.key_data
    # A step with a NaN or Inf gradient keeps the key, as every
    # aggregator keeps its state, for optax.apply_if_finite after it.
    finite = _engine.all_finite(stacked.leaves)
    if seed is not None:
      next_key_data, subkey = _stateful.split_key_data(key_data)
      key_data = jnp.where(finite, next_key_data, key_data)
    outs = []
    multipliers = jnp.zeros((num_exits,), stacked.compute_dtype)
    for i, leaf in enumerate(stacked.leaves):
      leaf_key = None if seed is None else jax.random.fold_in(subkey, i)
      leaf = leaf.astype(stacked.compute_dtype)
      out, summed = combine(leaf, leaf_key)
      # A non-finite gradient is not hidden (GradDrop's mask would drop
      # it): its coordinates' update is non-finite too.
      out = jnp.where(
        jnp.all(jnp.isfinite(leaf), axis=0), out, leaf.sum(axis=0)
      )
      outs.append(out.astype(stacked.leaves[i].dtype))
      multipliers = multipliers + summed
    weights = multipliers / max(sum(stacked.sizes), 1)
    return (
      jax.tree.unflatten(stacked.treedef, outs),
      CoordinateState(
        _engine.as_diagnostic(weights),
        *_engine.gram_diagnostics(stacked),
        key_data,
      ),
    )

  return _engine.stacked_transformation(
    init_fn, apply_fn, num_exits=num_exits, name=name
  )
