"""GradVac against a float64 NumPy oracle and TorchJD, over steps.

Cosines raised to running targets: the weighting in x64 against
tests/numpy_oracles.py, in the visiting orders its key draws; the
transformation against TorchJD's with K = 2 (deterministic).
"""

from __future__ import annotations

import gram_cases
import jax
import jax.numpy as jnp
import numpy as np
import numpy_oracles as oracles
import pytest

import osgd_jax
from osgd_jax import weightings
from osgd_jax.aggregation import _stateful

K, N = gram_cases.K, gram_cases.N


def test_gradvac_matches_oracle_over_steps():
  rng = np.random.default_rng(5)
  target = np.zeros((K, K))
  state = jnp.zeros((K, K))
  with jax.enable_x64(True):
    step = gram_cases.jitted(weightings.gradvac, beta=0.3)
    for t in range(3):
      rows = rng.normal(size=(K, N))
      rows[1:] -= 0.8 * rows[0]
      key = jax.random.key(t)
      orders = np.asarray(_stateful.visiting_orders(key, K))
      w, state = step(jnp.asarray(rows @ rows.T), target=state, key=key)
      want, target = oracles.gradvac_direction(rows, orders, target, beta=0.3)
      gram_cases.assert_close(np.asarray(w) @ rows, want, rows, 1e-9)
      np.testing.assert_allclose(np.asarray(state), target, atol=1e-12)


def test_matches_torchjd_over_steps():
  # With K = 2 each task has one other to visit, so TorchJD is
  # deterministic. The state's float32 EMA bounds the agreement to about
  # 1e-7.
  gram_cases.assert_matches_torchjd_over_steps(
    "gradvac", osgd_jax.gradvac, rtol=1e-6
  )


def test_options_are_checked_with_a_fix():
  with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
    osgd_jax.gradvac(beta=1.5, num_exits=3)
