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
  gram_cases.assert_matches_oracle(
    weightings.dualproj, oracles.dualproj_direction, case, 1e-9
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
  gram_cases.assert_finite_everywhere(weightings.dualproj, seed, scales, zero)


@gram_cases.common
@given(
  gram_cases.seeds,
  st.lists(st.floats(-3, 3), min_size=K, max_size=K),
  gram_cases.zeros,
)
def test_dualproj_is_non_conflicting(seed, scales, zero):
  # DualProj's claim holds for any rows, in float32.
  gram_cases.assert_non_conflicting(
    seed,
    scales,
    zero,
    lambda rows: np.asarray(
      gram_cases.float32_direction(weightings.dualproj, rows), np.float64
    ),
  )


@gram_cases.common
@given(gram_cases.seeds, st.permutations(range(K)))
def test_ignores_the_exits_order(seed, perm):
  gram_cases.assert_ignores_the_exits_order(weightings.dualproj, seed, perm)


def test_options_are_checked_with_a_fix():
  with pytest.raises(ValueError, match=r"pref_vector must be 3 finite"):
    osgd_jax.dualproj(3, pref_vector=[0.5, 0.5])
