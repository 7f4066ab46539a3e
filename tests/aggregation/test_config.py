"""ConFIG against a float64 NumPy oracle, TorchJD, and its properties.

Equal cosines with every gradient: the weighting in x64 against
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

from osgd_jax import weightings

K = gram_cases.K


@pytest.mark.parametrize("case", sorted(gram_cases.CASES))
def test_matches_float64_oracle(case):
  gram_cases.assert_matches_oracle(
    weightings.config, oracles.config_direction, case, 1e-9
  )


def test_matches_torchjd():
  gram_cases.assert_matches_torchjd("config", weightings.config, {}, rtol=1e-9)


# --- properties ---------------------------------------------------------------


@gram_cases.common
@given(gram_cases.seeds, gram_cases.scales, gram_cases.zeros)
def test_outputs_are_finite_everywhere(seed, scales, zero):
  gram_cases.assert_finite_everywhere(weightings.config, seed, scales, zero)


@gram_cases.common
@given(
  gram_cases.seeds,
  st.lists(st.floats(-3, 3), min_size=K, max_size=K),
  gram_cases.zeros,
)
def test_config_is_non_conflicting(seed, scales, zero):
  # ConFIG's claim needs independent rows (K ≤ N here; a zero row
  # constrains nothing), and its v = Ĝ⁺1 is as ill-conditioned as Ĝ, whose
  # condition the Gram squares: nearly parallel rows are beyond float32,
  # so ConFIG is checked in x64.
  gram_cases.assert_non_conflicting(
    seed,
    scales,
    zero,
    lambda rows: gram_cases.direction(
      weightings.config, rows.astype(np.float64)
    ),
  )


@gram_cases.common
@given(gram_cases.seeds, st.permutations(range(K)))
def test_ignores_the_exits_order(seed, perm):
  gram_cases.assert_ignores_the_exits_order(weightings.config, seed, perm)
