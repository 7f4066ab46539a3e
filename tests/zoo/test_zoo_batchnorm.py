"""BatchNorm: train mode updates the running statistics, eval mode uses them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from osgd_jax import zoo
from osgd_jax.zoo import blocks
from osgd_jax.zoo.batch_norm import BatchNorm


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


# The zoo's BatchNorm (osgd_jax/zoo/batch_norm.py) against flax's: the same
# outputs, statistics and dtypes, bit for bit; (shape, feature axis, input
# dtype, flax's fast variance).
FLAX_CASES = [
  ((8, 5), -1, np.float32, True),
  ((4, 6, 6, 3), -1, np.float32, True),
  ((4, 6, 3), -1, jnp.bfloat16, True),
  ((8, 5), -1, np.float32, False),
  ((4, 3, 6), 1, np.float32, True),
]


def _pair(features, **kwargs):
  made = [
    cls(features, momentum=0.9, rngs=nnx.Rngs(0), **kwargs)
    for cls in (nnx.BatchNorm, BatchNorm)
  ]
  for norm in made:  # non-trivial scale and bias
    norm.scale[...] = 1.0 + 0.1 * jnp.arange(features, dtype=jnp.float32)
    norm.bias[...] = 0.05 * jnp.arange(features, dtype=jnp.float32)
  return made


@pytest.mark.parametrize("shape, axis, dtype, fast", FLAX_CASES)
def test_zoo_batchnorm_is_flax_batchnorm_bit_for_bit(shape, axis, dtype, fast):
  x = (np.random.default_rng(0).normal(size=shape) * 3 + 1).astype(dtype)
  flax_norm, zoo_norm = _pair(shape[axis], axis=axis, use_fast_variance=fast)
  step = nnx.jit(lambda norm, x: norm(x))
  for _ in range(2):  # the second step starts from updated statistics
    for call in (step, lambda norm, x: norm(x)):  # traced and eager
      want, got = call(flax_norm, x), call(zoo_norm, x)
      assert got.dtype == want.dtype and got.shape == want.shape
      np.testing.assert_array_equal(np.float32(got), np.float32(want))
      for name in ("mean", "var"):
        want_stat, got_stat = getattr(flax_norm, name), getattr(zoo_norm, name)
        assert type(got_stat) is nnx.BatchStat  # nnx.bridge's "batch_stats"
        assert got_stat[...].dtype == want_stat[...].dtype
        np.testing.assert_array_equal(got_stat[...], want_stat[...])


def test_zoo_batchnorm_train_step_matches_a_float64_oracle():
  x = np.random.default_rng(1).normal(size=(16, 4, 3)) * 2 + 0.5
  norm = _pair(3)[1]
  scale, bias = np.float64(norm.scale[...]), np.float64(norm.bias[...])
  y = nnx.jit(lambda norm, x: norm(x))(norm, np.float32(x))
  mean, var = x.mean((0, 1)), x.var((0, 1))
  want = (x - mean) / np.sqrt(var + norm.epsilon) * scale + bias
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(norm.mean[...], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(norm.var[...], 0.9 + 0.1 * var, rtol=1e-5)


def test_zoo_batchnorm_hands_other_modes_to_flax():
  x = np.random.default_rng(2).normal(size=(8, 5)).astype(np.float32)
  mask = np.arange(8)[:, None] % 3 != 0
  flax_norm, zoo_norm = _pair(5)
  for kwargs in ({"mask": mask}, {"use_running_average": True}):
    np.testing.assert_array_equal(zoo_norm(x, **kwargs), flax_norm(x, **kwargs))
    np.testing.assert_array_equal(zoo_norm.mean[...], flax_norm.mean[...])
  unset = BatchNorm(5, rngs=nnx.Rngs(0))
  unset.use_running_average = None
  with pytest.raises(ValueError, match="use_running_average"):
    unset(x)


def test_tracing_a_zoo_train_step_never_asks_a_tracer_for_its_sharding(
  monkeypatch,
):
  # JAX composes the error for a tracer's missing sharding by searching the
  # program traced so far; flax's BatchNorm asks for the old and the new
  # value of both statistics of every layer, which made tracing quadratic in
  # depth. The zoo's never asks.
  asked = []

  def sharding(tracer):
    asked.append(type(tracer).__name__)
    raise AttributeError("a tracer has no sharding")

  x = np.ones((4, 64), np.float32)
  for norm_class in (nnx.BatchNorm, BatchNorm):
    monkeypatch.setattr(blocks, "BatchNorm", norm_class)
    model = zoo.create(
      "nested-depth-mlp", rngs=nnx.Rngs(0), stages=3, width=4, depth=1
    )
    norms = [m for _, m in nnx.iter_modules(model) if type(m) is norm_class]
    assert len(norms) == 9
    with monkeypatch.context() as patch:
      patch.setattr(jax.core.Tracer, "sharding", property(sharding))
      asked.clear()
      nnx.jit(lambda m, x: m(x))(model, x)
    want = 4 * len(norms) if norm_class is nnx.BatchNorm else 0
    assert len(asked) == want, (norm_class, asked)
