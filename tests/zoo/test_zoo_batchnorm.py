"""BatchNorm: train mode updates the running statistics, eval mode uses them."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from osgd_jax import zoo


def stats(model: nnx.Module) -> list[np.ndarray]:
  return [np.array(a) for a in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]


@nnx.jit
def forward(model, x):
  return model(x)


@nnx.jit
def predict(model, x):
  return model.predict(x)


@pytest.fixture(scope="module")
def setup():
  model = zoo.create(
    "nested-width-mlp",
    rngs=nnx.Rngs(0),
    stages=3,
    width=4,
    depth=1,
    norm="batch",
  )
  x = jax.random.normal(jax.random.key(0), (4, 64)) * 3.0 + 1.0
  return model, x


def test_train_mode_updates_running_statistics_under_nnx_jit(setup):
  model, x = setup
  model = nnx.clone(model)
  before = stats(model)
  assert len(before) == 2 * 3 * 3  # (mean, var) x 3 norms x 3 stages
  forward(model, x)
  after = stats(model)
  assert all(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
  # Momentum 0.9 towards the batch statistics: the stem's running mean.
  h = model.stages[0].stem.linear(x)
  np.testing.assert_allclose(
    model.stages[0].stem.norm.mean[...], 0.1 * h.mean(0), rtol=1e-4, atol=1e-6
  )


def test_eval_mode_uses_and_keeps_running_statistics(setup):
  model, x = setup
  model = nnx.clone(model)
  forward(model, x)  # some non-trivial statistics
  train_out = forward(nnx.clone(model), x)
  model.eval()
  before = stats(model)
  out = forward(model, x)
  for a, b in zip(before, stats(model), strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(out, train_out)
  # Each example is normalised with the stored statistics, not the batch's:
  # changing example 1 leaves example 0's logits alone (not so in train mode).
  other = x.at[1].set(-x[1])
  np.testing.assert_allclose(
    forward(model, other)[:, 0], out[:, 0], rtol=1e-5, atol=1e-6
  )
  model.train()
  train_other = forward(nnx.clone(model), other)
  assert not np.allclose(train_other[:, 0], train_out[:, 0])
  model.eval()
  # And the stored statistics matter.
  model.stages[0].stem.norm.mean[...] += 1.0
  assert not np.allclose(forward(model, x), out)


def test_predict_uses_running_statistics_without_changing_the_model(setup):
  model, x = setup
  model = nnx.clone(model)
  forward(model, x)
  before = stats(model)
  out = predict(model, x)
  for a, b in zip(before, stats(model), strict=True):
    np.testing.assert_array_equal(a, b)
  assert model.stages[0].stem.norm.use_running_average is False  # still train
  eval_model = nnx.clone(model)
  eval_model.eval()
  np.testing.assert_allclose(out, forward(eval_model, x), rtol=1e-6)
