"""DualProj against a float64 NumPy oracle, TorchJD, and its properties.

The mean projected onto the rows' dual cone: the weighting in x64 against
tests/numpy_oracles.py and TorchJD's stored outputs, then its claims with
hypothesis.
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
  gram_cases.assert_close(
    gram_cases.direction(weightings.dualproj, rows),
    oracles.dualproj_direction(rows),
    rows,
    1e-9,
  )


def test_matches_torchjd():
  # TorchJD's projections solve the QP on the trace-normalised Gram plus
  # 1e-4 I.
  gram_cases.assert_matches_torchjd(
    "dualproj", weightings.dualproj, {}, rtol=2e-4
  )


# --- properties ---------------------------------------------------------------


@gram_cases.common
@given(gram_cases.seeds, gram_cases.scales, gram_cases.zeros)
def test_outputs_are_finite_everywhere(seed, scales, zero):
  rows = gram_cases.property_rows(seed, scales, zero)
  assert np.all(
    np.isfinite(
      np.asarray(gram_cases.float32_direction(weightings.dualproj, rows))
    )
  )


@gram_cases.common
@given(
  gram_cases.seeds,
  st.lists(st.floats(-3, 3), min_size=K, max_size=K),
  gram_cases.zeros,
)
def test_dualproj_is_non_conflicting(seed, scales, zero):
  # DualProj's claim holds for any rows, in float32.
  rows = gram_cases.property_rows(seed, scales, None)
  rows[1:] -= 0.9 * rows[0]  # conflicts to resolve
  if zero is not None:
    rows[zero] = 0.0
  norms = np.linalg.norm(rows.astype(np.float64), axis=1)
  u = np.asarray(
    gram_cases.float32_direction(weightings.dualproj, rows), np.float64
  )
  assert np.all(rows @ u >= -1e-4 * norms * norms.sum()), rows @ u


@gram_cases.common
@given(gram_cases.seeds, st.permutations(range(K)))
def test_ignores_the_exits_order(seed, perm):
  # An invariance of the maths: checked in x64, away from float32's
  # conditioning.
  rows = gram_cases.property_rows(seed, [0.0, 1.0, -1.0, 0.5], None).astype(
    np.float64
  )
  u = gram_cases.direction(weightings.dualproj, rows)
  permuted = gram_cases.direction(weightings.dualproj, rows[np.asarray(perm)])
  np.testing.assert_allclose(
    permuted, u, rtol=1e-9, atol=1e-12 * np.abs(u).max()
  )


def test_options_are_checked_with_a_fix():
  with pytest.raises(ValueError, match=r"pref_vector must be 3 finite"):
    osgd_jax.dualproj([0.5, 0.5], num_exits=3)
