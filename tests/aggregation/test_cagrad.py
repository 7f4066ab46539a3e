"""CAGrad against a float64 NumPy oracle, TorchJD, and its properties.

The best worst-case improvement in a ball around the mean: the weighting in
x64 against tests/numpy_oracles.py and TorchJD's stored outputs, then its
claims with hypothesis.
"""

from __future__ import annotations

import functools

import gram_cases
import numpy_oracles as oracles
import pytest
from hypothesis import given
from hypothesis import strategies as st

import osgd_jax
from osgd_jax import weightings

K = gram_cases.K


@pytest.mark.parametrize("case", sorted(gram_cases.CASES))
def test_matches_float64_oracle(case):
  # SLSQP's accuracy; CAGrad's minimum is not smooth where ‖g_w‖ is small.
  gram_cases.assert_matches_oracle(
    weightings.cagrad,
    functools.partial(oracles.cagrad_direction, c=0.4),
    case,
    1e-7,
    c=0.4,
  )


def test_matches_torchjd():
  gram_cases.assert_matches_torchjd(
    "cagrad", weightings.cagrad, {"c": 0.4}, rtol=1e-9
  )


# --- properties ---------------------------------------------------------------


@gram_cases.common
@given(gram_cases.seeds, gram_cases.scales, gram_cases.zeros)
def test_outputs_are_finite_everywhere(seed, scales, zero):
  gram_cases.assert_finite_everywhere(
    weightings.cagrad, seed, scales, zero, c=0.4
  )


@gram_cases.common
@given(gram_cases.seeds, st.permutations(range(K)))
def test_ignores_the_exits_order(seed, perm):
  gram_cases.assert_ignores_the_exits_order(
    weightings.cagrad, seed, perm, c=0.4
  )


def test_options_are_checked_with_a_fix():
  with pytest.raises(ValueError, match=r"c must be a finite number >= 0"):
    osgd_jax.cagrad(3, c=-0.1)
