"""per_exit_cross_entropy: (K, B, C) logits and (B,) labels to (K,) losses.

Sequence logits (K, B, L, C) with (B, L) labels average over B and L.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpy_oracles as oracles
import pytest

from osgd_jax.losses import per_exit_cross_entropy


def reference(logits, labels):
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  picked = np.take_along_axis(np.asarray(logp), labels[None, :, None], -1)
  return -picked[..., 0].mean(axis=1)


@pytest.fixture(scope="module")
def data():
  logits = jax.random.normal(jax.random.key(0), (3, 5, 4)) * 2.0
  labels = jnp.array([0, 3, 1, 1, 2])
  return logits, labels


def test_mean_cross_entropy_per_exit(data):
  logits, labels = data
  losses = per_exit_cross_entropy(logits, labels)
  assert losses.shape == (3,) and losses.dtype == jnp.float32
  np.testing.assert_allclose(
    losses, reference(logits, np.asarray(labels)), rtol=1e-5
  )
  # Exits are independent: changing exit 2's logits moves only loss 2.
  bump = np.zeros(logits.shape, np.float32)
  bump[1, np.arange(5), np.asarray(labels)] = 1.0  # raise the true class
  moved = np.asarray(per_exit_cross_entropy(logits + bump, labels))
  np.testing.assert_array_equal(moved[[0, 2]], np.asarray(losses)[[0, 2]])
  assert moved[1] < losses[1]


def test_weights_scale_each_exit(data):
  logits, labels = data
  weights = jnp.array([1.0, 0.5, 0.0])
  np.testing.assert_allclose(
    per_exit_cross_entropy(logits, labels, weights),
    per_exit_cross_entropy(logits, labels) * weights,
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    per_exit_cross_entropy(logits, labels, [2.0, 2.0, 2.0]),
    2 * per_exit_cross_entropy(logits, labels),
    rtol=1e-6,
  )


def test_jit_and_per_exit_jacobian(data):
  logits, labels = data
  jac = jax.jit(jax.jacrev(per_exit_cross_entropy))(logits, labels)
  assert jac.shape == (3, 3, 5, 4)
  # Loss k depends on exit k's logits only.
  for k in range(3):
    for j in range(3):
      assert bool(jnp.any(jac[k, j] != 0)) == (k == j)


def test_bfloat16_logits_give_float32_losses(data):
  logits, labels = data
  losses = per_exit_cross_entropy(logits.astype(jnp.bfloat16), labels)
  assert losses.dtype == jnp.float32
  np.testing.assert_allclose(
    losses, per_exit_cross_entropy(logits, labels), rtol=2e-2
  )


@pytest.mark.parametrize(
  "logits_shape, labels, weights, match",
  [
    ((5, 4), np.zeros(5, int), None, r"shape \(K, batch, classes\)"),
    ((3, 5, 4), np.zeros(4, int), None, r"shape \(batch,\) = \(5,\)"),
    ((3, 5, 4), np.zeros((5, 4), int), None, "not one-hot"),
    ((3, 5, 4), np.zeros(5, np.float32), None, "integer class indices"),
    ((3, 5, 4), np.zeros(5, int), np.ones(2), r"shape \(K,\) = \(3,\)"),
    (
      (3, 5, 7, 4),
      np.zeros((5, 6), int),
      None,
      r"shape \(batch, seq, \.\.\.\) = \(5, 7\)",
    ),
  ],
)
def test_bad_shapes_raise(logits_shape, labels, weights, match):
  with pytest.raises(ValueError, match=match):
    per_exit_cross_entropy(jnp.zeros(logits_shape), labels, weights)


def test_sequence_logits_average_over_batch_and_positions():
  # A language model's exits: (K, batch, seq, vocab) logits, next tokens.
  logits = np.asarray(jax.random.normal(jax.random.key(1), (3, 2, 5, 11))) * 2
  labels = np.random.default_rng(0).integers(0, 11, size=(2, 5))
  losses = per_exit_cross_entropy(logits, labels)
  bits = oracles.bits_per_token(logits, labels)
  np.testing.assert_allclose(losses / np.log(2), bits, rtol=1e-5)
  # Exits are independent: raising exit 2's true-token logits moves loss 2.
  bump = np.zeros(logits.shape, np.float32)
  np.put_along_axis(bump[1], labels[..., None], 1.0, axis=-1)
  moved = np.asarray(per_exit_cross_entropy(logits + bump, labels))
  np.testing.assert_array_equal(moved[[0, 2]], np.asarray(losses)[[0, 2]])
  assert moved[1] < losses[1]


def test_integer_logits_raise():
  with pytest.raises(ValueError, match="floating point"):
    per_exit_cross_entropy(jnp.zeros((1, 2, 3), jnp.int32), jnp.zeros(2, int))
