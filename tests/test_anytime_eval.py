"""Per-exit evaluation, confidence-based early exit and budgeted prediction."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from osgd_jax import anytime, zoo


@pytest.fixture(scope="module")
def model():
  m = zoo.create("nested-width-mlp", rngs=nnx.Rngs(0), stages=3, width=4)
  m.eval()
  return m


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  return (
    rng.normal(size=(37, 64)).astype(np.float32),
    rng.integers(0, 10, size=37),
  )


def test_evaluate_matches_direct_computation(model, batch):
  x, y = batch
  metrics = anytime.evaluate(model, x, y, batch_size=16)  # padded tail batch
  logits = np.asarray(model(x), np.float64)
  np.testing.assert_allclose(metrics.accuracy, (logits.argmax(-1) == y).mean(1))
  log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  expected = -log_probs[:, np.arange(len(y)), y].mean(1)
  np.testing.assert_allclose(metrics.loss, expected, rtol=1e-5)


def test_early_exit_extremes_and_flops(model, batch):
  x, _ = batch
  flops = anytime.flops_per_exit(model, (1, 64)).flops
  first = anytime.early_exit(model, x, threshold=0.0)
  assert np.all(first.exit_used == 1)
  np.testing.assert_allclose(first.mean_flops, flops[0])
  np.testing.assert_array_equal(
    first.predictions, np.asarray(model(x, upto=1))[0].argmax(-1)
  )
  last = anytime.early_exit(model, x, threshold=1.01)
  assert np.all(last.exit_used == 3)
  np.testing.assert_allclose(last.mean_flops, flops[-1])
  np.testing.assert_array_equal(
    last.predictions, np.asarray(model(x))[-1].argmax(-1)
  )


def test_early_exit_picks_first_confident_exit(model, batch):
  x, _ = batch
  probs = np.asarray(jax.nn.softmax(model(x), axis=-1)).max(-1)  # (K, B)
  threshold = float(np.median(probs))
  result = anytime.early_exit(model, x, threshold)
  flops = anytime.flops_per_exit(model, (1, 64)).flops
  for b in range(len(x)):
    confident = np.nonzero(probs[:, b] >= threshold)[0]
    expected = confident[0] + 1 if confident.size else 3
    assert result.exit_used[b] == expected
  np.testing.assert_allclose(
    result.mean_flops, flops[result.exit_used - 1].mean()
  )


def test_curve_spans_cheapest_to_full(model, batch):
  x, y = batch
  flops, accuracy = anytime.early_exit_curve(model, x, y, [0.0, 0.5, 2.0])
  full = anytime.flops_per_exit(model, (1, 64)).flops
  np.testing.assert_allclose(flops[[0, -1]], full[[0, -1]])
  metrics = anytime.evaluate(model, x, y)
  np.testing.assert_allclose(accuracy[[0, -1]], metrics.accuracy[[0, -1]])


def test_predict_within_budget(model, batch):
  x, _ = batch
  flops = anytime.flops_per_exit(model, (1, 64)).flops
  logits, k = anytime.predict_within(model, x, flops_budget=flops[1] * 1.01)
  assert k == 2
  np.testing.assert_allclose(logits, np.asarray(model(x))[1], rtol=1e-6)
  assert anytime.predict_within(model, x, flops_budget=1e30)[1] == 3
  with pytest.raises(ValueError, match="below exit 1's cost"):
    anytime.predict_within(model, x, flops_budget=flops[0] / 2)


def test_bad_inputs(model, batch):
  x, y = batch
  with pytest.raises(ValueError, match="y must have shape"):
    anytime.evaluate(model, x, y[:-1])
  with pytest.raises(ValueError, match="threshold must be >= 0"):
    anytime.early_exit(model, x, -0.5)
