"""MGDA against float64 NumPy oracles, TorchJD, its properties and errors.

The transformation is compared with the min-norm point of the gradients'
convex hull (tests/numpy_oracles.py) on random and degenerate trees; the
weighting in x64, and against TorchJD's stored outputs; then its documented
properties are checked with hypothesis.
"""

from __future__ import annotations

import gram_cases
import jax.numpy as jnp
import numpy as np
import numpy_oracles as oracles
import pytest
import stacked_cases
from hypothesis import given, settings
from hypothesis import strategies as st

from osgd_jax import aggregation, weightings

K = stacked_cases.K
few = settings(max_examples=6, deadline=None)
seeds = st.integers(0, 2**31 - 1)
exponents = st.floats(-8, 8)


# --- against the oracles ------------------------------------------------------


# Per leaf every weighting runs vmapped over the leaves; MGDA shares UPGrad's
# solver, so its per-leaf variant would only add a compilation.
@pytest.mark.parametrize("case", sorted(stacked_cases.CASES))
def test_matches_float64_oracle(case):
  granularity = "global"
  grads = stacked_cases.case_grads(case)
  state = stacked_cases.init("mgda", granularity)
  out, new_state = stacked_cases.jitted("mgda", granularity)(grads, state)
  expected = oracles.aggregate(
    stacked_cases.leaves(grads), oracles.min_norm_point, granularity
  )
  stacked_cases.assert_close(out, expected, grads, granularity)
  assert stacked_cases.finite((out, new_state))
  stacked_cases.assert_non_conflicting(out, grads, granularity)


@pytest.mark.parametrize("seed", [0, 1])
def test_mgda_is_the_min_norm_point_of_the_hull(seed):
  rows = gram_cases.conflicting_rows(seed)[:3]
  np.testing.assert_allclose(
    gram_cases.weighted_rows(weightings.mgda, rows),
    oracles.min_norm_point(rows),
    atol=1e-7,
  )


def test_weights_are_in_the_gram_matrix_dtype():
  assert weightings.mgda(jnp.eye(3, dtype=jnp.float32)).dtype == jnp.float32


# --- against TorchJD ----------------------------------------------------------


def test_matches_torchjd():
  # TorchJD's MGDA stops Frank–Wolfe early.
  gram_cases.assert_matches_torchjd("mgda", weightings.mgda, {}, rtol=2e-2)


# --- properties ---------------------------------------------------------------
# On the K=6 trees of the oracle tests, so each jitted update compiles once.


@few
@given(seeds, exponents, st.booleans())
def test_finite_and_non_conflicting(seed, exp, zero_row):
  stacked_cases.assert_finite_and_non_conflicting("mgda", seed, exp, zero_row)


@few
@given(seeds, exponents, st.floats(-3, 3))
def test_positively_homogeneous_and_order_invariant(seed, exp, log_c):
  stacked_cases.assert_positively_homogeneous_and_order_invariant(
    "mgda", seed, exp, log_c
  )


def test_single_exit_is_the_identity():
  stacked_cases.assert_single_exit_is_the_identity("mgda")


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
  "make, match",
  [
    (
      lambda: aggregation.mgda(granularity="layer", num_exits=2),
      "granularity must be one of",
    ),
    (
      lambda: aggregation.mgda(tol=1.0, num_exits=2),
      r"mgda: tol must be in \[0, 1\), got 1.0",
    ),
    (lambda: aggregation.mgda(), r"mgda needs num_exits=K.*fixed at init"),
  ],
)
def test_bad_options(make, match):
  with pytest.raises(ValueError, match=match):
    make()
