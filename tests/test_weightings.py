"""The public weightings, as pure functions, against float64 NumPy oracles.

Each weighting maps a Gram matrix M = G Gᵀ to weights w; the oracles of
tests/numpy_oracles.py work on the gradient rows G themselves, so the test
compares wᵀG with the oracle's direction. Run under x64 so that the
comparison is of the algorithms, not of float32 rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_oracles as oracles
from osgd_jax import weightings
from osgd_jax.aggregation import _stateful
from osgd_jax.orthogonalize import DEFAULT_TOL

K, N = 4, 12


def _rows(seed):
  rng = np.random.default_rng(seed)
  rows = rng.normal(size=(K, N))
  rows[1] -= 1.2 * rows[0]          # conflicting
  rows[3] = 0.5 * rows[0] + rows[2]  # in the span of earlier rows
  return rows


def _direction(weighting, rows, **kwargs):
  with jax.enable_x64(True):
    gram = jnp.asarray(rows @ rows.T, jnp.float64)
    weights = np.asarray(jax.jit(functools.partial(weighting, **kwargs))(gram))
  assert weights.shape == (len(rows),)
  return weights @ rows


@pytest.mark.parametrize("order", [None, (2, 0, 3, 1)])
def test_osgd_is_gram_schmidt_then_the_sum(order):
  rows = _rows(0)
  want = oracles.gram_schmidt_components(rows, DEFAULT_TOL, order).sum(axis=0)
  np.testing.assert_allclose(_direction(weightings.osgd, rows, order=order),
                             want, atol=1e-9)


def test_presets_match_their_definitions():
  gram = jnp.eye(K)
  index = np.arange(1, K + 1)
  np.testing.assert_allclose(weightings.uniform(gram), np.ones(K))
  np.testing.assert_allclose(weightings.linear(gram), K * index / index.sum(),
                             rtol=1e-6)
  ramp = 3.0 ** (index - 1)
  np.testing.assert_allclose(weightings.geometric(gram, ratio=3.0),
                             K * ramp / ramp.sum(), rtol=1e-6)
  for step in (0, 3, 10):
    np.testing.assert_allclose(
        weightings.sdn(gram, progress=step / 10, cap=0.9),
        oracles.sdn_weights(K, step, 10, 0.9), rtol=1e-6)
  np.testing.assert_allclose(
      weightings.sdn(gram, progress=1.0, cap=[0.1, 0.2, 0.3]),
      [0.1, 0.2, 0.3, 1.0], rtol=1e-6)


def test_adaloss_is_inverse_losses_normalised_to_k():
  losses = np.array([2.0, 1.0, 0.5, 0.0])
  inverse = 1 / np.maximum(losses, 1e-3)
  np.testing.assert_allclose(
      weightings.adaloss(jnp.eye(K), losses=jnp.asarray(losses), eps=1e-3),
      K * inverse / inverse.sum(), rtol=1e-6)


def test_pcgrad_follows_the_orders_its_key_draws():
  rows = _rows(1)
  key = jax.random.key(7)
  orders = np.asarray(_stateful.visiting_orders(key, K))
  assert all(sorted(order) == list(range(K)) for order in orders.tolist())
  np.testing.assert_allclose(_direction(weightings.pcgrad, rows, key=key),
                             oracles.pcgrad_direction(rows, orders), atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_mgda_is_the_min_norm_point_of_the_hull(seed):
  rows = _rows(seed)[:3]
  np.testing.assert_allclose(_direction(weightings.mgda, rows),
                             oracles.min_norm_point(rows), atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1])
def test_upgrad_is_the_mean_projection_onto_the_dual_cone(seed):
  rows = _rows(seed)
  np.testing.assert_allclose(_direction(weightings.upgrad, rows),
                             oracles.upgrad_direction(rows), atol=1e-7)


def test_weights_are_in_the_gram_matrix_dtype():
  gram = jnp.eye(3, dtype=jnp.float32)
  for weighting in (weightings.osgd, weightings.uniform, weightings.linear,
                    weightings.geometric, weightings.mgda, weightings.upgrad):
    assert weighting(gram).dtype == jnp.float32, weighting.__name__
  assert weightings.pcgrad(gram, key=jax.random.key(0)).dtype == jnp.float32
  assert weightings.sdn(gram, progress=0.5).dtype == jnp.float32


def test_errors_name_the_shape_k_needs():
  with pytest.raises(ValueError, match=r"shape \(3,\).*K=4.*\(4,\) vector"):
    weightings.adaloss(jnp.eye(4), losses=jnp.ones(3))
  with pytest.raises(ValueError, match=r"2 caps.*K=4.*K-1 caps"):
    weightings.sdn(jnp.eye(4), progress=0.5, cap=[0.1, 0.2])
