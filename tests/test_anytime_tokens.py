"""Per-token metrics of sequence models: bits per token and CALM's exit rule.

Everything is checked against float64 NumPy references that walk the
tokens one at a time (tests/numpy_oracles.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpy_oracles as oracles
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from osgd_jax import anytime

THRESHOLDS = [0.0, 0.2, 0.4, 0.6, 0.8, 0.95, 1.01]


class ToySequenceModel(nnx.Module):
  """K exits over embedded tokens: (B, L) int tokens -> (K, B, L, V)."""

  def __init__(self, vocab: int, width: int, num_exits: int, rngs: nnx.Rngs):
    self.num_exits = num_exits
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.heads = nnx.List(
      [nnx.Linear(width, vocab, rngs=rngs) for _ in range(num_exits)]
    )

  def predict(self, x):
    h = self.embed(x)
    # Exit k sharpens with k, so that the thresholds split the tokens.
    return jnp.stack([(k + 1) * head(h) for k, head in enumerate(self.heads)])


@pytest.fixture(scope="module")
def toy():
  model = ToySequenceModel(vocab=7, width=5, num_exits=3, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x = rng.integers(0, 7, size=(7, 4)).astype(np.int32)
  y = rng.integers(0, 7, size=(7, 4)).astype(np.int32)
  return model, x, y


def _random_logits(seed, shape, scale=3.0):
  return np.asarray(jax.random.normal(jax.random.key(seed), shape)) * scale


def test_token_early_exit_matches_the_oracle():
  logits = _random_logits(0, (3, 2, 5, 7))
  labels = np.random.default_rng(1).integers(0, 7, size=(2, 5))
  flops = np.array([10.0, 25.0, 70.0])
  result = anytime.token_early_exit(logits, labels, THRESHOLDS, flops=flops)
  expected = oracles.token_early_exit(logits, labels, THRESHOLDS, flops)
  np.testing.assert_array_equal(result.exit_counts, expected["counts"])
  np.testing.assert_allclose(result.mean_exit, expected["mean_exit"])
  np.testing.assert_allclose(result.mean_flops, expected["mean_flops"])
  np.testing.assert_allclose(result.bits, expected["bits"], rtol=1e-5)
  np.testing.assert_allclose(result.loss, result.bits * math.log(2))
  np.testing.assert_allclose(result.accuracy, expected["accuracy"])
  np.testing.assert_array_equal(result.threshold, THRESHOLDS)
  # The sweep runs from exit 1 for every token to the last for every token.
  assert result.mean_exit[0] == 1.0 and result.mean_exit[-1] == 3.0
  assert 1.0 < result.mean_exit[3] < 3.0


@settings(max_examples=15, deadline=None)
@given(
  seed=st.integers(0, 2**16),
  thresholds=st.lists(st.floats(0.0, 1.2), min_size=1, max_size=5),
)
def test_higher_thresholds_never_exit_earlier(seed, thresholds):
  thresholds = sorted(thresholds)
  logits = _random_logits(seed, (4, 3, 6, 5))
  labels = np.zeros((3, 6), np.int32)
  result = anytime.token_early_exit(logits, labels, thresholds)
  assert np.all(np.diff(result.mean_exit) >= 0)
  assert np.all(result.exit_counts.sum(1) == 18)
  assert np.all(np.isnan(result.mean_flops))  # no FLOPs were given


def test_one_label_per_example_works_too():
  logits = _random_logits(2, (2, 9, 4))
  labels = np.arange(9) % 4
  result = anytime.token_early_exit(logits, labels, [0.5], flops=[1.0, 2.0])
  expected = oracles.token_early_exit(logits, labels, [0.5], [1.0, 2.0])
  np.testing.assert_allclose(result.bits, expected["bits"], rtol=1e-5)


def test_evaluate_gives_bits_per_token_of_every_exit(toy):
  model, x, y = toy
  metrics = anytime.evaluate(model, x, y, batch_size=3)  # a padded tail
  logits = np.asarray(model.predict(x))
  np.testing.assert_allclose(
    metrics.loss / math.log(2), oracles.bits_per_token(logits, y), rtol=1e-6
  )
  np.testing.assert_allclose(
    metrics.accuracy, (logits.argmax(-1) == y).mean(axis=(1, 2))
  )


def test_curve_over_batches_equals_the_oracle_on_all_logits(toy):
  model, x, y = toy
  flops = np.array([1.0, 2.0, 4.0])
  curve = anytime.token_early_exit_curve(
    model, x, y, THRESHOLDS, flops=flops, batch_size=3
  )
  expected = oracles.token_early_exit(
    np.asarray(model.predict(x)), y, THRESHOLDS, flops
  )
  np.testing.assert_array_equal(curve.exit_counts, expected["counts"])
  np.testing.assert_allclose(curve.mean_flops, expected["mean_flops"])
  np.testing.assert_allclose(curve.bits, expected["bits"], rtol=1e-5)
  np.testing.assert_allclose(curve.accuracy, expected["accuracy"])


@pytest.mark.parametrize(
  "logits_shape, labels_shape, thresholds, flops, match",
  [
    ((2, 3, 4, 5), (3, 5), [0.5], None, r"labels \(3, 5\)"),
    ((2, 3, 4, 5), (3, 4), [-0.1], None, "numbers >= 0"),
    ((2, 3, 4, 5), (3, 4), [], None, "non-empty"),
    ((2, 3, 4, 5), (3, 4), [0.5], [1.0], r"shape \(K,\) = \(2,\)"),
  ],
)
def test_token_early_exit_errors(
  logits_shape, labels_shape, thresholds, flops, match
):
  with pytest.raises(ValueError, match=match):
    anytime.token_early_exit(
      np.zeros(logits_shape, np.float32),
      np.zeros(labels_shape, np.int32),
      thresholds,
      flops=flops,
    )


def test_float_labels_are_refused():
  with pytest.raises(ValueError, match="integer class indices"):
    anytime.token_early_exit(np.zeros((1, 2, 3)), np.zeros(2), [0.5])


def test_curve_errors(toy):
  model, x, y = toy
  with pytest.raises(ValueError, match="label per position"):
    anytime.token_early_exit_curve(model, x, y[:, 0], [0.5], flops=[1, 2, 3])
  with pytest.raises(ValueError, match=r"y must have shape \(7,\)"):
    anytime.token_early_exit_curve(model, x, y[:3], [0.5], flops=[1, 2, 3])
  with pytest.raises(ValueError, match=r"y must have shape \(7,\)"):
    anytime.evaluate(model, x, y[:, :2])
