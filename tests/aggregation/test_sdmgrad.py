"""SDMGrad against a float64 NumPy oracle and TorchJD, over steps.

MGDA's weights pulled towards the mean: the weighting in x64 against
tests/numpy_oracles.py, the transformation against TorchJD's.
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

K = gram_cases.K


def test_sdmgrad_matches_oracle_over_steps():
  grams = gram_cases.random_grams(6, 3)
  with jax.enable_x64(True):
    sdmgrad = gram_cases.jitted(weightings.sdmgrad)
    w = jnp.full((K,), 1.0 / K)
    for m in grams:
      weights, w = sdmgrad(jnp.asarray(m), previous=w)
  np.testing.assert_allclose(
    weights, oracles.sdmgrad_weights(grams), atol=1e-10
  )


def test_matches_torchjd_over_steps():
  # The state's float32 weights bound the agreement to about 1e-7.
  gram_cases.assert_matches_torchjd_over_steps(
    "sdmgrad", osgd_jax.sdmgrad, rtol=1e-6
  )


def test_options_are_checked_with_a_fix():
  with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
    osgd_jax.sdmgrad(momentum=1.0, num_exits=3)
