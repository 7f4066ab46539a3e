"""CAGrad against a float64 NumPy oracle, TorchJD, and its properties.

The best worst-case improvement in a ball around the mean: the weighting in
x64 against tests/numpy_oracles.py and TorchJD's stored outputs, then its
claims with hypothesis.
"""

from __future__ import annotations

import gram_cases
import numpy as np
import numpy_oracles as oracles
import pytest
from hypothesis import given
from hypothesis import strategies as st

import osgd_jax
from osgd_jax import weightings

K = gram_cases.K


@pytest.mark.parametrize("case", sorted(gram_cases.CASES))
def test_matches_float64_oracle(case):
  rows = gram_cases.case_rows(case)
  # SLSQP's accuracy; CAGrad's minimum is not smooth where ‖g_w‖ is small.
  gram_cases.assert_close(
    gram_cases.direction(weightings.cagrad, rows, c=0.4),
    oracles.cagrad_direction(rows, c=0.4),
    rows,
    1e-7,
  )


def test_matches_torchjd():
  gram_cases.assert_matches_torchjd(
    "cagrad", weightings.cagrad, {"c": 0.4}, rtol=1e-9
  )


# --- properties ---------------------------------------------------------------


@gram_cases.common
@given(gram_cases.seeds, gram_cases.scales, gram_cases.zeros)
def test_outputs_are_finite_everywhere(seed, scales, zero):
  rows = gram_cases.property_rows(seed, scales, zero)
  assert np.all(
    np.isfinite(
      np.asarray(gram_cases.float32_direction(weightings.cagrad, rows, c=0.4))
    )
  )


@gram_cases.common
@given(gram_cases.seeds, st.permutations(range(K)))
def test_ignores_the_exits_order(seed, perm):
  # An invariance of the maths: checked in x64, away from float32's
  # conditioning.
  rows = gram_cases.property_rows(seed, [0.0, 1.0, -1.0, 0.5], None).astype(
    np.float64
  )
  u = gram_cases.direction(weightings.cagrad, rows, c=0.4)
  permuted = gram_cases.direction(
    weightings.cagrad, rows[np.asarray(perm)], c=0.4
  )
  np.testing.assert_allclose(
    permuted, u, rtol=1e-9, atol=1e-12 * np.abs(u).max()
  )


def test_options_are_checked_with_a_fix():
  with pytest.raises(ValueError, match=r"c must be a finite number >= 0"):
    osgd_jax.cagrad(-0.1, num_exits=3)
