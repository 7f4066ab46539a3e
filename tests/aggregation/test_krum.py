"""Krum and Multi-Krum against a float64 NumPy oracle, TorchJD, properties.

The gradient(s) nearest their neighbours: the weighting in x64 against
tests/numpy_oracles.py and TorchJD's stored outputs, then its claims with
hypothesis, and the sizes it needs.
"""

from __future__ import annotations

import functools

import gram_cases
import numpy as np
import numpy_oracles as oracles
import pytest
from hypothesis import given
from hypothesis import strategies as st

import osgd_jax
from osgd_jax import weightings

K = gram_cases.K
# name in tests/golden/torchjd_golden.json -> (keyword arguments, oracle).
VARIANTS = {
  "krum": (
    {"n_byzantine": 0},
    functools.partial(oracles.krum_direction, n_byzantine=0),
  ),
  "multi_krum": (
    {"n_byzantine": 0, "n_selected": 2},
    functools.partial(oracles.krum_direction, n_byzantine=0, n_selected=2),
  ),
}


@pytest.mark.parametrize(
  "name, case",
  [
    (name, case)
    for name in sorted(VARIANTS)
    for case in sorted(gram_cases.CASES)
  ],
)
def test_matches_float64_oracle(name, case):
  rows = gram_cases.case_rows(case)
  options, oracle = VARIANTS[name]
  gram_cases.assert_close(
    gram_cases.direction(weightings.krum, rows, **options),
    oracle(rows),
    rows,
    1e-9,
  )


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matches_torchjd(name):
  gram_cases.assert_matches_torchjd(
    name, weightings.krum, VARIANTS[name][0], rtol=1e-9
  )


# --- properties ---------------------------------------------------------------


@gram_cases.common
@given(gram_cases.seeds, gram_cases.scales, gram_cases.zeros)
def test_outputs_are_finite_everywhere(seed, scales, zero):
  rows = gram_cases.property_rows(seed, scales, zero)
  assert np.all(
    np.isfinite(
      np.asarray(
        gram_cases.float32_direction(weightings.krum, rows, n_byzantine=0)
      )
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
  u = gram_cases.direction(weightings.krum, rows, n_byzantine=0)
  permuted = gram_cases.direction(
    weightings.krum, rows[np.asarray(perm)], n_byzantine=0
  )
  np.testing.assert_allclose(
    permuted, u, rtol=1e-9, atol=1e-12 * np.abs(u).max()
  )


def test_options_are_checked_with_a_fix():
  with pytest.raises(ValueError, match=r"num_exits >= 4.*lower n_byzantine"):
    osgd_jax.krum(n_byzantine=1, num_exits=3)
