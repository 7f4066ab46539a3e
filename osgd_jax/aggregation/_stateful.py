"""The states that several weightings share: step counts, keys, simplex points.

A weighting that needs a step count, a PRNG key or its previous weights
keeps them in the Optax state through a
:class:`~osgd_jax.aggregation.StatefulWeighting`; the helpers here build the
common ones, so that every method keeps them the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from osgd_jax.aggregation._engine import StatefulWeighting


def next_count(count: jax.Array) -> jax.Array:
  """``count + 1``, saturating at its dtype's largest value, as Optax counts.

  Example:
    >>> import jax.numpy as jnp
    >>> int(next_count(jnp.zeros((), jnp.int32)))
    1
  """
  return jnp.asarray(optax.safe_increment(count))


def counting(
  schedule: Callable[[jax.Array, jax.Array], jax.Array],
) -> StatefulWeighting:
  """A weighting ``schedule(gram, step)`` whose state counts the updates.

  Example:
    >>> import jax.numpy as jnp
    >>> ramp = counting(lambda gram, step: jnp.full(2, step + 1.0))
    >>> ramp.apply(jnp.eye(2), ramp.init(2))[0].tolist()
    [1.0, 1.0]
  """

  def apply(gram, count, **extra_args):
    del extra_args
    return schedule(gram, count), next_count(count)

  return StatefulWeighting(
    init=lambda num_exits: jnp.zeros((), jnp.int32), apply=apply
  )


class KeyState(NamedTuple):
  """The weighting state of a random weighting: its PRNG key.

  Attributes:
    key_data: the raw data (uint32) of the PRNG key that draws the next
      random numbers (``jax.random.wrap_key_data`` turns it into a key); raw
      data, so that it checkpoints like any array.
  """

  key_data: jax.Array


def seed_key_data(seed: int) -> jax.Array:
  """The raw data of the PRNG key of ``seed``, as states keep it."""
  return jax.random.key_data(jax.random.key(seed))


def split_key_data(key_data: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(next_key_data, subkey)``: the state's key split, one half to use."""
  key, subkey = jax.random.split(jax.random.wrap_key_data(key_data))
  return jax.random.key_data(key), subkey


def keyed(draw: Callable[..., jax.Array], seed: int) -> StatefulWeighting:
  """A random weighting whose PRNG key the Optax state carries.

  Args:
    draw: a weighting ``draw(gram, key=...)``.
    seed: the seed of the first key.

  Returns:
    A :class:`~osgd_jax.aggregation.StatefulWeighting` whose state is a
    :class:`KeyState`; each step splits the key and passes one half to
    ``draw``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> w = keyed(lambda gram, key: jax.random.uniform(key, (2,)), seed=0)
    >>> w.apply(jnp.eye(2), w.init(2))[0].shape
    (2,)
  """

  def apply(gram, state: KeyState, **extra_args):
    del extra_args
    key_data, subkey = split_key_data(state.key_data)
    return draw(gram, key=subkey), KeyState(key_data)

  return StatefulWeighting(lambda k: KeyState(seed_key_data(seed)), apply)


def visiting_orders(key: jax.Array, num_exits: int) -> jax.Array:
  """``(K, K)``: row i is the random order in which task i visits the others.

  PCGrad's and GradVac's orders. Sorting i.i.d. 32-bit random keys gives
  uniform permutations (ties, of probability about K²/2³³, fall back to
  index order); one draw for all rows compiles much faster than K calls of
  ``jax.random.permutation``.

  Example:
    >>> import jax
    >>> sorted(visiting_orders(jax.random.key(0), 3)[0].tolist())
    [0, 1, 2]
  """
  bits = jax.random.bits(key, (num_exits, num_exits), jnp.uint32)
  return jnp.argsort(bits, axis=-1).astype(jnp.int32)


class SimplexState(NamedTuple):
  """The weights a MoDo or SDMGrad step starts from.

  Attributes:
    iterate: ``(K,)`` on the simplex, ``1/K`` at ``init`` (not named
      ``weights``, which names the applied weights in every state).
  """

  iterate: jax.Array


def simplex_iteration(
  step: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
) -> StatefulWeighting:
  """A weighting that moves a point of the simplex at every update.

  Args:
    step: ``step(gram, previous) -> (weights, new_iterate)``.

  Returns:
    A :class:`~osgd_jax.aggregation.StatefulWeighting` whose state is a
    :class:`SimplexState`, ``1/K`` at ``init``.

  Example:
    >>> import jax.numpy as jnp
    >>> w = simplex_iteration(lambda gram, previous: (previous, previous))
    >>> w.apply(jnp.eye(2), w.init(2))[0].tolist()
    [0.5, 0.5]
  """

  def init(k: int) -> SimplexState:
    return SimplexState(jnp.full((k,), 1.0 / k, jnp.float32))

  def apply(gram, state: SimplexState, **extra_args: Any):
    del extra_args
    weights, iterate = step(gram, state.iterate.astype(gram.dtype))
    return weights, SimplexState(iterate)

  return StatefulWeighting(init, apply)
