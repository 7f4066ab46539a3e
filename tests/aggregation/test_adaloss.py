"""AdaLoss against a float64 NumPy oracle, its properties and its errors.

``w_k ∝ 1 / EMA(loss_k)``, normalised to sum to K: the transformation over
a history of losses and the weighting are compared with
tests/numpy_oracles.py; the invariance to each exit's loss scale is checked
with hypothesis.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpy_oracles as oracles
import pytest
import stacked_cases
from hypothesis import given, settings
from hypothesis import strategies as st

from osgd_jax import aggregation, weightings

K = stacked_cases.K
PARAMS = stacked_cases.PARAMS
few = settings(max_examples=6, deadline=None)
seeds = st.integers(0, 2**31 - 1)
exponents = st.floats(-8, 8)


# --- against the oracles ------------------------------------------------------


@pytest.mark.parametrize("granularity", ["global", "leaf"])
def test_matches_float64_oracle(granularity):
  grads = stacked_cases.stacked(0, stacked_cases.mixed_scale)
  history = np.array(
    [
      [2.0, 1.0, 0.5, 0.5, 4.0, 1.0],
      [1.0, 1.0, 0.2, 0.4, 3.0, 0.0],
      [0.5, 2.0, 0.1, 0.3, 3.5, 0.5],
    ],
    np.float32,
  )
  tx = aggregation.adaptive_loss_balancing(
    decay=0.8, granularity=granularity, num_exits=K
  )
  update = tx.update
  state = tx.init(PARAMS)
  for losses in history:
    out, state = update(grads, state, losses=losses)
  w = oracles.adaloss_weights(history, decay=0.8)
  np.testing.assert_allclose(state.weights, w, rtol=1e-5)
  expected = oracles.aggregate(
    stacked_cases.leaves(grads), lambda rows: w @ rows, granularity
  )
  stacked_cases.assert_close(out, expected, grads, granularity, rtol=1e-5)


def test_adaloss_is_inverse_losses_normalised_to_k():
  k = 4
  losses = np.array([2.0, 1.0, 0.5, 0.0])
  inverse = 1 / np.maximum(losses, 1e-3)
  np.testing.assert_allclose(
    weightings.adaloss(jnp.eye(k), losses=jnp.asarray(losses), eps=1e-3),
    k * inverse / inverse.sum(),
    rtol=1e-6,
  )


# --- properties ---------------------------------------------------------------


@few
@given(seeds, exponents, st.booleans())
def test_outputs_are_finite(seed, exp, zero_row):
  stacked_cases.assert_outputs_are_finite("adaloss", seed, exp, zero_row)


@few
@given(seeds, exponents)
def test_adaloss_ignores_per_exit_loss_scale(seed, exp):
  grads = stacked_cases.random_tree(seed, exp)
  rng = np.random.default_rng(seed)
  losses = rng.uniform(0.1, 3, size=K).astype(np.float32)
  c = (10.0 ** rng.uniform(-3, 3, size=K)).astype(np.float32)
  scaled = {
    n: g * c.reshape((K,) + (1,) * (g.ndim - 1)) for n, g in grads.items()
  }
  # Only the normalisation Σ_j 1/ℓ_j sees the scales.
  ratio = np.sum(1 / losses) / np.sum(1 / (losses * c))
  np.testing.assert_allclose(
    stacked_cases.update("adaloss", scaled, losses * c),
    ratio * stacked_cases.update("adaloss", grads, losses),
    rtol=1e-4,
    atol=1e-5 * K * ratio * np.abs(stacked_cases.global_rows(grads)).max(),
  )


def test_single_exit_is_the_identity():
  stacked_cases.assert_single_exit_is_the_identity(
    "adaloss", losses=np.ones(1, np.float32)
  )


# --- errors -------------------------------------------------------------------


def test_adaloss_errors_name_the_missing_or_misshapen_losses():
  tx = aggregation.adaptive_loss_balancing(num_exits=3)
  grads = {"w": jnp.ones((3, 2))}
  with pytest.raises(
    ValueError, match=r"needs the per-exit losses.*losses=losses"
  ):
    tx.update(grads, tx.init(None))
  with pytest.raises(ValueError, match=r"shape \(2,\).*K=3"):
    tx.update(grads, tx.init(None), losses=jnp.ones(2))


def test_weighting_error_names_the_shape_k_needs():
  with pytest.raises(ValueError, match=r"shape \(3,\).*K=4.*\(4,\) vector"):
    weightings.adaloss(jnp.eye(4), losses=jnp.ones(3))


@pytest.mark.parametrize(
  "make, match",
  [
    (
      lambda: aggregation.adaptive_loss_balancing(decay=1.0, num_exits=2),
      r"adaptive_loss_balancing: decay must be in \[0, 1\)",
    ),
    (
      lambda: aggregation.adaptive_loss_balancing(),
      r"adaptive_loss_balancing needs num_exits=K",
    ),
  ],
)
def test_bad_options(make, match):
  with pytest.raises(ValueError, match=match):
    make()
