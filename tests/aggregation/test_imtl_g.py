"""IMTL-G against a float64 NumPy oracle, TorchJD, and its properties.

Equal projections of the update on the unit gradients: the weighting in
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

from osgd_jax import weightings

K = gram_cases.K


@pytest.mark.parametrize("case", sorted(gram_cases.CASES))
def test_matches_float64_oracle(case):
  gram_cases.assert_matches_oracle(
    weightings.imtl_g, oracles.imtl_g_direction, case, 1e-9
  )


def test_imtl_g_equalises_the_projections_at_every_scale():
  # Mixed scales: the cosine basis keeps the 1e-8 row, which M's own
  # eigenvalues (1e-16 of the largest) would lose.
  rows = gram_cases.mixed_scale(np.random.default_rng(3))
  u = gram_cases.direction(weightings.imtl_g, rows)
  proj = rows @ u / np.linalg.norm(rows, axis=1)
  np.testing.assert_allclose(proj, proj[0], rtol=1e-9)


def test_matches_torchjd():
  # TorchJD's pinv of M counts the 1e-8 row's eigenvalue (1e-16 of the
  # largest) as zero; ours works with the cosines (see the test above).
  gram_cases.assert_matches_torchjd(
    "imtl_g", weightings.imtl_g, {}, rtol=1e-9, skip=("mixed_scale",)
  )


# --- properties ---------------------------------------------------------------


@gram_cases.common
@given(gram_cases.seeds, gram_cases.scales, gram_cases.zeros)
def test_outputs_are_finite_everywhere(seed, scales, zero):
  gram_cases.assert_finite_everywhere(weightings.imtl_g, seed, scales, zero)


@gram_cases.common
@given(gram_cases.seeds, st.permutations(range(K)))
def test_ignores_the_exits_order(seed, perm):
  gram_cases.assert_ignores_the_exits_order(weightings.imtl_g, seed, perm)


@gram_cases.common
@given(gram_cases.seeds, st.lists(st.floats(-3, 3), min_size=K, max_size=K))
def test_imtl_g_line_ignores_the_rows_scales(seed, log_c):
  # The line, not the direction: Σ w = 1 can flip the sign.
  rows = gram_cases.property_rows(seed, [0.0] * K, None).astype(np.float64)
  u = gram_cases.direction(weightings.imtl_g, rows)
  scaled = gram_cases.direction(
    weightings.imtl_g, rows * 10.0 ** np.asarray(log_c)[:, None]
  )
  cos = u @ scaled / (np.linalg.norm(u) * np.linalg.norm(scaled))
  assert abs(cos) > 1 - 1e-12, cos
