"""Aligned-MTL against a float64 NumPy oracle, TorchJD, its properties.

The sum of the gradients aligned by the Gram matrix's eigenbasis, with each
scale mode: the weighting in x64 against tests/numpy_oracles.py and
TorchJD's stored outputs, then its claims with hypothesis.
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
  "aligned_mtl": ({}, oracles.aligned_mtl_direction),
  "aligned_mtl_median": (
    {"scale_mode": "median"},
    functools.partial(oracles.aligned_mtl_direction, scale_mode="median"),
  ),
  "aligned_mtl_rmse": (
    {"scale_mode": "rmse"},
    functools.partial(oracles.aligned_mtl_direction, scale_mode="rmse"),
  ),
}
# Aligned-MTL's "rmse" scale lifts M's smallest kept eigenvalue (1e4 here)
# to its mean (1e16): that eigenvector, known from M to eps · 1e16/1e4,
# dominates the update. TorchJD's is as far from the oracle.
MIXED_RTOL = {"aligned_mtl_rmse": 1e-3}
# Aligned-MTL's "rmse" on mixed scales: see MIXED_RTOL.
GOLDEN_RTOL = {"aligned_mtl_rmse": 1e-6}


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
  rtol = MIXED_RTOL.get(name, 1e-9) if case == "mixed_scale" else 1e-9
  gram_cases.assert_matches_oracle(
    weightings.aligned_mtl, oracle, case, rtol, **options
  )


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matches_torchjd(name):
  gram_cases.assert_matches_torchjd(
    name,
    weightings.aligned_mtl,
    VARIANTS[name][0],
    rtol=GOLDEN_RTOL.get(name, 1e-9),
  )


# --- properties ---------------------------------------------------------------


@gram_cases.common
@given(gram_cases.seeds, gram_cases.scales, gram_cases.zeros)
def test_outputs_are_finite_everywhere(seed, scales, zero):
  gram_cases.assert_finite_everywhere(
    weightings.aligned_mtl, seed, scales, zero
  )


@gram_cases.common
@given(gram_cases.seeds, st.permutations(range(K)))
def test_ignores_the_exits_order(seed, perm):
  gram_cases.assert_ignores_the_exits_order(weightings.aligned_mtl, seed, perm)


def test_options_are_checked_with_a_fix():
  with pytest.raises(ValueError, match=r"scale_mode must be one of"):
    osgd_jax.aligned_mtl(scale_mode="max", num_exits=3)
