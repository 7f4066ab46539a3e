"""switch_to_sum: any aggregator handed over to the plain sum late on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import osgd_jax


def test_switch_to_sum_keeps_the_aggregator_state_after_the_switch():
  tx = osgd_jax.switch_to_sum(osgd_jax.osgd(num_exits=2), after_steps=1)
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.array([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0]])}
  state = tx.init(params)
  assert isinstance(state, osgd_jax.SwitchToSumState)
  _, state = tx.update(grads, state)
  frozen = state.inner
  updates, state = tx.update({"w": 3 * grads["w"]}, state)
  np.testing.assert_array_equal(updates["w"], [6.0, 6.0, 0.0])
  # The diagnostics are the last projection's, from before the switch:
  # g2's part along g1 removed, u = g1 + (g2 - g1) = g2.
  jax.tree.map(np.testing.assert_array_equal, state.inner, frozen)
  np.testing.assert_allclose(state.inner.weights, [0.0, 1.0])


def test_switch_to_sum_moves_with_an_injected_step_count():
  tx = optax.inject_hyperparams(osgd_jax.osgd_sgd, static_args=("num_exits",))(
    learning_rate=1.0, momentum=None, num_exits=2, sgd_after=100
  )
  params = {"w": jnp.zeros(2)}
  grads = {"w": jnp.array([[1.0, 0.0], [1.0, 1.0]])}
  state = tx.init(params)
  update = jax.jit(tx.update)  # the switch is in the state: one compile
  projected, state = update(grads, state, params)
  np.testing.assert_allclose(projected["w"], [-1.0, -1.0])
  state.hyperparams["sgd_after"] = jnp.asarray(0)  # switch now
  summed, state = update(grads, state, params)
  np.testing.assert_allclose(summed["w"], [-2.0, -1.0])


@pytest.mark.parametrize("after_steps", [-1, 1.5, float("nan")])
def test_switch_to_sum_refuses_a_step_count_that_is_not_a_count(after_steps):
  with pytest.raises(
    ValueError, match="switch_to_sum: after_steps must be an integer >= 0"
  ):
    osgd_jax.switch_to_sum(osgd_jax.osgd(num_exits=2), after_steps)
