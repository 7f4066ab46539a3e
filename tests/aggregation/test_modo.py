"""MoDo against a float64 NumPy oracle and TorchJD, over steps.

One projected step of MGDA's weights per update: the weighting in x64
against tests/numpy_oracles.py, the transformation against TorchJD's.
"""

from __future__ import annotations

import gram_cases
import jax
import jax.numpy as jnp
import numpy as np
import numpy_oracles as oracles

import osgd_jax
from osgd_jax import weightings

K = gram_cases.K


def test_modo_matches_oracle_over_steps():
  grams = gram_cases.random_grams(6, 3)
  with jax.enable_x64(True):
    modo = gram_cases.jitted(weightings.modo, gamma=0.05, rho=0.1)
    lam = jnp.full((K,), 1.0 / K)
    for m in grams:
      lam = modo(jnp.asarray(m), previous=lam)
  np.testing.assert_allclose(
    lam, oracles.modo_weights(grams, 0.05, 0.1), atol=1e-12
  )


def test_matches_torchjd_over_steps():
  # The state's float32 weights bound the agreement to about 1e-7.
  gram_cases.assert_matches_torchjd_over_steps("modo", osgd_jax.modo, rtol=1e-6)
