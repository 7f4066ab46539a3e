"""OSGD in Optax and Flax NNX pipelines, and a small end-to-end training run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tiny_anytime import TwoExitNet

import osgd_jax


def _init_mlp(key, sizes=(8, 16, 16), num_exits=3, classes=4):
  """A tiny 3-exit network: a chain of dense layers with a head after each."""
  keys = iter(jax.random.split(key, 2 * num_exits))

  def dense(k, i, o):
    return {
      "w": jax.random.normal(k, (i, o)) / np.sqrt(i),
      "b": jnp.zeros(o),
    }

  dims = [sizes[0]] + [sizes[1]] * num_exits
  return {
    "trunk": [
      dense(next(keys), dims[i], dims[i + 1]) for i in range(num_exits)
    ],
    "heads": [
      dense(next(keys), dims[i + 1], classes) for i in range(num_exits)
    ],
  }


def _exit_losses(params, x, y):
  h, losses = x, []
  for layer, head in zip(params["trunk"], params["heads"], strict=True):
    h = jnp.tanh(h @ layer["w"] + layer["b"])
    logits = h @ head["w"] + head["b"]
    losses.append(
      optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    )
  return jnp.stack(losses)


def _task(seed=0, n=256):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 8)).astype(np.float32)
  w = rng.normal(size=(8, 4))
  y = np.argmax(x @ w + 0.3 * rng.normal(size=(n, 4)), axis=1)
  return jnp.asarray(x), jnp.asarray(y)


per_exit = osgd_jax.value_and_per_exit_grads(_exit_losses)


def _train(tx, steps, params=None):
  x, y = _task()
  params = _init_mlp(jax.random.key(0)) if params is None else params
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    losses, grads = per_exit(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, losses

  first = None
  for _ in range(steps):
    params, state, losses = step(params, state)
    first = losses if first is None else first
  return first, _exit_losses(params, x, y), state


def test_osgd_training_lowers_every_exit_loss():
  tx = osgd_jax.osgd_sgd(
    learning_rate=0.05, momentum=0.9, weight_decay=1e-4, num_exits=3
  )
  first, last, state = _train(tx, steps=300)
  assert np.all(np.asarray(last) < 0.5 * np.asarray(first)), (first, last)
  diagnostics = state[0]
  assert diagnostics.cosine.shape == (3, 3)
  np.testing.assert_allclose(jnp.diag(diagnostics.cosine), 1.0, rtol=1e-5)


@pytest.mark.parametrize("method", ["gram", "sequential"])
@pytest.mark.parametrize("granularity", ["leaf", "global"])
def test_chain_with_schedule_and_momentum(method, granularity):
  tx = optax.chain(
    osgd_jax.osgd(method=method, granularity=granularity, num_exits=3),
    optax.add_decayed_weights(5e-4),
    optax.sgd(optax.cosine_decay_schedule(0.05, 50), momentum=0.9),
  )
  first, last, _ = _train(tx, steps=50)
  assert np.all(np.asarray(last) < np.asarray(first))


def test_inject_hyperparams_changes_learning_rate_in_state():
  tx = optax.inject_hyperparams(osgd_jax.osgd_sgd, static_args=("num_exits",))(
    learning_rate=0.05, momentum=0.9, num_exits=3
  )
  params = _init_mlp(jax.random.key(0))
  state = tx.init(params)
  x, y = _task()
  _, grads = per_exit(params, x, y)
  update = jax.jit(tx.update)
  u1, state = update(grads, state, params)
  state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  u0, _ = update(
    grads, tx.init(params)._replace(hyperparams={**state.hyperparams}), params
  )
  assert float(jnp.abs(u1["trunk"][0]["w"]).max()) > 0
  np.testing.assert_array_equal(u0["trunk"][0]["w"], 0.0)


def test_apply_if_finite_after_osgd_skips_non_finite_steps():
  tx = optax.chain(
    osgd_jax.osgd(num_exits=2),
    optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=2),
  )
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  bad = {"w": jnp.array([[1.0, jnp.nan, 0.0], [0.0, 1.0, 1.0]])}
  updates, state = jax.jit(tx.update)(bad, state, params)
  np.testing.assert_array_equal(updates["w"], 0.0)
  assert int(state[1].total_notfinite) == 1
  good = {"w": jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])}
  updates, state = jax.jit(tx.update)(good, state, params)
  np.testing.assert_allclose(updates["w"], [-0.1, -0.1, -0.1])


def test_scan_over_steps_with_fixed_state_shapes():
  # num_exits fixes the state shapes at init, as lax.scan requires.
  tx = optax.chain(osgd_jax.osgd(num_exits=3), optax.sgd(0.05, momentum=0.9))
  x, y = _task()
  params = _init_mlp(jax.random.key(0))

  def step(carry, _):
    params, state = carry
    losses, grads = per_exit(params, x, y)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), losses

  _, losses = jax.jit(lambda c: jax.lax.scan(step, c, length=40))(
    (params, tx.init(params))
  )
  assert np.all(np.asarray(losses[-1]) < np.asarray(losses[0]))


def test_nnx_optimizer_with_split_merge():
  model = TwoExitNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
    model, osgd_jax.osgd_sgd(0.05, num_exits=2), wrt=nnx.Param
  )
  x, y = _task()

  def exit_losses(params, graphdef, rest):
    logits = nnx.merge(graphdef, params, rest)(x)
    labels = jnp.broadcast_to(y, logits.shape[:-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(
      -1
    )

  @nnx.jit
  def train_step(model, optimizer):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    losses, grads = osgd_jax.value_and_per_exit_grads(exit_losses)(
      params, graphdef, rest
    )
    optimizer.update(model, grads)
    return losses

  first = train_step(model, optimizer)
  for _ in range(60):
    last = train_step(model, optimizer)
  assert np.all(np.asarray(last) < np.asarray(first))
  # head2 is not reached by exit 1: its exit-1 rows were degenerate.
  assert float(optimizer.opt_state[0].degenerate_fraction[0]) > 0


def test_error_names_leaf_inside_nnx_state():
  model = TwoExitNet(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(lambda p: jnp.stack([p, p]), params)
  grads["head2"]["kernel"] = jnp.ones((2, 16, 5))
  tx = osgd_jax.osgd(num_exits=2)
  with pytest.raises(ValueError, match=r"head2.*kernel"):
    tx.update(grads, tx.init(params), params)
