"""The weighted sum and its presets against their definitions and TorchJD.

Fixed weights, the presets (sum, mean, linear, geometric, SDN) and
schedules, as a transformation against a float64 NumPy oracle and as
weightings of the Gram matrix; TorchJD's Mean, Sum and Constant against its
stored outputs (tests/golden/torchjd_golden.json); and the options'
errors.
"""

from __future__ import annotations

import functools

import gram_cases
import jax.numpy as jnp
import numpy as np
import numpy_oracles as oracles
import pytest
import stacked_cases
from hypothesis import given, settings
from hypothesis import strategies as st

import osgd_jax
from osgd_jax import aggregation, weightings

PARAMS = stacked_cases.PARAMS

# name in tests/golden/torchjd_golden.json -> (weighting, keyword arguments,
# float64 oracle of the direction).
VARIANTS = {
  "mean": (weightings.mean, {}, lambda g: g.mean(axis=0)),
  "sum": (weightings.uniform, {}, None),
  "constant": (
    weightings.constant,
    {"weights": (1.0, 0.5, 2.0, -1.0)},
    lambda g: np.asarray([1.0, 0.5, 2.0, -1.0]) @ g,
  ),
}


# --- against the oracles ------------------------------------------------------


@pytest.mark.parametrize("granularity", ["global", "leaf"])
def test_matches_float64_oracle(granularity):
  grads = stacked_cases.stacked(0, stacked_cases.mixed_scale)
  w = np.array([1.0, 0.5, 2.0, 0.0, -1.0, 3.0], np.float32)
  tx = aggregation.weighted_sum(w, granularity=granularity)
  out, state = tx.update(grads, tx.init(PARAMS))  # eager: nothing to compile
  expected = oracles.aggregate(
    stacked_cases.leaves(grads), lambda rows: w @ rows, granularity
  )
  stacked_cases.assert_close(out, expected, grads, granularity, rtol=1e-6)
  np.testing.assert_allclose(state.weights, w, rtol=1e-6)


def test_weighted_sum_presets_and_schedules():
  grads = {"w": np.arange(12, dtype=np.float32).reshape(4, 3)}

  def weights_over(tx, steps):
    # Eager: cheaper than compiling one program per preset.
    update, state, seen = tx.update, tx.init(None), []
    for _ in range(steps):
      _, state = update(grads, state)
      seen.append(np.asarray(state.weights))
    return np.stack(seen)

  k = np.arange(1, 5)
  ws = functools.partial(aggregation.weighted_sum, num_exits=4)
  np.testing.assert_allclose(weights_over(ws(), 1)[0], 1)
  np.testing.assert_allclose(
    weights_over(ws("linear"), 1)[0], 4 * k / k.sum(), rtol=1e-6
  )
  np.testing.assert_allclose(
    weights_over(ws("geometric", ratio=3.0), 1)[0],
    4 * 3.0 ** (k - 1) / (3.0 ** (k - 1)).sum(),
    rtol=1e-6,
  )
  sdn = weights_over(ws("sdn", total_steps=4, cap=0.9), 6)
  np.testing.assert_allclose(
    sdn, [oracles.sdn_weights(4, t, 4, 0.9) for t in range(6)], rtol=1e-6
  )

  def schedule(count):
    return jnp.array([1.0, count, 2.0, 0.0])

  np.testing.assert_allclose(weights_over(ws(schedule), 3)[:, 1], [0, 1, 2])
  # The uniform sum is the plain sum of the rows.
  tx = ws()
  out, _ = tx.update(grads, tx.init(None))
  np.testing.assert_allclose(out["w"], grads["w"].sum(0))


def test_presets_match_their_definitions():
  k = gram_cases.K
  gram = jnp.eye(k)
  index = np.arange(1, k + 1)
  np.testing.assert_allclose(weightings.uniform(gram), np.ones(k))
  np.testing.assert_allclose(
    weightings.linear(gram), k * index / index.sum(), rtol=1e-6
  )
  ramp = 3.0 ** (index - 1)
  np.testing.assert_allclose(
    weightings.geometric(gram, ratio=3.0), k * ramp / ramp.sum(), rtol=1e-6
  )
  for step in (0, 3, 10):
    np.testing.assert_allclose(
      weightings.sdn(gram, progress=step / 10, cap=0.9),
      oracles.sdn_weights(k, step, 10, 0.9),
      rtol=1e-6,
    )
  np.testing.assert_allclose(
    weightings.sdn(gram, progress=1.0, cap=[0.1, 0.2, 0.3]),
    [0.1, 0.2, 0.3, 1.0],
    rtol=1e-6,
  )


@pytest.mark.parametrize(
  "name, case",
  [
    (name, case)
    for name in ("constant", "mean")
    for case in sorted(gram_cases.CASES)
  ],
)
def test_mean_and_constant_match_float64_oracle(name, case):
  rows = gram_cases.case_rows(case)
  weighting, options, oracle = VARIANTS[name]
  gram_cases.assert_close(
    gram_cases.direction(weighting, rows, **options), oracle(rows), rows, 1e-9
  )


def test_mean_sum_and_constant_are_weighted_sum_presets():
  g = {"w": jnp.asarray([[1.0, 2.0], [3.0, 6.0]])}
  params = {"w": jnp.zeros(2)}
  for weights, want in (
    ("mean", [2.0, 4.0]),
    ("sum", [4.0, 8.0]),
    ([0.5, -1.0], [-2.5, -5.0]),
  ):
    tx = osgd_jax.weighted_sum(weights, num_exits=2)
    np.testing.assert_allclose(tx.update(g, tx.init(params))[0]["w"], want)


def test_weights_are_in_the_gram_matrix_dtype():
  gram = jnp.eye(3, dtype=jnp.float32)
  for weighting in (
    weightings.uniform,
    weightings.linear,
    weightings.geometric,
  ):
    assert weighting(gram).dtype == jnp.float32, weighting.__name__
  assert weightings.sdn(gram, progress=0.5).dtype == jnp.float32


# --- against TorchJD ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matches_torchjd(name):
  weighting, options, _ = VARIANTS[name]
  gram_cases.assert_matches_torchjd(name, weighting, options, rtol=1e-9)


# --- properties ---------------------------------------------------------------


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(-8, 8), st.booleans())
def test_outputs_are_finite(seed, exp, zero_row):
  grads = stacked_cases.random_tree(seed, exp, zero_row)
  assert np.all(np.isfinite(stacked_cases.update("weighted_sum", grads)))


def test_single_exit_is_the_identity():
  stacked_cases.assert_single_exit_is_the_identity("weighted_sum")


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: aggregation.weighted_sum("cubic"), "unknown weighted_sum preset"),
    (lambda: aggregation.weighted_sum("sdn"), "needs total_steps"),
    (lambda: aggregation.weighted_sum([[1.0]]), "1-D vector"),
    (lambda: aggregation.weighted_sum([1.0, 2.0], num_exits=3), "num_exits=3"),
    (lambda: aggregation.weighted_sum(), r"weighted_sum needs num_exits=K"),
  ],
)
def test_bad_options(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_shape_errors_at_update():
  """The errors name the number of exits each shape needs."""
  grads = {"w": jnp.ones((3, 2))}
  with pytest.raises(
    ValueError,
    match=r"K=3 exits but weighted_sum was built"
    r" with num_exits=2 .*If these are unstacked gradients, stack",
  ):
    tx = aggregation.weighted_sum([1.0, 2.0])
    tx.update(grads, tx.init(None))
  with pytest.raises(ValueError, match=r"2 caps.*K=4"):
    tx = aggregation.weighted_sum(
      "sdn", total_steps=5, cap=[0.1, 0.2], num_exits=4
    )
    tx.update({"w": jnp.ones((4, 2))}, tx.init(None))
  with pytest.raises(
    ValueError,
    match=r"schedule returned weights of shape"
    r" \(2,\).*K=3",
  ):
    tx = aggregation.weighted_sum(lambda step: jnp.ones(2), num_exits=3)
    tx.update(grads, tx.init(None))


def test_weighting_errors_name_the_shape_k_needs():
  with pytest.raises(ValueError, match=r"2 caps.*K=4.*K-1 caps"):
    weightings.sdn(jnp.eye(4), progress=0.5, cap=[0.1, 0.2])
  with pytest.raises(ValueError, match=r"shape \(3,\).*K=2"):
    weightings.constant(jnp.eye(2), weights=[1.0, 2.0, 3.0])
