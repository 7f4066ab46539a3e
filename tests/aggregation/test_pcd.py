"""PCD against a float64 NumPy oracle, TorchJD, and its properties.

Exit 1 first, the others guaranteed progress: the weighting in x64 against
tests/numpy_oracles.py; the transformation, with its EMA of the exits'
norms, against TorchJD's over steps; then its claims with hypothesis.
"""

from __future__ import annotations

import functools

import gram_cases
import numpy as np
import numpy_oracles as oracles
import pytest
from hypothesis import given

import osgd_jax
from osgd_jax import weightings


# PCD normalises the rows: a zero secondary row has no constraint to meet,
# which the oracle, on unit rows, does not express.
@pytest.mark.parametrize("case", sorted(set(gram_cases.CASES) - {"zero_row"}))
def test_matches_float64_oracle(case):
  gram_cases.assert_matches_oracle(
    weightings.pcd,
    functools.partial(oracles.pcd_direction, tau=0.3),
    case,
    1e-9,
    tau=0.3,
  )


def test_pcd_falls_back_to_the_primary_when_infeasible():
  # Two opposite secondaries cannot both get progress.
  rows = np.zeros((3, 4))
  rows[0, 0], rows[1, 1], rows[2, 1] = 2.0, 1.0, -3.0
  np.testing.assert_allclose(
    gram_cases.direction(weightings.pcd, rows, tau=0.3), rows[0], atol=1e-12
  )


# PCD is stateful in TorchJD (its EMA): compared over steps. The state's
# float32 EMA bounds the agreement to about 1e-7.
@pytest.mark.parametrize("name", ["pcd", "pcd_tau"])
def test_matches_torchjd_over_steps(name):
  gram_cases.assert_matches_torchjd_over_steps(name, osgd_jax.pcd, rtol=1e-6)


@gram_cases.common
@given(gram_cases.seeds, gram_cases.scales, gram_cases.zeros)
def test_outputs_are_finite_everywhere(seed, scales, zero):
  # (PCD favours its first exit: not symmetric.)
  gram_cases.assert_finite_everywhere(
    weightings.pcd, seed, scales, zero, tau=0.3
  )


def test_options_are_checked_with_a_fix():
  with pytest.raises(ValueError, match=r"tau must be one number or 2"):
    osgd_jax.pcd(tau=[0.1, 0.2, 0.3], num_exits=3)
