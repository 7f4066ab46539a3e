"""A late switch from an aggregator to the plain sum of the exits' gradients.

The paper trains with OSGD throughout and leaves a switch to plain SGD late
in training open; :func:`switch_to_sum` is that switch, for any aggregator
(``docs/design.md``, "The maths": options where the paper is silent).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from osgd_jax.aggregation import _checks, _engine, _stateful


class SwitchToSumState(NamedTuple):
  """The state of :func:`switch_to_sum`.

  Attributes:
    count: int32 scalar, the number of updates so far.
    inner: the aggregator's state; it stays as it was from the switch on.
  """

  count: jax.Array
  inner: optax.OptState


def switch_to_sum(
  aggregator: optax.GradientTransformation,
  after_steps: int | jax.Array,
) -> optax.GradientTransformationExtraArgs:
  """``aggregator`` for the first ``after_steps`` updates, then the plain sum.

  The sum over the leading K axis of the stacked gradients is the gradient
  of the summed (weighted) exit losses, so from update ``after_steps`` on
  the chain that follows trains as plain SGD would. Momentum carries across
  the switch. Both branches are compiled into one program and
  ``jax.lax.cond`` picks one at run time, so the state keeps its structure
  and the switch works under ``jit``, ``lax.scan`` and
  ``optax.inject_hyperparams`` (where ``after_steps`` is an array).

  Args:
    aggregator: a transformation of stacked per-exit gradients, such as
      :func:`~osgd_jax.aggregation.osgd`; its updates must have the sum's
      shapes and dtypes.
    after_steps: the number of updates made with ``aggregator``; an int
      >= 0 (0 sums from the first update) or an integer array.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SwitchToSumState`; extra keyword arguments reach
    ``aggregator``.

  Raises:
    ValueError: ``after_steps`` is a number but not an integer in
      [0, 2**31 - 1].

  Example:
    >>> import jax.numpy as jnp, osgd_jax
    >>> tx = switch_to_sum(osgd_jax.osgd(num_exits=2), after_steps=1)
    >>> grads = {"w": jnp.array([[1.0, 0.0], [1.0, 1.0]])}  # (K, 2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> projected, state = tx.update(grads, state)
    >>> summed, state = tx.update(grads, state)
    >>> projected["w"].tolist(), summed["w"].tolist()
    ([1.0, 1.0], [2.0, 1.0])
  """
  # The step count is int32: a larger after_steps would overflow there.
  if _checks.is_checkable_number(after_steps) and not (
    0 <= after_steps <= _checks.INT32_MAX and float(after_steps).is_integer()
  ):
    raise ValueError(
      f"switch_to_sum: after_steps must be an integer >= 0 (at most"
      f" 2**31 - 1), got {after_steps!r}."
    )

  def init_fn(params):
    return SwitchToSumState(
      count=jnp.zeros([], jnp.int32), inner=aggregator.init(params)
    )

  def update_fn(updates, state, params=None, **extra_args):
    def aggregate():
      return aggregator.update(updates, state.inner, params, **extra_args)

    def summed():
      return _engine.sum_exits(updates), state.inner

    new_updates, inner = jax.lax.cond(
      state.count < after_steps, aggregate, summed
    )
    return new_updates, SwitchToSumState(
      _stateful.next_count(state.count), inner
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
