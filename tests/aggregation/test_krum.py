"""Krum and Multi-Krum against a float64 NumPy oracle, TorchJD, properties.

The gradient(s) nearest their neighbours: the weighting in x64 against
tests/numpy_oracles.py and TorchJD's stored outputs, then its claims with
hypothesis, and the sizes it needs.
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
  options, oracle = VARIANTS[name]
  gram_cases.assert_matches_oracle(
    weightings.krum, oracle, case, 1e-9, **options
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
  gram_cases.assert_finite_everywhere(
    weightings.krum, seed, scales, zero, n_byzantine=0
  )


@gram_cases.common
@given(gram_cases.seeds, st.permutations(range(K)))
def test_ignores_the_exits_order(seed, perm):
  gram_cases.assert_ignores_the_exits_order(
    weightings.krum, seed, perm, n_byzantine=0
  )


def test_options_are_checked_with_a_fix():
  with pytest.raises(ValueError, match=r"num_exits >= 4.*lower n_byzantine"):
    osgd_jax.krum(n_byzantine=1, num_exits=3)
